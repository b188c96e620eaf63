import pytest

from libvirt_operator.api.quantity import to_bytes, to_kib


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256Mi", 256 * 2**20), ("1Gi", 2**30), ("1G", 10**9), ("1.5Ki", 1536), ("100", 100), ("0.5k", 500)],
)
def test_to_bytes(text, expected):
    assert to_bytes(text) == expected


def test_to_kib_rounds_up():
    assert to_kib("1") == 1
    assert to_kib("2Mi") == 2048


@pytest.mark.parametrize("bad", ["", "Mi", "1Xi", "-1Mi"])
def test_rejects_garbage(bad):
    with pytest.raises(ValueError):
        to_bytes(bad)

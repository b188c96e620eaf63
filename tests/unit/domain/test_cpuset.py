import pytest

from libvirt_operator.domain import cpuset


@pytest.mark.parametrize(("text", "cpus"), [
    ("0", {0}),
    ("0-1,3", {0, 1, 3}),
    ("3,0-1", {0, 1, 3}),
    ("0-4,^2", {0, 1, 3, 4}),
    ("^2,0-4", {0, 1, 3, 4}),
    (" 1 , 5-6 ", {1, 5, 6}),
    ("2-2", {2}),
    ("0,0,1", {0, 1}),
])
def test_parse(text, cpus):
    assert cpuset.parse(text) == cpus


@pytest.mark.parametrize("text", ["", ",", "a", "1-", "-1", "3-1", "1-2-3", "^1", "0-1,^0-1", "1.5", "0x1"])
def test_parse_refuses(text):
    with pytest.raises(ValueError):
        cpuset.parse(text)


@pytest.mark.parametrize(("cpus", "text"), [
    ({0}, "0"),
    ({0, 1, 3}, "0-1,3"),
    ([3, 1, 0], "0-1,3"),
    ({0, 2, 4}, "0,2,4"),
    ({1, 2, 3, 7, 8, 10}, "1-3,7-8,10"),
])
def test_format(cpus, text):
    assert cpuset.format_cpus(cpus) == text


@pytest.mark.parametrize("cpus", [set(), {-1, 0}])
def test_format_refuses(cpus):
    with pytest.raises(ValueError):
        cpuset.format_cpus(cpus)


def test_canonical():
    assert cpuset.canonical("3,0-1,^1") == "0,3"
    assert cpuset.canonical("0,1,2") == "0-2"


def test_cpumap_round_trip():
    assert cpuset.to_cpumap("0-1,3", 4) == (True, True, False, True)
    assert cpuset.to_cpumap("1", 2) == (False, True)
    assert cpuset.from_cpumap((True, True, False, True)) == "0-1,3"
    assert cpuset.from_cpumap([False, True]) == "1"


def test_cpumap_refuses_cpus_the_host_lacks():
    with pytest.raises(ValueError, match="CPU 2, the host has CPUs 0-1"):
        cpuset.to_cpumap("0-2", 2)


def test_empty_cpumap_is_refused():
    with pytest.raises(ValueError):
        cpuset.from_cpumap((False, False))

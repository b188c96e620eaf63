"""Access to the captured libvirt 9.0 domain XML under data/ (see capture_samples.py)."""

from pathlib import Path

from libvirt_operator.domain.xmlbase import canonical_xml

DATA = Path(__file__).resolve().parent / "data"
NAMES = sorted(p.stem for p in DATA.glob("*.xml"))


def sample(name: str) -> str:
    return (DATA / f"{name}.xml").read_text()


def same_xml(a: str, b: str) -> bool:
    return canonical_xml(a) == canonical_xml(b)


def replace_once(text: str, old: str, new: str) -> str:
    """The expected text after one edit; the edit must apply exactly once."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)

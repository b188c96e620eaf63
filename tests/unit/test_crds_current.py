"""crds/ must be exactly what the pydantic models generate."""

from pathlib import Path

from libvirt_operator.api import crdgen

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_crds_directory_matches_models():
    expected = crdgen.render()
    on_disk = {p.name: p.read_text() for p in CRDS.glob("*.yaml")}
    assert set(on_disk) == set(expected), "crds/ has missing or extra files: run python -m libvirt_operator.api.crdgen"
    for name, text in expected.items():
        assert on_disk[name] == text, f"crds/{name} is stale: run python -m libvirt_operator.api.crdgen"

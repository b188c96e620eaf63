import itertools

import pytest

from tests.e2e.vmtools import VMs

_names = itertools.count()


@pytest.fixture(scope="session")
def vms(cluster) -> VMs:
    return VMs(cluster)


@pytest.fixture(autouse=True)
def _delete_test_vms(request):
    yield
    if "vms" in request.fixturenames:
        request.getfixturevalue("vms").delete_created()


@pytest.fixture
def vm_name(request) -> str:
    """A unique, DNS-safe VM name per test."""
    base = request.node.name.split("[")[0].removeprefix("test_").replace("_", "-").lower()[:40].strip("-")
    return f"{base}-{next(_names)}"

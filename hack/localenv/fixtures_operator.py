"""pytest plugin: the operator (controller + one agent per node) installed into the local world."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localenv.cluster import Cluster, install


@pytest.fixture(scope="session")
def cluster(control_plane, libvirt_nodes, storage_dir, guest_image, tmp_path_factory) -> Iterator[Cluster]:
    c = install(control_plane, libvirt_nodes, storage_dir, guest_image, tmp_path_factory.mktemp("operator"))
    try:
        yield c
    finally:
        c.operator.stop()

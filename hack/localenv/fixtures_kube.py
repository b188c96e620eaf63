"""pytest plugin: one real control plane per test session.

Enable with `pytest_plugins = ["localenv.fixtures_kube"]` in the top-level conftest
(or `pytest -p localenv.fixtures_kube`). Missing binaries are an error, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes.client import ApiClient

from localenv.controlplane import ControlPlane, expected_bin_dir, require_binaries


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver + kube-controller-manager in a fresh world dir."""
    bin_dir = expected_bin_dir()
    problem = None
    try:
        require_binaries(bin_dir)
    except FileNotFoundError as err:
        problem = str(err)
    if problem:
        pytest.fail(problem, pytrace=False)
    cp = ControlPlane(tmp_path_factory.mktemp("world"), bin_dir).start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[ApiClient]:
    """ApiClient with cluster-admin (system:masters) rights."""
    with control_plane.api_client() as api:
        yield api

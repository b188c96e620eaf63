import pytest

from libvirt_operator.api import meta
from libvirt_operator.controller.config import ControllerConfig


def test_defaults():
    cfg = ControllerConfig.from_env({})
    assert cfg.namespace == meta.DEFAULT_NAMESPACE and cfg.watch_namespaces == () and cfg.liveness_endpoint is None


def test_from_env():
    cfg = ControllerConfig.from_env({"LVO_NAMESPACE": "ops", "LVO_WATCH_NAMESPACES": "a, b-*,",
                                     "LVO_PLACEMENT_RETRY_SECONDS": "0.5", "LVO_LOG_LEVEL": "debug"})
    assert (cfg.namespace, cfg.watch_namespaces, cfg.retry_seconds, cfg.log_level) == (
        "ops", ("a", "b-*"), 0.5, "DEBUG")


def test_retry_must_be_positive():
    with pytest.raises(SystemExit):
        ControllerConfig.from_env({"LVO_PLACEMENT_RETRY_SECONDS": "0"})

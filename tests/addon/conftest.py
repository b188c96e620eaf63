"""Fixtures of the add-on tests; the world itself is described in tests/addon/world.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.addon.world import AddonWorld, addon_world


@pytest.fixture(scope="package")
def addon() -> Iterator[AddonWorld]:
    with addon_world() as world:
        yield world

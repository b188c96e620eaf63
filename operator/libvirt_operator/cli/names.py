"""Names and paths the verbs take from the command line, checked before any request is made."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

from libvirt_operator.cli.plan import Refused

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def vm_name(vm: dict) -> str:
    return vm["metadata"]["name"]


def label(value: str, what: str) -> str:
    if len(value) > 63 or not DNS_LABEL.fullmatch(value):
        raise Refused(f"{what} {value!r} is not a DNS label (at most 63 lower-case letters, digits and '-')")
    return value


def host_path(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise Refused(f"{what} must be an absolute host path, not {value!r}")
    return os.path.normpath(value)


def generated_name(vm: str, what: str) -> str:
    """VM-what-TIMESTAMP, within a DNS label."""
    return f"{vm[:40].rstrip('-')}-{what}-{datetime.now(UTC):%Y%m%d-%H%M%S}"

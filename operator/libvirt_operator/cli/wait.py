"""`--wait`: follow one object through a watch until a check decides.

The watch is on the object's kind with `field_selector=metadata.name=NAME`, from the
resourceVersion the verb's last write returned, so no change after the write is missed and none
before it is seen. The server ends each watch at the remaining time (timeout_seconds), and the
loop re-establishes it from the last resourceVersion seen; when that version has expired
(410 Gone) it reads the object again and watches from the version read.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import urllib3
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from libvirt_operator.api import meta
from libvirt_operator.cli.client import VMClient
from libvirt_operator.cli.plan import VM_PLURAL, Check, Result
from libvirt_operator.cli.vmread import describe

# Longest single watch request; the server closes it (and the loop opens the next) at this age.
MAX_WATCH_SECONDS = 300


def _rv(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("resourceVersion") or ""


def wait(vms: VMClient, name: str, check: Check, timeout: float, start: dict | None = None,
         plural: str = VM_PLURAL, progress: Callable[[str], None] | None = None) -> Result:
    """Watch `name` until `check` decides; `start` is the object as last written (read when None).
    Progress (the phase, and why) goes to `progress` (stderr) each time it changes."""
    deadline = time.monotonic() + timeout
    say = progress or (lambda line: print(line, file=sys.stderr))
    last = ""

    def see(obj: dict) -> Result | None:
        nonlocal last
        outcome = check(obj)
        if outcome is None:
            now = describe(obj)
            if now != last:
                say(f"  {name}: {now}")
                last = now
        return outcome

    obj = start if start is not None else vms.get(name, plural)
    rv = _rv(obj)
    if (outcome := see(obj)) is not None:
        return outcome
    w = watch.Watch()
    while (remaining := deadline - time.monotonic()) > 0:
        seconds = max(1, math.ceil(min(remaining, MAX_WATCH_SECONDS)))
        try:
            for event in w.stream(vms.api.list_namespaced_custom_object, meta.GROUP, meta.VERSION, vms.namespace,
                                  plural, field_selector=f"metadata.name={name}", resource_version=rv,
                                  allow_watch_bookmarks=True, timeout_seconds=seconds,
                                  _request_timeout=(10, seconds + 30)):
                raw = event["raw_object"]
                rv = _rv(raw) or rv
                if event["type"] == "BOOKMARK":
                    continue
                if event["type"] == "DELETED":
                    return Result(False, f"{name} was deleted")
                if (outcome := see(raw)) is not None:
                    w.stop()
                    return outcome
        except ApiException as exc:
            if exc.status != 410:
                raise
            # Expired: read the object again and watch from there.
            obj = vms.get(name, plural)
            rv = _rv(obj)
            if (outcome := see(obj)) is not None:
                return outcome
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            continue  # the connection dropped: watch again from the last version seen
    return Result(False, f"timed out after {timeout:g}s; last seen: {last or 'no change'}")

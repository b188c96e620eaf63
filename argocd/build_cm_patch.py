"""Writes argocd-cm-patch.yaml from health/*.lua (run after editing a health check).

    python argocd/build_cm_patch.py            # rewrite argocd-cm-patch.yaml
    python argocd/build_cm_patch.py --check    # exit 1 if argocd-cm-patch.yaml is stale

Argo CD runs each ConfigMap key as a standalone Lua script (no require), so every key carries the
shared prelude health/_common.lua followed by the kind's own rules, health/<Kind>.lua.
tests/unit/test_argocd_health.py runs those assembled scripts and fails while the patch is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEALTH = HERE / "health"
PATCH = HERE / "argocd-cm-patch.yaml"
PRELUDE = HEALTH / "_common.lua"
GROUP = "virt.libvirt-operator.io"
KINDS = ("VirtualMachine", "VMSnapshot", "VMMigration", "VMQosPolicy")
HEADER = """\
# Argo CD health checks for the libvirt-operator kinds, generated from argocd/health/*.lua by
# argocd/build_cm_patch.py (each key: health/_common.lua, then health/<Kind>.lua). Merge into argocd-cm, e.g.:
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd/argocd-cm-patch.yaml
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
"""


def key(kind: str) -> str:
    return f"resource.customizations.health.{GROUP}_{kind}"


def script(kind: str) -> str:
    """The Lua script Argo CD runs for `kind`: the shared prelude, a blank line, the kind's rules."""
    prelude = PRELUDE.read_text().rstrip("\n")
    rules = (HEALTH / f"{kind}.lua").read_text().rstrip("\n")
    return f"{prelude}\n\n{rules}\n"


def render() -> str:
    out = [HEADER]
    for kind in KINDS:
        out.append(f"  {key(kind)}: |\n")
        out.extend(f"    {line}\n" if line else "\n" for line in script(kind).rstrip("\n").split("\n"))
    return "".join(out)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        if PATCH.read_text() != render():
            print(f"{PATCH} is stale: run python argocd/build_cm_patch.py", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    PATCH.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Writes argocd-cm-patch.yaml from health/*.lua (run after editing a health check).

    python argocd/build_cm_patch.py

tests/unit/test_argocd_health.py fails while the patch differs from the Lua files.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUP = "virt.libvirt-operator.io"
KINDS = ("VirtualMachine", "VMSnapshot", "VMMigration", "VMQosPolicy")
HEADER = """\
# Argo CD health checks for the libvirt-operator kinds, generated from argocd/health/*.lua by
# argocd/build_cm_patch.py. Merge into argocd-cm, e.g.:
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


def render() -> str:
    out = [HEADER]
    for kind in KINDS:
        lua = (HERE / "health" / f"{kind}.lua").read_text()
        out.append(f"  {key(kind)}: |\n")
        out.extend(f"    {line}\n" if line else "\n" for line in lua.rstrip("\n").split("\n"))
    return "".join(out)


if __name__ == "__main__":
    (HERE / "argocd-cm-patch.yaml").write_text(render())

"""Apply examples/vm-demo.yaml to the local world and wait until it runs."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from localenv.controlplane import REPO_DIR, ControlPlane
from localenv.guest import ensure_guest_image

SAMPLE = REPO_DIR / "examples" / "vm-demo.yaml"


def run_sample_vm(world_dir: Path, timeout: float = 120) -> str:
    cp = ControlPlane.load(world_dir)
    image = ensure_guest_image()
    manifest = SAMPLE.read_text().replace("@STORAGE@", str(world_dir / "storage"))
    manifest = manifest.replace("/images/vmlinuz", f"/images/{image.kernel.name}")  # the guest's kernel file
    manifest = manifest.replace('"console=ttyS0 quiet loglevel=0"', f'"{image.cmdline}"')
    kubectl = [str(cp.bin_dir / "kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    subprocess.run([*kubectl, "apply", "-f", "-"], input=manifest, text=True, check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = subprocess.run([*kubectl, "get", "virtualmachine", "demo", "-o", "jsonpath={.status.phase}"],
                               capture_output=True, text=True).stdout
        if phase == "Running":
            table = subprocess.run([*kubectl, "get", "virtualmachines", "-A"], capture_output=True, text=True)
            return "demo is Running\n" + table.stdout
        time.sleep(0.5)
    raise RuntimeError(f"the sample VM did not reach Running within {timeout:.0f}s (phase {phase!r})")

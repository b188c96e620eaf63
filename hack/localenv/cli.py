"""`python -m localenv up|down|status|kubeconfig|env`: the local test world from a shell.

`up` runs STEPS in order and `down` in reverse order. A step's module is imported
inside its functions, so a step can be listed before every part of it exists.
Processes keep running after `up` exits; their state lives in the world dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localenv import procs
from localenv.controlplane import REPO_DIR, ControlPlane, build_binaries

DEFAULT_WORLD = REPO_DIR / ".work" / "world"


@dataclass
class World:
    """What the steps share while one command runs."""

    dir: Path
    bin_dir: Path | None = None  # set by the "binaries" step
    control_plane_restarted: bool = False  # set by the "control-plane" step: clients must start again


@dataclass(frozen=True)
class Step:
    name: str
    up: Callable[[World], str]  # returns a one-line summary
    down: Callable[[World], str] | None = None
    status: Callable[[World], tuple[bool, str]] | None = None  # (healthy, summary)


# --- step: binaries -----------------------------------------------------------------------------


def binaries_up(world: World) -> str:
    world.bin_dir = build_binaries()
    return str(world.bin_dir)


# --- step: control plane ------------------------------------------------------------------------


def _recorded_control_plane(world: World) -> ControlPlane | None:
    try:
        return ControlPlane.load(world.dir)
    except FileNotFoundError:
        return None


def control_plane_up(world: World) -> str:
    cp = _recorded_control_plane(world)
    if cp is not None and cp.healthy():
        return f"already running at {cp.server}"
    if cp is not None:
        cp.stop()  # leftovers of a crashed or partial start
    cp = ControlPlane(world.dir, world.bin_dir).start()
    world.control_plane_restarted = True
    return f"{cp.server} (ready in {cp.startup_seconds}s)"


def control_plane_down(world: World) -> str:
    cp = _recorded_control_plane(world)
    if cp is None:
        return "was never started"
    cp.stop()
    return "stopped"


def control_plane_status(world: World) -> tuple[bool, str]:
    cp = _recorded_control_plane(world)
    if cp is None:
        return False, "not started"
    processes = ", ".join(f"{n}={'up' if ok else 'DOWN'}" for n, ok in cp.status().items())
    healthy = cp.healthy()
    return healthy, f"{cp.server} {'ready' if healthy else 'NOT READY'} ({processes or 'no processes'})"


# --- step: guest image, libvirt nodes, operator, sample VM ----------------------------------------

NODE_NAMES = ["node-a", "node-b"]


def guest_image_up(world: World) -> str:
    from localenv.guest import ensure_guest_image

    return str(ensure_guest_image().kernel.parent)


def nodes_up(world: World) -> str:
    """Start only the nodes that are not running; a running node (and its domains) is left alone.

    A node whose libvirtd died is revived in its own namespaces, so libvirtd re-adopts the QEMUs
    that still run there; only a node with nothing left of it starts afresh (same port and host
    UUID as recorded)."""
    from localenv.nodes import load_nodes, start_nodes

    recorded = {n.name: n for n in load_nodes(world.dir)}
    report = []
    for name in NODE_NAMES:
        node = recorded.get(name)
        if node is not None and node.is_running():
            report.append(f"{name}={node.uri} (running)")
        elif node is not None and node.revive():
            report.append(f"{name}={node.uri} (libvirtd restarted in place)")
        elif node is not None:
            node.stop()  # leftovers of a node with no daemon left to re-enter
            node.start()
            report.append(f"{name}={node.uri} (started)")
        else:
            (node,) = start_nodes(world.dir, [name])
            report.append(f"{name}={node.uri} (started)")
    return ", ".join(report)


def nodes_down(world: World) -> str:
    from localenv.nodes import stop_nodes

    return f"stopped {', '.join(stop_nodes(world.dir)) or 'nothing'}"


def nodes_status(world: World) -> tuple[bool, str]:
    from localenv.nodes import load_nodes

    nodes = load_nodes(world.dir)
    ok = bool(nodes) and all(n.is_running() for n in nodes)
    return ok, ", ".join(f"{n.name}={'up' if n.is_running() else 'DOWN'}" for n in nodes) or "not started"


def operator_up(world: World) -> str:
    """Install the CRDs and Nodes (idempotent), then start the controller and the agents that do not
    run; running ones are kept (all restart only when the control plane itself had to restart)."""
    from localenv.cluster import ensure_namespace, install_crds, register_libvirt_nodes, stage_image
    from localenv.guest import ensure_guest_image
    from localenv.nodes import load_nodes
    from localenv.operator import NAMESPACE, OperatorProcesses

    cp = ControlPlane.load(world.dir)
    nodes = [n for n in load_nodes(world.dir) if n.name in NODE_NAMES]
    install_crds(cp)
    with cp.api_client() as api:
        ensure_namespace(api, NAMESPACE)
        register_libvirt_nodes(api, nodes)
    storage = world.dir / "storage"
    stage_image(ensure_guest_image(), storage)
    ops = OperatorProcesses.load(world.dir)
    if world.control_plane_restarted:
        ops.stop()
    wanted = {"controller": lambda: ops.start_controller(cp.kubeconfig)}
    for node in nodes:
        wanted[f"agent-{node.name}"] = lambda node=node: ops.start_node_agent(node, cp.kubeconfig, storage)
    report = []
    for name, start in wanted.items():
        ref = ops.processes.get(name)
        if ref is not None and ref.running():
            report.append(f"{name} (running)")
        else:
            start()
            report.append(f"{name} (started)")
    return ", ".join(report)


def operator_down(world: World) -> str:
    from localenv.operator import OperatorProcesses

    ops = OperatorProcesses.load(world.dir)
    ops.stop()
    return f"stopped {', '.join(ops.processes) or 'nothing'}"


def operator_status(world: World) -> tuple[bool, str]:
    from localenv.operator import OperatorProcesses

    ops = OperatorProcesses.load(world.dir)
    states = {n: r.running() for n, r in ops.processes.items()}
    return bool(states) and all(states.values()), ", ".join(
        f"{n}={'up' if ok else 'DOWN'}" for n, ok in states.items()) or "not started"


def sample_vm_up(world: World) -> str:
    from localenv.sample import run_sample_vm

    cp = ControlPlane.load(world.dir)
    kubectl = [str(cp.bin_dir / "kubectl"), "--kubeconfig", str(cp.kubeconfig)]
    get = [*kubectl, "get", "virtualmachine", "demo", "--ignore-not-found", "-o"]
    if subprocess.run([*get, "name"], capture_output=True, text=True, check=True).stdout.strip():
        phase = subprocess.run([*get, "jsonpath={.status.phase}"], capture_output=True, text=True).stdout
        # Never re-applied: that would undo what the user changed since (e.g. powerState).
        return f"demo exists (phase {phase or 'none yet'}), left as it is"
    return run_sample_vm(world.dir)


STEPS: list[Step] = [
    Step("binaries", up=binaries_up),
    Step("control-plane", up=control_plane_up, down=control_plane_down, status=control_plane_status),
    Step("guest-image", up=guest_image_up),
    Step("libvirt-nodes", up=nodes_up, down=nodes_down, status=nodes_status),
    Step("operator", up=operator_up, down=operator_down, status=operator_status),
    Step("sample-vm", up=sample_vm_up),
]


# --- commands -----------------------------------------------------------------------------------


def cmd_up(world: World, args: argparse.Namespace) -> int:
    for step in STEPS:
        began = time.monotonic()
        print(f"[{step.name}] ...", flush=True)
        summary = step.up(world)
        print(f"[{step.name}] {summary} ({time.monotonic() - began:.1f}s)", flush=True)
    world_opt = "" if world.dir == DEFAULT_WORLD.resolve() else f" --world {world.dir}"
    print(f"\nThe world in {world.dir} is up. To use it:\n{env_lines(world)}")
    print(f'or: eval "$(python -m localenv env{world_opt})"')
    return 0


def cmd_down(world: World, args: argparse.Namespace) -> int:
    for step in reversed(STEPS):
        if step.down is not None:
            print(f"[{step.name}] {step.down(world)}", flush=True)
    if args.purge:
        shutil.rmtree(world.dir, ignore_errors=True)
        print(f"removed {world.dir}")
    return 0


def cmd_status(world: World, args: argparse.Namespace) -> int:
    all_ok = True
    for step in STEPS:
        if step.status is not None:
            ok, summary = step.status(world)
            all_ok &= ok
            print(f"[{step.name}] {summary}")
    return 0 if all_ok else 1


def cmd_kubeconfig(world: World, args: argparse.Namespace) -> int:
    path = ControlPlane(world.dir).kubeconfig
    if not path.exists():
        print(f"no kubeconfig yet: run `python -m localenv up` (world {world.dir})", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_env(world: World, args: argparse.Namespace) -> int:
    cp = _recorded_control_plane(world)
    if cp is None:
        print(f"world {world.dir} was never started: run `python -m localenv up`", file=sys.stderr)
        return 1
    world.bin_dir = cp.bin_dir
    print(env_lines(world))
    return 0


def env_lines(world: World) -> str:
    bin_dir = world.bin_dir or ControlPlane.load(world.dir).bin_dir
    return f"export KUBECONFIG={ControlPlane(world.dir).kubeconfig}\nexport PATH={bin_dir}:$PATH"


# --- the kubelet world (hack/kubelet-up.sh): the chart's Pods on a real kubelet node ---------------

DEFAULT_KUBELET_WORLD = REPO_DIR / ".work" / "kubelet-world"


def _kubelet_world_dir(world: World) -> Path:
    return world.dir if world.dir != DEFAULT_WORLD.resolve() else DEFAULT_KUBELET_WORLD.resolve()


def cmd_kubelet_up(world: World, args: argparse.Namespace) -> int:
    from localenv import kubelet

    began = time.monotonic()
    cluster = kubelet.up(_kubelet_world_dir(world))
    print(f"kubelet world in {cluster.world_dir} is up ({time.monotonic() - began:.1f}s): node {kubelet.NODE_NAME} "
          f"Ready, libvirt socket {cluster.node.socket_dir}, images {kubelet.IMAGE_REPOSITORY}:{cluster.images.key}"
          "[-controller|-agent]")
    print(f"export KUBECONFIG={cluster.cp.kubeconfig}\nexport PATH={cluster.cp.bin_dir}:$PATH")
    values = cluster.world_dir / "values.yaml"
    import yaml

    values.write_text(yaml.safe_dump(kubelet.chart_values(cluster.cp, cluster.images, cluster.node,
                                                          cluster.storage)))
    print(f"helm install lvo charts/libvirt-operator -n libvirt-operator-system --create-namespace -f {values}")
    return 0


def cmd_kubelet_down(world: World, args: argparse.Namespace) -> int:
    from localenv import kubelet

    kubelet.down(_kubelet_world_dir(world))
    if args.purge:
        shutil.rmtree(_kubelet_world_dir(world), ignore_errors=True)
    print("kubelet world stopped")
    return 0


COMMANDS = {
    "up": (cmd_up, "build/verify the binaries and start the world"),
    "down": (cmd_down, "stop every process of the world"),
    "status": (cmd_status, "show what runs (exit 1 unless everything is healthy)"),
    "kubeconfig": (cmd_kubeconfig, "print the admin kubeconfig path"),
    "env": (cmd_env, "print export lines for KUBECONFIG and PATH (kubectl, helm)"),
    "kubelet-up": (cmd_kubelet_up, f"start the kubelet world (default {DEFAULT_KUBELET_WORLD})"),
    "kubelet-down": (cmd_kubelet_down, "stop the kubelet world"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    world_opt = argparse.ArgumentParser(add_help=False)
    world_opt.add_argument(
        "--world",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"world directory (default: $LVO_WORLD or {DEFAULT_WORLD})",
    )
    parser = argparse.ArgumentParser(
        prog="python -m localenv",
        parents=[world_opt],
        description="The local test world: real control plane (and later libvirt nodes and the operator).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, parents=[world_opt], help=help_text)
        if name in ("down", "kubelet-down"):
            cmd.add_argument("--purge", action="store_true", help="also delete the world directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_dir = getattr(args, "world", None) or Path(os.environ.get("LVO_WORLD") or DEFAULT_WORLD)
    world = World(dir=world_dir.resolve())
    try:
        return COMMANDS[args.command][0](world, args)
    except (procs.StartupError, FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

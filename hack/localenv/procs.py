"""Small helpers for long-running local processes that outlive their starter.

A process is started in its own session (so a Ctrl-C in the starting terminal
does not reach it), logs to a file, and is identified by a `ProcessRef`
(pid + kernel start time, which guards against PID reuse) that can be stored
as JSON and used from a fresh Python process to check or stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Popen objects of children started by this process, kept so they get reaped.
_own_children: dict[int, subprocess.Popen] = {}


class StartupError(RuntimeError):
    """A process died or did not become ready in time."""


@dataclass(frozen=True)
class ProcessRef:
    name: str
    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat
    log: str

    def running(self) -> bool:
        child = _own_children.get(self.pid)
        if child is not None and child.poll() is not None:
            return False
        stat = _read_stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.start_ticks

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ProcessRef:
        return cls(**data)


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of a live or zombie process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return fields[0], int(fields[19])


def start_detached(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcessRef:
    """Start argv in a new session, stdout+stderr appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    _own_children[child.pid] = child
    stat = _read_stat(child.pid)
    return ProcessRef(name, child.pid, stat[1] if stat else -1, str(log_path))


def stop(ref: ProcessRef, timeout: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL it after timeout; wait until it is gone."""
    if not ref.running():
        _reap(ref.pid)
        return
    _signal_group(ref.pid, signal.SIGTERM)
    if not _wait_gone(ref, timeout):
        _signal_group(ref.pid, signal.SIGKILL)
        if not _wait_gone(ref, 5.0):
            raise RuntimeError(f"{ref.name} (pid {ref.pid}) survived SIGKILL")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # start_detached made pid the group leader


def _wait_gone(ref: ProcessRef, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(ref.pid)
        if not ref.running():
            return True
        time.sleep(0.05)
    return False


def _reap(pid: int) -> None:
    child = _own_children.get(pid)
    if child is not None and child.poll() is not None:
        del _own_children[pid]


def free_port(preferred: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free right now (preferred one if possible)."""
    if preferred and _can_bind(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        # Like Go's listeners: a port whose old connections sit in TIME_WAIT is still usable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    watch: Iterable[ProcessRef] = (),
    interval: float = 0.1,
) -> None:
    """Poll check() until true; fail early with its log if a watched process dies."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        for ref in watch:
            if not ref.running():
                raise StartupError(f"{ref.name} exited while waiting for {what}; {ref.log}:\n{ref.log_tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {r.log}\n{r.log_tail(10)}" for r in watch)
            raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
        time.sleep(interval)


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)

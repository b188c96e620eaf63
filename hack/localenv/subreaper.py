"""A libvirt node's init: runs the node's launch command, then reaps every process
of the node the moment it exits.

virtlogd, libvirtd and QEMU daemonize, so they become orphans. As a child
subreaper (prctl PR_SET_CHILD_SUBREAPER) this process, not PID 1, inherits them
and reaps them at once; libvirtd reports a domain STOPPED only after its QEMU's
PID is gone, so a slow reaper would delay that event. (A real DaemonSet needs the
same: libvirtd's container must have a PID 1 that reaps promptly, e.g. tini.)

Usage: ``python subreaper.py PIDFILE LOGFILE COMMAND [ARG...]`` (stdlib only).
The process that was started exits with COMMAND's exit code once COMMAND is done;
the reaper stays behind in a session of its own, writes its PID to PIDFILE and
exits when it has no children left (or on SIGTERM).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
COMM = "lvo-subreaper"  # the reaper's /proc/<pid>/comm


def main(argv: list[str]) -> int:
    pidfile, logfile, *command = argv
    ready_r, ready_w = os.pipe()  # the reaper sends COMMAND's exit code through it
    if os.fork():
        os.close(ready_w)
        code = _read_all(ready_r)
        if not code:
            print("subreaper: the reaper died before the launch finished", file=sys.stderr)
            return 1
        return int(code)
    os.close(ready_r)
    _become_reaper(pidfile)
    launcher = _spawn(command)
    _detach_stdio(logfile)  # the launcher keeps the starter's stdio for its error messages
    _reap_all(launcher, ready_w)
    return 0


def _become_reaper(pidfile: str) -> None:
    os.setsid()  # no terminal signals from the starter's session
    os.chdir("/")
    libc = ctypes.CDLL(None, use_errno=True)
    for option, arg in ((PR_SET_CHILD_SUBREAPER, 1), (PR_SET_NAME, ctypes.c_char_p(COMM.encode()))):
        if libc.prctl(option, arg, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    tmp = f"{pidfile}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(tmp, pidfile)


def _spawn(command: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec would keep that
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    return pid


def _detach_stdio(logfile: str) -> None:
    log = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def _reap_all(launcher: int, ready_w: int) -> None:
    """Waits for children (adopted orphans included) until none is left."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == launcher:
            code = os.waitstatus_to_exitcode(status)
            os.write(ready_w, str(code if code >= 0 else 128 - code).encode())
            os.close(ready_w)
    print(f"{COMM} {os.getpid()}: no children left, exiting", flush=True)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 64):
        data += chunk
    return data


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

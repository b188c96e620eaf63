"""qemu-img and file copies, confined to the storage roots (blocking: run them in a thread).

Every path is checked with symlinks resolved: it must lie under one of `roots`. Nothing here ever
overwrites a file: a new file is written under a temporary name in the same directory and then
hard-linked to its final name, which fails when that name exists (no window in which an existing
file could be replaced). qemu-img reads with -U (force-share), so images a running QEMU holds can
be inspected.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from libvirt_operator.storage.chain import Chain, chain_from_qemu_img
from libvirt_operator.storage.errors import StorageError

QEMU_IMG = "qemu-img"
_CHECK_UNSUPPORTED = 63  # qemu-img check: "This image format does not support checks" (raw)
_CHECK_CORRUPT, _CHECK_LEAKS = 2, 3


@dataclass(frozen=True)
class CheckResult:
    path: str
    supported: bool  # False for formats without checks (raw)
    corruptions: int = 0
    leaks: int = 0
    errors: int = 0  # check-errors: the check itself could not read something

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0 and self.errors == 0


def confine(path: str, roots: Iterable[str]) -> str:
    """The absolute, normalized `path`, after checking that it resolves (symlinks included) under one
    of `roots`: StorageError PathNotAllowed otherwise."""
    roots = tuple(roots)
    if not os.path.isabs(path):
        raise StorageError("PathNotAllowed", f"{path!r} is not an absolute path")
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip("/") + "/"):
            return os.path.normpath(path)
    raise StorageError("PathNotAllowed", f"{path} (resolves to {real}) is outside the storage roots "
                                         f"({', '.join(roots) or 'none'})")


def _new_file(path: str, roots: Iterable[str]) -> str:
    path = confine(path, roots)
    if os.path.lexists(path):
        raise StorageError("FileExists", f"{path} exists; refusing to overwrite it")
    if not os.path.isdir(os.path.dirname(path)):
        raise StorageError("FileNotFound", f"directory {os.path.dirname(path)} does not exist")
    return path


def _existing_file(path: str, roots: Iterable[str]) -> str:
    path = confine(path, roots)
    if not os.path.isfile(path):
        raise StorageError("FileNotFound", f"{path} does not exist")
    return path


def _temp_beside(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.lvo-tmp-{secrets.token_hex(4)}")


def _publish(tmp: str, path: str) -> None:
    """Gives the finished temporary file its final name, never replacing an existing file."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise StorageError("FileExists", f"{path} appeared meanwhile; refusing to overwrite it") from None
    finally:
        os.unlink(tmp)


def _qemu_img(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    except OSError as err:
        raise StorageError("QemuImgFailed", f"cannot run {QEMU_IMG}: {err}") from err
    if done.returncode not in ok:
        raise StorageError("QemuImgFailed", f"qemu-img {' '.join(args)}: "
                                            f"{done.stderr.strip() or f'exit {done.returncode}'}")
    return done


def create_overlay(path: str, backing: str, backing_format: str, *, roots: Iterable[str],
                   size: int | None = None) -> Chain:
    """A new qcow2 file at `path` whose backing file is `backing` (format given explicitly: -F).
    `size` (bytes) skips opening the backing file (qemu-img -u), for a backing file a running QEMU
    holds with a write lock. Returns the new file's chain."""
    roots = tuple(roots)
    path = _new_file(path, roots)
    backing = _existing_file(backing, roots)
    if backing_format not in ("qcow2", "raw"):
        raise StorageError("UnsupportedFormat", f"backing format {backing_format!r} (qcow2 or raw)")
    tmp = _temp_beside(path)
    args = ["create", "-q", "-f", "qcow2", "-F", backing_format, "-b", backing]
    if size is not None:
        args += ["-u", tmp, str(size)]
    else:
        args += [tmp]
    try:
        _qemu_img(*args)
    except StorageError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _publish(tmp, path)
    return chain(path, roots=roots)


def create_image(path: str, fmt: str, size: int, *, roots: Iterable[str]) -> None:
    """A new empty image (qcow2, or a sparse raw file) of `size` bytes at `path`, without backing file."""
    roots = tuple(roots)
    path = _new_file(path, roots)
    if fmt not in ("qcow2", "raw"):
        raise StorageError("UnsupportedFormat", f"format {fmt!r} (qcow2 or raw)")
    tmp = _temp_beside(path)
    try:
        _qemu_img("create", "-q", "-f", fmt, tmp, str(size))
    except StorageError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _publish(tmp, path)


def set_backing(path: str, backing: str, backing_format: str, *, roots: Iterable[str]) -> None:
    """Rewrites the backing file name in the header of the qcow2 `path` (qemu-img rebase -u: no data is
    read or written), e.g. for a copied middle layer whose backing file was copied too."""
    roots = tuple(roots)
    path, backing = _existing_file(path, roots), confine(backing, roots)
    _qemu_img("rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b", backing, path)


def backing_file(path: str, *, roots: Iterable[str]) -> tuple[str, str] | None:
    """(backing path, its format) as the header of `path` names it, or None; the backing file itself is
    not opened (it may be gone)."""
    path = _existing_file(path, roots)
    entry = json.loads(_qemu_img("info", "-U", "--output=json", path).stdout)
    name = entry.get("full-backing-filename") or entry.get("backing-filename")
    if not name:
        return None
    name = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
    return os.path.normpath(name), entry.get("backing-filename-format", "")


def info(path: str, *, roots: Iterable[str]) -> list[dict[str, Any]]:
    """`qemu-img info --backing-chain --output=json` of `path`: one entry per layer, active first."""
    path = _existing_file(path, roots)
    entries = json.loads(_qemu_img("info", "-U", "--backing-chain", "--output=json", path).stdout)
    return entries if isinstance(entries, list) else [entries]


def chain(path: str, *, roots: Iterable[str]) -> Chain:
    """The chain of `path` as qemu-img reads it; every layer must lie under the roots too."""
    roots = tuple(roots)
    found = chain_from_qemu_img(path, info(path, roots=roots))
    for layer in found.backing:
        confine(layer.path, roots)
    return found


def verify_overlay(path: str, backing: str, *, roots: Iterable[str]) -> Chain:
    """For a pre-created overlay (REUSE_EXT): it exists, is qcow2, and its backing file is `backing`
    (StorageError FileNotFound / BackingMismatch otherwise)."""
    found = chain(path, roots=roots)
    below = found.backing_of(found.active.path)
    if found.active.format != "qcow2" or below is None or below.path != os.path.normpath(backing):
        raise StorageError("BackingMismatch", f"{path} is {found.active.format or 'unknown'} backed by "
                                              f"{below.path if below else 'nothing'}, not a qcow2 overlay of {backing}")
    return found


def check(path: str, *, roots: Iterable[str]) -> CheckResult:
    """`qemu-img check` of one file (not its backing files)."""
    path = _existing_file(path, roots)
    done = _qemu_img("check", "-U", "--output=json", path, ok=(0, _CHECK_CORRUPT, _CHECK_LEAKS, _CHECK_UNSUPPORTED))
    if done.returncode == _CHECK_UNSUPPORTED:
        return CheckResult(path, supported=False)
    report = json.loads(done.stdout)
    return CheckResult(path, True, corruptions=report.get("corruptions", 0), leaks=report.get("leaks", 0),
                       errors=report.get("check-errors", 0))


def copy_sparse(src: str, dst: str, *, roots: Iterable[str]) -> None:
    """A byte-for-byte copy of `src` at the new file `dst`, holes kept as holes (cp --sparse=always)."""
    roots = tuple(roots)
    src = _existing_file(src, roots)
    dst = _new_file(dst, roots)
    tmp = _temp_beside(dst)
    done = subprocess.run(["cp", "--sparse=always", "--preserve=mode", src, tmp], capture_output=True, text=True)
    if done.returncode != 0:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise StorageError("CopyFailed", f"cp {src} {dst}: {done.stderr.strip()}")
    _publish(tmp, dst)


def remove(path: str, *, roots: Iterable[str]) -> bool:
    """Deletes one image file under the roots (never a directory); False if it was already gone."""
    path = confine(path, roots)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            raise StorageError("PathNotAllowed", f"{path} is a directory")
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True

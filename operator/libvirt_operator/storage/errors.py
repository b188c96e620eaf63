"""The one exception of the storage package, with a reason a status condition can carry."""

from __future__ import annotations


class StorageError(Exception):
    """A refused or failed file operation.

    reason: CamelCase (PathNotAllowed, FileExists, FileNotFound, BackingMismatch, QemuImgFailed,
    CopyFailed); message: what happened, naming the file.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

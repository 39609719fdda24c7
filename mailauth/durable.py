"""Small blocking file helpers for durable writes (run them in a worker thread)."""

from __future__ import annotations

import os
from typing import Optional


def fsyncDirectory(path: str) -> None:
    """fsync the folder C{path}, making the names created or renamed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeDurably(path: str, data: bytes, owner: Optional[os.stat_result] = None) -> None:
    """
    Create C{path} (it must not exist) holding C{data}, fsynced, mode 0600;
    owned like C{owner} when we run as root.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> bool:
    """Remove C{path}; whether it was there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True

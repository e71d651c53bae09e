"""Files only their owner may read: the registry's database, blobs, uploaded training files, the
adapter cache and the logs hold every tenant's data, whatever the umask says.

Directories adapterdeck creates are 0700 and files 0600; a directory that already exists is left as
it is (an operator may have set it up on purpose). The long-running processes (``serve`` and
``worker``) also run under the umask 077, so what libraries write for them (vLLM's log, a training
run's checkpoints) is private too.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
PRIVATE_UMASK = 0o077


def private_dir(path: str | Path) -> Path:
    """``path`` as a directory, creating it and any missing parents with mode 0700."""
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it first
            continue
        os.chmod(directory, DIR_MODE)  # whatever the umask took away from the owner
    return path


def make_private(path: str | Path) -> None:
    """Make a file adapterdeck wrote readable by its owner only."""
    os.chmod(path, FILE_MODE)


def create_private(path: str | Path) -> None:
    """Create ``path`` as an empty file with mode 0600 unless it exists (then leave it as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def private_umask() -> int:
    """Make every file this process creates from now on private; returns the umask it replaced."""
    return os.umask(PRIVATE_UMASK)

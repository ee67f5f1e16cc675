"""Small file helpers shared by the writers of run folders."""

from __future__ import annotations

import os
from pathlib import Path


def make_user_readable(folder: Path) -> None:
    """Give `folder` (made by tempfile.mkdtemp, mode 700) and its files the modes the user's umask sets."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)

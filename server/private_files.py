"""The server's files are private: the state directory 0700, every file in it 0600.

What lives there names users and their sessions (startup.xml, the pending-commit record)
or is a secret (SSH host keys, the TLS key): nobody but the server's own user has any
business reading it. New files get that from the process's umask (077, set before anything
is written); files an earlier version left readable are tightened on start, and each one
tightened is logged.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077


class SharedStateDir(RuntimeError):
    """The state directory is one others write to (/tmp, say): it cannot be made private
    without breaking them, and the server's secrets must not live there."""


def make_private(state_dir: Path, *others: Path | None) -> list[Path]:
    """Set the umask to 077, create ``state_dir`` (0700) or take group and other access
    away from it and from the files in it, and from each of ``others`` (the users file,
    say) that exists. Returns what was changed.

    Only the directory's own entries are touched, never what lies deeper or behind a
    symbolic link: the server writes nothing deeper, and a directory given by mistake
    should lose as little as possible. What cannot be changed is reported, not fatal."""
    os.umask(PRIVATE_UMASK)
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = state_dir.stat()
    if info.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise SharedStateDir(f"the state directory {state_dir} is shared (writable by "
                             "everyone); give the server a directory of its own")
    changed: list[Path] = []
    _tighten(state_dir, changed)
    with os.scandir(state_dir) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                _tighten(Path(entry.path), changed)
    for path in others:
        if path is not None and os.path.lexists(path):
            _tighten(Path(path), changed)
    return changed


def _tighten(path: Path, changed: list[Path]) -> None:
    try:
        info = path.lstat()
    except OSError:
        return
    if stat.S_ISLNK(info.st_mode):
        log.debug("%s is a symbolic link; its mode is left as it is", path)
        return
    mode = stat.S_IMODE(info.st_mode)
    private = mode & ~0o077
    if private == mode:
        return
    try:
        os.chmod(path, private)
    except OSError as exc:
        log.warning("cannot make %s private (mode %04o): %s", path, mode, exc.strerror or exc)
        return
    log.warning("%s was open to other users (mode %04o); now %04o", path, mode, private)
    changed.append(path)

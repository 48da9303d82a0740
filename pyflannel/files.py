"""The one way pyflannel replaces a file: a temporary file in the same folder, fsynced, renamed over the old one,
and the folder fsynced, so a reader (or a reboot) sees the old file or the new one, never half of either."""
from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path: str, text: str, mode: int = 0o644, folder_mode: int = 0o755, durable: bool = True) -> None:
    """Replace `path` with `text`; OSError (strerror names the problem) if that cannot be done. Readers see the old
    text or the new, never a part. `durable` also syncs the file and its folder to disk before returning, so a crash
    does not lose the change; an fsync can take milliseconds on a busy disk."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=folder_mode, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_file(path: str) -> None:
    """Delete `path`; a file that is gone already is no error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

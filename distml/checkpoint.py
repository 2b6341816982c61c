"""Saving and loading model weights safely.

Files are written atomically (temporary file in the same directory, fsync,
rename), so an interrupted job never leaves a half-written file or destroys
the previous one. Loading uses `weights_only=True`: a checkpoint cannot run code.
"""
import os
import tempfile

import torch

from .config import UsageError

__all__ = ["atomic_write", "save_state_dict", "load_state_dict"]


def atomic_write(path, write):
    """Call `write(file)` on a temporary file, then move it over `path` in one step.

    A symbolic link is followed (its target is replaced), and the new file gets
    the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def save_state_dict(model, path):
    """Write `model.state_dict()` to `path` atomically."""
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def load_state_dict(path):
    """A state_dict saved by distml (or any tensors-only torch.save file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"no such checkpoint: {path}")
    except Exception as e:
        raise UsageError(f"{path} is not a readable weights-only checkpoint: {e}")

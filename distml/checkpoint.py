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
    """Call `write(file)` on a temporary file, then move it over `path` in one step."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

"""Checkpoints (one dataclass is the format) and model files, written and read safely.

Files are written atomically (temporary file in the same directory, fsync,
rename, directory fsync), so an interrupted job, a crash or a second signal
never leaves a half-written file or destroys the previous one; old
checkpoints are pruned only after the new one is in place. A checkpoint file
is `torch.save({"distml_checkpoint": version, "sha256": ..., "payload": uint8 tensor})`
where the payload is the torch.save of a `Checkpoint`'s fields; the checksum
is verified before the payload is read. Everything is loaded with
`weights_only=True`: a file cannot run code.
"""
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field

import torch

from .config import UsageError

__all__ = ["Checkpoint", "FORMAT_VERSION", "write_checkpoint", "read_checkpoint", "newest_checkpoint", "set_aside",
           "list_checkpoints", "checkpoint_number", "atomic_write", "save_state_dict", "load_state_dict"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped.

    `position`: {"epoch", "step"} (steps done in that epoch; federated: rounds
    as epochs of one step) and "units" (units of work done in all, the file's
    number). `ranks`: each rank's own state (torch RNG, BatchNorm buffers,
    a worker's place in its data), indexed by rank. `config` and `history`
    are JSON text (plain data, whatever the records hold).
    """
    mode: str
    world_size: int
    config: str
    data: str
    position: dict
    model: dict
    strategy: dict
    ranks: list
    history: str = "[]"
    metrics_bytes: int = 0
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)


def write_checkpoint(ckpt, directory, keep):
    """Write `ckpt` as DIR/checkpoint-<units>.pt atomically, then keep only the newest `keep`; returns the path."""
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt)}, buffer)
    payload = buffer.getbuffer()  # no copy; as a uint8 tensor it is stored raw (bytes would be pickled)
    wrapper = {"distml_checkpoint": ckpt.version, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(payload, dtype=torch.uint8)}
    path = os.path.join(directory, f"checkpoint-{ckpt.position['units']:09d}.pt")
    atomic_write(path, lambda f: torch.save(wrapper, f))
    for old in list_checkpoints(directory)[:-keep]:
        os.unlink(old)
    for name in os.listdir(directory):  # what a killed writer left (only root writes here)
        if name.startswith(".tmp-") and "-checkpoint-" in name:
            os.unlink(os.path.join(directory, name))
    return path


def list_checkpoints(directory):
    """Checkpoint files in `directory`, oldest first (by the number in their name)."""
    if not os.path.isdir(directory):
        return []
    found = [name for name in os.listdir(directory) if _NAME.match(name)]
    return [os.path.join(directory, name) for name in sorted(found, key=checkpoint_number)]


def checkpoint_number(path):
    """The units of work done when the checkpoint at `path` (named checkpoint-<units>.pt) was taken."""
    return int(_NAME.match(os.path.basename(path)).group(1))


class DamagedCheckpoint(UsageError):
    """A checkpoint file that does not read or verify (a resume skips it for the one before); a newer
    format or a file that is not a checkpoint at all is a plain UsageError, which stops the resume."""


def read_checkpoint(path):
    """The Checkpoint in `path`, verified; UsageError (one line) if it is not a good distml checkpoint."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of pickle protocols before refusing: one line only
            wrapper = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume: no such checkpoint: {path}")
    except IsADirectoryError:
        raise UsageError(f"--resume: {path} is a directory; give a checkpoint file")
    except Exception as e:  # truncated, empty, random bytes, or a pickle of arbitrary objects
        trouble = _read_error(path)
        if trouble or isinstance(e, MemoryError):  # the file may be fine: not damage, so no older one instead
            raise UsageError(f"--resume: cannot load {path} ({trouble or 'MemoryError'})")
        raise DamagedCheckpoint(f"--resume: {path} is not a readable distml checkpoint ({_unreadable(path, e)})")
    if not isinstance(wrapper, dict) or "distml_checkpoint" not in wrapper:
        raise UsageError(f"--resume: {path} is not a distml checkpoint (a plain state_dict such as "
                         f"--save-model writes has no optimizer state or position to resume from)")
    version = wrapper["distml_checkpoint"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(f"--resume: {path} has checkpoint format {version!r}; this distml reads "
                         f"format {FORMAT_VERSION} and older: upgrade distml")
    payload = wrapper.get("payload")
    payload = payload.numpy() if isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 else None
    if payload is None or hashlib.sha256(payload).hexdigest() != wrapper.get("sha256"):
        raise DamagedCheckpoint(f"--resume: {path} fails its checksum (damaged or incompletely copied)")
    try:
        fields = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        return Checkpoint(**fields)
    except Exception as e:  # the bytes are what was written (checksum): another version's format, not damage
        raise UsageError(f"--resume: {path} holds a payload this distml cannot read, though its checksum is right "
                         f"(written by another version?): {type(e).__name__}: {_first_line(e)}")


def newest_checkpoint(directory):
    """(path, Checkpoint, damaged) for the newest checkpoint in `directory` that reads and verifies,
    or (None, None, []); `damaged`: (path, why) of each newer one that failed.

    If every one fails, the newest's error is raised; so is a newer format or a
    file that is no distml checkpoint (not damage: resuming from an older one
    would silently go back in time). Nothing is moved here: the
    caller sets the damaged ones aside (set_aside) once its run is sure to go
    ahead, so a run refused later leaves the directory as it found it.
    """
    paths = list_checkpoints(directory)
    first_error, damaged = None, []
    for path in reversed(paths):
        try:
            return path, read_checkpoint(path), damaged
        except DamagedCheckpoint as e:
            first_error = first_error or e
            damaged.append((path, str(e).removeprefix("--resume: " + path + " ")))
    if first_error is not None:
        raise UsageError(f"--resume: no valid checkpoint in {directory}; the newest, {damaged[0][0]}, "
                         f"{damaged[0][1]}")
    return None, None, []


def set_aside(damaged, warn):
    """Move each damaged checkpoint to NAME.damaged (kept for a look, out of the way of pruning and of
    "newer than" checks), with one `warn(line)` each."""
    for bad, why in damaged:
        os.replace(bad, bad + ".damaged")
        warn(f"distml: warning: skipping {bad} (moved to {os.path.basename(bad)}.damaged): {why}")


def _read_error(path):
    """Why reading `path` as plain bytes fails (permissions, I/O, a stale handle), or None if it reads."""
    try:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, ValueError) as e:  # ValueError: a NUL in a path from the Python API
        return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
    return None


def _unreadable(path, error):
    """Why torch could not load `path`, a file that reads as bytes (_read_error), in our words where
    torch's would mislead."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    refused = "GLOBAL" in str(error.__context__ or "")  # a pickle naming code to run: refused, not garbled
    if not refused and not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its directory last
        return "not a zip archive as torch.save writes: cut short, or another kind of file"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error):
    """The error's gist in one line. torch's refusal under weights_only=True opens with advice to load
    unsafely, which is not ours to give; the unpickler's own reason is the exception it replaced."""
    text = str(error)
    if text.startswith("Weights only load failed") and error.__context__ is not None:
        text = "refused by weights-only loading: " + str(error.__context__)
    return (text.strip().splitlines() or [""])[0][:200]


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"no such checkpoint: {path}")
    except Exception as e:
        raise UsageError(f"{path} is not a readable weights-only checkpoint "
                         f"({_read_error(path) or _unreadable(path, e)})")

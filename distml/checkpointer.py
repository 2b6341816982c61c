"""Checkpoints and exact resume for your own loop, in the CLI's format and with its checks.

    ckpt = distml.Checkpointer("ckpt", model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
    state = ckpt.restore() or {"epoch": 0}     # None the first time; else what save() was given
    ...
    ckpt.save(epoch=epoch)                     # every rank calls it; root writes

A save is a collective: every rank's RNG states travel to root, which writes
DIR/checkpoint-<n>.pt atomically (checkpoint.py: a version, a SHA-256 of the
payload, weights-only loading) and keeps the newest `keep`. restore() reads
the newest file that verifies (a damaged one is set aside with a warning),
refuses with one line (a distml.UsageError on every rank) a file of another
model or without a piece this Checkpointer restores, and loads every piece on
every rank. RNG states come back on the world size they were saved on; on
another, each rank keeps its own (what `distml.seed` gave it).
"""
import os
import random
import sys

import numpy as np
import torch

from .agreement import RankFailure, everywhere
from .checkpoint import (Checkpoint, checkpoint_number, list_checkpoints, newest_checkpoint, set_aside,
                         write_checkpoint)
from .config import UsageError
from .matching import negotiate

__all__ = ["Checkpointer"]

_PLAIN = (bool, int, float, str, type(None), torch.Tensor)


class Checkpointer:
    """Saves and restores `model`, `optimizer`, `scheduler`, `sampler` (any of them) and your own values."""

    def __init__(self, directory, *, model=None, optimizer=None, scheduler=None, sampler=None, keep=2, comm=None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        pieces = dict(model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
        self.pieces = {name: piece for name, piece in pieces.items() if piece is not None}
        self.directory, self.keep = os.fspath(directory), keep
        if comm is None:
            from .api import _loop
            comm = _loop()
        self.comm, self.saved = comm, 0  # saved: the number of the last checkpoint written or restored

    # -- save ---------------------------------------------------------------------------------------
    def save(self, *, rank_state=None, **extra):
        """Write a checkpoint of every piece and `extra` (root's: plain values, as numbers, strings,
        tensors, and lists and dicts of them); returns its path. `rank_state`: plain values of each
        rank's own (an LSTM's hidden state), given back to the same rank by restore(). A collective:
        call it on every rank."""
        _check_plain(extra, "save()")
        _check_plain(rank_state, "save(rank_state=)")
        comm, sampler = self.comm, self.pieces.get("sampler")
        where = f", sampler at epoch {sampler.epoch} step {sampler.step}" if sampler else ""
        negotiate(comm, f"distml.Checkpointer.save({sorted(self.pieces)}{where})")
        ranks = comm.gather_object({"rng": _rng_states(), "state": rank_state})
        number = max([self.saved, *map(checkpoint_number, list_checkpoints(self.directory))]) + 1 \
            if comm.is_root else None
        # on every rank: a piece's state_dict() may be a collective (a sharded optimizer gathers its slices)
        state = {name: piece.state_dict() for name, piece in self.pieces.items() if name != "model"}
        path, self.saved = _on_root(comm, lambda: (self._write(number, ranks, extra, state), number))
        return path

    def _write(self, number, ranks, extra, state):
        model = self.pieces.get("model")
        ckpt = Checkpoint(mode="loop", world_size=self.comm.size, config=repr(sorted(self.pieces)),
                          data="", position={"units": number}, model=model.state_dict() if model else {},
                          strategy=state, ranks=ranks, extra=extra)
        return write_checkpoint(ckpt, self.directory, self.keep)

    # -- restore -------------------------------------------------------------------------------------
    def restore(self):
        """Load the newest valid checkpoint into every piece; returns what save() was given, or None
        where the directory has none (with "rank_state": this rank's, or None on another world size,
        where save() had one). A collective: call it on every rank."""
        comm = self.comm
        negotiate(comm, f"distml.Checkpointer.restore({sorted(self.pieces)})")
        path, ckpt = _on_root(comm, self._find)  # pickled: rare, and small next to the training
        if ckpt is None:
            return None
        same_world = ckpt.world_size == comm.size
        if same_world:  # first: the sampler notes the state its epoch continues from
            _set_rng_states(ckpt.ranks[comm.rank]["rng"])
        for name, piece in self.pieces.items():
            piece.load_state_dict(ckpt.model if name == "model" else ckpt.strategy[name])
        self.saved = ckpt.position["units"]
        if comm.is_root:
            print(f"distml: restored {path}", file=sys.stderr, flush=True)
        saved_rank_state = any(r["state"] is not None for r in ckpt.ranks)
        return {**ckpt.extra, **({"rank_state": ckpt.ranks[comm.rank]["state"] if same_world else None}
                                 if saved_rank_state else {})}

    def _find(self):
        """(path, Checkpoint) of the newest valid checkpoint, checked against these pieces, or (None, None)."""
        try:
            path, ckpt, damaged = newest_checkpoint(self.directory)
        except UsageError as e:
            raise UsageError(f"distml.Checkpointer: {str(e).removeprefix('--resume: ')}") from None
        if ckpt is None:
            return None, None
        _check_pieces(path, ckpt, self.pieces)
        set_aside(damaged, lambda line: print(line, file=sys.stderr, flush=True))
        return path, ckpt


def _on_root(comm, fn):
    """fn() on root, its value on every rank; its error raised on every rank alike (UsageError stays one)."""
    outcome = None
    if comm.is_root:
        try:
            outcome = ("ok", fn())
        except UsageError as e:
            outcome = ("usage", str(e))
        except Exception as e:  # noqa: BLE001  (raised on every rank below)
            outcome = ("crash", f"{type(e).__name__}: {e}")
    kind, value = comm.bcast_object(outcome)
    if kind == "usage":
        raise everywhere(UsageError(value))
    if kind == "crash":
        raise everywhere(RankFailure(0, value))
    return value


def _check_pieces(path, ckpt, pieces):
    """UsageError unless `ckpt` (a loop's) holds every piece, the model with these shapes, the sampler its data."""
    if ckpt.mode != "loop":
        raise UsageError(f"distml.Checkpointer: {path} was written by `distml train` ({ckpt.mode} mode); "
                         f"resume it with distml train --resume")
    missing = [name for name in pieces if name != "model" and name not in ckpt.strategy]
    if "model" in pieces and not ckpt.model:
        missing.insert(0, "model")
    if missing:
        raise UsageError(f"distml.Checkpointer: {path} holds no {' or '.join(missing)} state (saved: "
                         f"{ckpt.config})")
    if "model" in pieces:
        _check_model(path, ckpt.model, pieces["model"].state_dict())
    check = getattr(pieces.get("sampler"), "check_state", None)  # a ShardSampler's
    if check is not None:
        try:
            check(ckpt.strategy["sampler"])
        except ValueError as e:
            raise UsageError(f"distml.Checkpointer: {path}: {e}") from None


def _check_model(path, saved, mine):
    """UsageError naming the first difference between the saved model's tensors and this one's."""
    for name in sorted(set(saved) | set(mine)):
        if name not in mine or name not in saved:
            where = "this model has no" if name not in mine else "the checkpoint has no"
            raise UsageError(f"distml.Checkpointer: {path} holds another model ({where} {name!r})")
        a, b = saved[name], mine[name]
        if torch.is_tensor(a) and (a.shape != b.shape or a.dtype != b.dtype):
            raise UsageError(f"distml.Checkpointer: {path} holds another model ({name!r} is {a.dtype} "
                             f"{list(a.shape)} there, {b.dtype} {list(b.shape)} here)")


def _check_plain(value, where):
    """TypeError unless `value` is plain data a weights-only load reads back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"distml.Checkpointer.{where}: key {key!r} is not a str or int")
            _check_plain(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, where)
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"distml.Checkpointer.{where}: {type(value).__name__} is not plain data (numbers, "
                        f"strings, tensors, and lists and dicts of them): a checkpoint is loaded with "
                        f"weights_only=True, which runs no code")


def _rng_states():
    """This rank's torch, numpy and random states, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, cached], "random": random.getstate()}


def _set_rng_states(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))


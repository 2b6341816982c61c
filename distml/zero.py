"""The sharded optimizer (ZeRO stages 1 and 2): each rank holds and steps 1/N of the optimizer.

Each parameter group's trainable parameters live in one flat buffer, padded to
a multiple of the world size and cut into equal contiguous slices (a parameter
may span two ranks, as in DeepSpeed; whole parameters per rank, as PyTorch's
ZeroRedundancyOptimizer assigns them, leave the ranks unevenly loaded).
`.data` of each parameter is a view into that buffer. A step reduce-scatters
the summed gradients (a ring of MPI Sendrecv, in pieces of at most `chunk_mb`) so
that each rank holds its slice's sum, runs the user's optimizer class on that
slice alone (one fused tensor per group, so any element-wise update works:
SGD, Adam, AdamW, Adagrad, RMSprop), and all-gathers the updated slices in
place. The bytes moved equal one Allreduce's; the optimizer state and the
step's work are 1/N of the replica's.

Stage 1 keeps the whole gradient in a flat buffer of the same layout (backward
writes into it, as the reducer's buckets); stage 2 keeps only this rank's
slice: as soon as backward has finished every gradient of a bucket, the bucket
is copied out piece by piece (one piece-sized buffer), reduce-scattered and its
gradients freed, so whole gradients live only until their bucket is complete. Buckets go in one fixed
order on every rank (the reverse of the parameters', as backward finishes
them), and those backward did not finish go at step(), so ranks with fewer
micro-batches (an uneven last batch) or unused parameters still match.

Checkpoints hold the whole optimizer state per parameter in the unsharded
optimizer's own format (gathered, unpadded), so any world size, sharded or
not, resumes from them.
"""
import inspect
import math
import weakref
from itertools import accumulate

import torch

from .flat import Bucket, zeros
from .nonfinite import grads_finite
from .reducer import COMPRESSION, DEFAULT_CHUNK_MB, weak_grad_hook

__all__ = ["ShardedOptimizer", "ELEMENTWISE", "STAGES"]

# Updates that treat each element on its own, so that one slice steps as the whole would. Others are
# refused: LBFGS's line search needs the whole vector, Adafactor factors rows and columns, Muon
# orthogonalises whole matrices, SparseAdam needs sparse gradients.
ELEMENTWISE = tuple(getattr(torch.optim, name) for name in ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta",
                                                            "RMSprop", "Rprop", "NAdam", "RAdam", "ASGD"))
STAGES = (1, 2)
_LIVE = weakref.WeakSet()  # sharded optimizers alive: two over one parameter would fight over its .grad


class _FlatGroup:
    """One parameter group's parameters in a padded flat buffer, and this rank's slice of it.

    `buckets`: (first, stop, lo, hi): params[first:stop] fill flat elements [lo, hi) (stage 2's
    units of reduction; the last one reaches the padded end). Stage 1's gradients: `grads`, a
    Bucket whose padding rides as its zero `extra`.
    """

    def __init__(self, params, rank, size, stage, bucket_bytes):
        dtype = params[0].dtype
        if any(p.dtype != dtype for p in params):
            raise ValueError("a parameter group of the sharded optimizer holds one dtype; put parameters "
                             "of other dtypes in groups of their own")
        self.params = params
        self.offsets = [0, *accumulate(p.numel() for p in params)]
        total = self.offsets[-1]
        self.slice_len = math.ceil(total / size)
        self.padded = self.slice_len * size
        self.data = zeros(self.padded, dtype)
        for p, offset in zip(params, self.offsets):
            self.data[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.data[offset:offset + p.numel()].view_as(p)
        self.start = rank * self.slice_len
        self.shard = torch.nn.Parameter(self.data[self.start:self.start + self.slice_len])  # data's memory
        self.shard.grad = zeros(self.slice_len, dtype)
        self.grads = Bucket(params, extra=self.padded - total) if stage == 1 else None
        self.buckets, first = [], 0  # as the reducer's: at most bucket_bytes, or one larger parameter alone
        for k in range(1, len(params) + 1):
            if k == len(params) or (self.offsets[k + 1] - self.offsets[first]) * params[0].element_size() > bucket_bytes:
                self.buckets.append((first, k, self.offsets[first], self.padded if k == len(params) else self.offsets[k]))
                first = k

    def counts(self, lo, hi):
        """Each rank's number of elements of flat range [lo, hi) (its slice's overlap)."""
        L = self.slice_len
        return [max(0, min(hi, (r + 1) * L) - max(lo, r * L)) for r in range(self.padded // L)]

    def mine(self, lo, hi):
        """This rank's part of flat range [lo, hi), as a range of its slice."""
        return max(lo, self.start) - self.start, min(hi, self.start + self.slice_len) - self.start


class ShardedOptimizer:
    """ZeRO stage 1 or 2 around `optimizer` (built over the model's parameters as usual).

    Loop: zero_grad(), backward (summed losses over the global batch, or op="average"),
    step(), or reduce_gradients(), clip_grad_norm_(), step_and_gather(). `param_groups`
    are the wrapped optimizer's (schedulers set lr there); its `state` stays empty: the
    state lives in the slices, and state_dict() (a collective) gathers it.
    `passes`: backward passes per step (stage 2 reduces a bucket in the last one). `model`: its
    parameters' order tells stage 2 which bucket backward finishes first (default: the groups').
    """

    def __init__(self, optimizer, comm, *, stage=1, op="sum", compression="none", bucket_mb=25.0,
                 chunk_mb=DEFAULT_CHUNK_MB, check_finite=False, model=None):
        _check_shardable(optimizer)
        if stage not in STAGES or op not in ("sum", "average") or compression not in COMPRESSION:
            raise ValueError(f"stage must be 1 or 2, op 'sum' or 'average', compression one of "
                             f"{', '.join(COMPRESSION)}; got {stage!r}, {op!r}, {compression!r}")
        if any(p.device.type != "cpu" for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("distml shards CPU tensors; move the model to the CPU")
        self.comm, self.full, self.stage, self.op = comm, optimizer, stage, op  # full: the layout, never stepped
        self.wire = COMPRESSION[compression] if comm.size > 1 else None
        self.groups, shard_groups = [], []
        for group in self._full_groups():
            flat = _FlatGroup(_trainable(group), comm.rank, comm.size, stage, bucket_mb * 2**20)
            self.groups.append(flat)
            shard_groups.append({**_settings(group), "params": [flat.shard]})
        mine = {id(p) for flat in self.groups for p in flat.params}
        if any(mine & {id(p) for f in other.groups for p in f.params} for other in list(_LIVE)):
            raise ValueError("these parameters are already sharded by another ShardedOptimizer that is alive: "
                             "close() it (or let it go) first; both would take the same gradients")
        dtype = self.groups[0].data.dtype if self.groups else torch.float32
        if len({flat.data.dtype for flat in self.groups}) > 1:
            raise ValueError("the sharded optimizer moves gradients through buffers of one dtype: give every "
                             "parameter group the same dtype")
        self.chunk = max(comm.size, int(chunk_mb * 2**20) // (self.wire or dtype).itemsize)  # elements a call
        accepted = inspect.signature(type(optimizer).__init__).parameters  # defaults hold derived keys too
        self.inner = type(optimizer)(shard_groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
        # check_finite: look for this rank's first non-finite gradient (one sum a piece), kept in `nonfinite`
        self.passes, self.check_finite, self.nonfinite = 1, check_finite, None
        # Stage 2 reduces buckets in the order backward finishes them, the same on every rank: the one
        # whose earliest parameter in the model (or the groups) comes last, first.
        place = {id(p): i for i, p in enumerate(model.parameters() if model is not None else
                                                (p for flat in self.groups for p in flat.params))}
        self._order = sorted(((g, b) for g, flat in enumerate(self.groups) for b in range(len(flat.buckets))),
                             key=lambda gb: min(place.get(id(p), -1) for p in
                                                self.groups[gb[0]].params[slice(*self.groups[gb[0]].buckets[gb[1]][:2])]),
                             reverse=True)
        self._position = {key: i for i, key in enumerate(self._order)}
        largest = max((hi - lo for flat in self.groups for *_, lo, hi in flat.buckets), default=0)
        self._staging = zeros(min(largest, self.chunk), dtype) if stage == 2 else None  # one piece
        self._wire = torch.empty(self.chunk, dtype=self.wire) if self.wire else None
        self._peak_live = 0  # stage 2: the most bytes of whole gradients alive at once (backward's hooks)
        if stage == 1:  # the accumulators are kept: autograd holds them weakly, and their hooks with them
            self._accumulators = [self._accumulator(p) for flat in self.groups for p in flat.params]
            hooks = [acc.register_prehook(weak_grad_hook(self, "_into_flat", flat, k)) for acc, (flat, k) in
                     zip(self._accumulators, [(f, k) for f in self.groups for k in range(len(f.params))])]
        else:
            hooks = [p.register_post_accumulate_grad_hook(weak_grad_hook(self, "_arrived", g, b))
                     for g, flat in enumerate(self.groups) for b, (first, stop, *_) in enumerate(flat.buckets)
                     for p in flat.params[first:stop]]
        self._hooks = hooks
        self._finalizer = weakref.finalize(self, _remove, hooks)
        _LIVE.add(self)
        self.zero_grad()
        if optimizer.state:  # state it already had (loaded, or stepped before): into the slices
            self.load_state_dict(optimizer.state_dict())

    @property
    def param_groups(self):
        return self.full.param_groups

    @property
    def state(self):
        return self.full.state  # empty: what lives in the slices, state_dict() gathers

    def zero_grad(self, set_to_none=True):
        """Gradients None: stage 1's backward writes them into the flat buffer, stage 2's are freed per bucket."""
        for flat in self.groups:
            for p in flat.params:
                p.grad = None
            flat.shard.grad.zero_()
        self._arrivals = {}  # (group, bucket) -> gradients finished in the last pass
        self._started = 0  # how many of _order were reduce-scattered this step
        self._alive, self._live = set(), 0  # stage 2: the parameters whose whole gradient exists, its bytes
        self.reduced, self.nonfinite = False, None

    def step(self, closure=None):
        """Reduce-scatter the gradients, step this rank's slice, all-gather the parameters."""
        if closure is not None:
            raise ValueError("the sharded optimizer's step() takes no closure (LBFGS-style optimizers "
                             "need the whole vector and are refused)")
        self.reduce_gradients()
        self.step_and_gather()

    # -- gradients: into the flat buffer (stage 1) or bucket by bucket, reduce-scattered (stage 2) --
    @staticmethod
    def _accumulator(p):
        with torch.enable_grad():
            return p.view_as(p).grad_fn.next_functions[0][0]

    def _into_flat(self, flat, k, grads):
        """Stage 1: backward's first gradient for parameter k goes straight into its flat slice (no zeroing
        pass); later ones accumulate there. Where autograd would copy anyway it passes unchanged."""
        (grad,) = grads
        p = flat.params[k]
        if self.reduced:
            raise RuntimeError(_LATE)
        if p.grad is not None or grad.is_sparse or torch.is_grad_enabled() or not p.is_contiguous():
            return None
        return (flat.grads.views[k].detach().copy_(grad),)

    def _arrived(self, g, b, param):
        """Stage 2: a gradient is finished; reduce the buckets that are complete, in the fixed order."""
        key = (g, b)
        if self.reduced or self._position[key] < self._started:
            raise RuntimeError(_LATE)
        self._arrivals[key] = self._arrivals.get(key, 0) + 1
        if id(param) not in self._alive:
            self._alive.add(id(param))
            self._live += param.numel() * param.element_size()
            self._peak_live = max(self._peak_live, self._live)
        while self._started < len(self._order):
            g, b = self._order[self._started]
            first, stop, *_ = self.groups[g].buckets[b]
            if self._arrivals.get((g, b), 0) < (stop - first) * self.passes:
                break
            self._reduce_bucket(g, b)

    def _reduce_bucket(self, g, b):
        """Stage 2: bucket b's gradients (zero where none), piece by piece through one piece-sized buffer,
        reduce-scattered; then freed."""
        flat = self.groups[g]
        first, stop, lo, hi = flat.buckets[b]
        self._reduce_range(g, lambda a, z: self._gathered(flat, first, stop, a, z), lo, hi,
                           f"bucket {b + 1} of {len(flat.buckets)}")
        for p in flat.params[first:stop]:
            if id(p) in self._alive:
                self._alive.discard(id(p))
                self._live -= p.numel() * p.element_size()
            p.grad = None
        self._started += 1

    def _gathered(self, flat, first, stop, a, b):
        """Flat elements [a, b) of the gradients of params[first:stop] (and padding), copied into the staging buffer."""
        out = self._staging[:b - a]
        out.zero_()
        for k in range(first, stop):
            lo, hi = max(a, flat.offsets[k]), min(b, flat.offsets[k + 1])
            grad = flat.params[k].grad
            if lo < hi and grad is not None:
                grad = grad.detach().to_dense() if grad.is_sparse else grad.detach()  # a sparse Embedding's
                out[lo - a:hi - a].copy_(grad.reshape(-1)[lo - flat.offsets[k]:hi - flat.offsets[k]])
        if self.check_finite and self.nonfinite is None and not grads_finite([out]):
            self.nonfinite = next((p for p in flat.params[first:stop] if p.grad is not None and
                                   not bool(torch.isfinite(p.grad).all())), flat.params[first])
        return out

    def reduce_gradients(self):
        """Each rank's slice of every group's summed (or averaged) gradient, in its shard's .grad.

        Once a step: until zero_grad(), a second call does nothing and a backward raises.
        """
        if self.reduced:
            return
        if self.stage == 1:
            for g, flat in enumerate(self.groups):
                flat.grads.attach_grads()  # None (unused, or no backward on this rank) becomes zero
                if self.check_finite and self.nonfinite is None and not grads_finite([flat.grads.buffer]):
                    self.nonfinite = next((p for p in flat.params if not bool(torch.isfinite(p.grad).all())),
                                          flat.params[0])
                self._reduce_slices(g, flat.grads.buffer)
        else:
            while self._started < len(self._order):  # those backward did not finish (unused, no data, DP)
                self._reduce_bucket(*self._order[self._started])
        if self.op == "average" and self.wire is None:  # with a wire dtype, divided before it (as the reducer)
            for flat in self.groups:
                flat.shard.grad.div_(self.comm.size)
        self.reduced = True

    def _reduce_range(self, g, source, lo, hi, label):
        """Stage 2: reduce-scatter flat range [lo, hi) of group g into the slices, in pieces;
        source(a, b): elements [a, b)."""
        flat = self.groups[g]
        pieces = range(lo, hi, self.chunk)
        for i, a in enumerate(pieces):
            b = min(hi, a + self.chunk)
            start, stop = flat.mine(a, b)
            self._reduce_parts(g, list(source(a, b).split(flat.counts(a, b))),
                               flat.shard.grad[max(start, 0):max(stop, start, 0)], label, i, len(pieces))

    def _reduce_slices(self, g, buffer):
        """Stage 1: reduce-scatter the whole flat gradient `buffer`, in pieces that take the same
        part of every rank's slice, so that every rank receives and adds in each call."""
        flat, n = self.groups[g], self.comm.size
        L, step = flat.slice_len, max(1, self.chunk // n)
        pieces = range(0, L, step)
        for i, a in enumerate(pieces):
            b = min(L, a + step)
            self._reduce_parts(g, [buffer[r * L + a:r * L + b] for r in range(n)], flat.shard.grad[a:b],
                               "the flat gradient", i, len(pieces))

    def _reduce_parts(self, g, parts, out, label, piece, pieces):
        """One reduce-scatter: parts[r] summed over ranks into rank r's `out` (through the wire dtype if any);
        piece of pieces names it in the call record."""
        recv = out
        if self.wire is not None:  # half precision on the wire: divided first for an average
            wire, offset = [], 0
            for part in parts:
                w = self._wire[offset:offset + part.numel()]
                wire.append(w.copy_(part if self.op == "sum" else part / self.comm.size))
                offset += part.numel()
            parts, recv = wire, torch.empty(out.numel(), dtype=self.wire)
        where = label + (f", piece {piece + 1} of {pieces}" if pieces > 1 else "")
        what = f"the sharded optimizer's gradient slices (group {g + 1}, {where})"
        self.comm.reduce_scatter_parts_(parts, recv, what=what)
        if recv is not out:
            out.copy_(recv)

    def clip_grad_norm_(self, max_norm):
        """Scale the reduced gradient to global L2 norm max_norm, from the slices' squared norms; returns the norm.

        Call after reduce_gradients() (torch's clip_grad_norm_ on the parameters would see
        this rank's unreduced gradients, or none at stage 2).
        """
        squares = torch.tensor([sum(float(flat.shard.grad.double().pow(2).sum()) for flat in self.groups)],
                               dtype=torch.float64)
        norm = float(self.comm.allreduce_(squares, what="the gradient's squared norm")[0]) ** 0.5
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for flat in self.groups:
                flat.shard.grad.mul_(scale)
        return norm

    def step_and_gather(self):
        """Step this rank's slices with the groups' current settings (lr...), then all-gather the parameters."""
        for full, inner in zip(self._full_groups(), self.inner.param_groups):
            inner.update(_settings(full))
        self.inner.step()
        for g, flat in enumerate(self.groups):  # one call a group: 4 ms for mlp10m at 2 ranks, 10x in 4 MiB pieces
            self.comm.allgather_in_place(flat.data, flat.slice_len,
                                         [r * flat.slice_len for r in range(self.comm.size)],
                                         what=f"the sharded optimizer's parameters (group {g + 1})")

    def _full_groups(self):
        """The wrapped optimizer's groups that hold trainable parameters (one per flat group)."""
        return [g for g in self.full.param_groups if _trainable(g)]

    # -- checkpoints: the whole state, per parameter, in the unsharded optimizer's format --
    def state_dict(self):
        """The full optimizer's state_dict on root, the slices gathered there and cut per parameter
        (views of one buffer a key: torch.save writes it once); elsewhere only the param_groups.
        A collective: call it on every rank."""
        self.full.state.clear()
        for flat in self.groups:
            for key, value in self.inner.state.get(flat.shard, {}).items():
                whole = self._gather(flat, value) if torch.is_tensor(value) and value.dim() == 1 else None
                if not self.comm.is_root:
                    continue
                for p, offset in zip(flat.params, flat.offsets):
                    self.full.state.setdefault(p, {})[key] = (  # a step counter each: optimizers add in place
                        whole[offset:offset + p.numel()].view_as(p) if whole is not None else
                        value.clone() if torch.is_tensor(value) else value)
        state = self.full.state_dict()
        self.full.state.clear()
        return state

    def load_state_dict(self, state):
        """From a full optimizer's state_dict (any world size, sharded or not): this rank's slices.

        A parameter without state (it never had a gradient) gets zeros; the step counts of a
        group's parameters must agree, as one counter steps the slice."""
        self.full.load_state_dict(state)
        try:
            for g, flat in enumerate(self.groups):
                self.inner.state[flat.shard] = self._slice_state(g, flat)
        finally:
            self.full.state.clear()

    def _slice_state(self, g, flat):
        held = [self.full.state.get(p, {}) for p in flat.params]
        shard_state = {}
        for key in dict.fromkeys(k for s in held for k in s):
            values = [s.get(key) for s in held]
            given = next(v for v in values if v is not None)
            if torch.is_tensor(given) and given.dim() > 0:
                whole = torch.zeros(flat.padded, dtype=given.dtype)
                for p, offset, v in zip(flat.params, flat.offsets, values):
                    if v is not None:
                        whole[offset:offset + p.numel()] = v.reshape(-1)
                shard_state[key] = whole[flat.start:flat.start + flat.slice_len].clone()
            else:
                numbers = {float(v) for v in values if v is not None}
                if len(numbers) > 1:
                    raise ValueError(f"cannot shard this optimizer state: the parameters of group {g + 1} have "
                                     f"different '{key}' values {sorted(numbers)}, and a slice has one")
                shard_state[key] = given.clone() if torch.is_tensor(given) else given
        return shard_state

    def _gather(self, flat, value):
        """This group's slices of `value`, in order, on root (a padded whole there; None elsewhere)."""
        whole = torch.zeros(flat.padded, dtype=value.dtype) if self.comm.is_root else None
        self.comm.gather_(value.contiguous(), whole)
        return whole

    def state_bytes(self):
        """Bytes of optimizer state this rank holds (its slices' moments, momentum, ...)."""
        return sum(t.numel() * t.element_size() for state in self.inner.state.values()
                   for t in state.values() if torch.is_tensor(t))

    def gradient_bytes(self):
        """Bytes of gradient buffers this rank keeps between steps (stage 1: the whole and the slice;
        2: the slice and one piece)."""
        held = [flat.shard.grad for flat in self.groups]
        held += [flat.grads.buffer for flat in self.groups] if self.stage == 1 else [self._staging]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def gradient_peak_bytes(self):
        """The most gradient bytes alive at once so far: at stage 2 also the whole gradients backward made
        before their bucket was reduced (seen by the hooks: not what DP-SGD's per-sample path sets)."""
        return self.gradient_bytes() + (self._peak_live if self.stage == 2 else 0)

    def close(self):
        """Remove the gradient hooks and let another sharded optimizer take these parameters."""
        self._finalizer()
        _LIVE.discard(self)
        self.groups = []


_LATE = ("gradients arrived after this step's reduction (more backward passes than declared, or a backward "
         "after synchronize() or reduce_gradients()): call zero_grad() before the next backward")


def _check_shardable(optimizer):
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(f"{name} cannot be sharded: its update needs the whole parameter vector (a line search "
                         f"over all of it), not one slice of it")
    if not isinstance(optimizer, ELEMENTWISE):
        raise ValueError(f"{name} cannot be sharded: a slice steps as the whole only where the update treats each "
                         f"element on its own, as in {', '.join(c.__name__ for c in ELEMENTWISE)} (Adafactor's "
                         f"row and column factors and Muon's whole matrices do not)")


def _trainable(group):
    return [p for p in group["params"] if p.requires_grad and p.numel()]


def _remove(handles):
    for handle in handles:
        handle.remove()


def _settings(group):
    return {k: v for k, v in group.items() if k != "params"}

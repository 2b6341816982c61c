"""Gradient averaging over fused flat buckets, copying nothing.

Like PyTorch DDP with `gradient_as_bucket_view=True`: each parameter's `.grad`
is a view into a flat bucket buffer, and in-place Allreduces average every
gradient in it. A gather-copy-scatter reducer spends most of MPI's advantage on
the copies. After zero_grad() the gradients are None and a pre-hook on each
parameter's gradient accumulator (after the user's own hooks) writes backward's
gradient straight into its bucket slice, which autograd then keeps as `.grad`:
one pass over the bytes, where zeroing the buckets and accumulating into them
(what DDP does) takes three. Later backward passes accumulate in place, as
plain PyTorch.

Each bucket is reduced in equal pieces of at most `chunk_mb`: shared-memory
Allreduce here moves 2-16 MiB messages about three times faster than 32 MiB and
more (see the README's Performance section). op="average" divides as DDP does,
while the gradient is written into its slice (a multiply in that one pass,
where a division after the reduction cost 6-8% of an MLP's step), so from
backward to the reduction a `.grad` holds this rank's share: its gradient over
the world size. Reducers sharing a parameter divide after the reduction instead
(one's share would be the other's gradient).
`compression` ("fp16", "bf16") reduces each piece in half precision through a
buffer made once, and the optimizer still sees float32 gradients. `overlap`
starts a bucket's nonblocking reductions from backward, as soon as its last
gradient is in (one backward per step); the README's benchmark says which is faster.
"""
import weakref

import torch

from .flat import Bucket

__all__ = ["plan_buckets", "GradientReducer", "DEFAULT_CHUNK_MB", "COMPRESSION", "weak_grad_hook"]

_LIVE = weakref.WeakSet()  # every reducer alive, to find those sharing a parameter
_GENERATION = [0]  # bumped when a reducer is made or collected: each then checks its sharing anew

DEFAULT_CHUNK_MB = 4.0  # the middle of the measured 2-16 MiB sweet spot
COMPRESSION = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def plan_buckets(params, bucket_bytes):
    """Group parameters into buckets of at most `bucket_bytes` (one dtype per bucket).

    A parameter larger than the cap gets a bucket of its own. Order follows
    `params`, so every rank builds the same plan from the same model.
    """
    buckets, current, current_bytes = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        fits = current_bytes + nbytes <= bucket_bytes and (not current or current[0].dtype == p.dtype)
        if current and not fits:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


class _Piece:
    """A slice of a bucket reduced by one MPI call, its gradient part, and its half-precision twin."""

    def __init__(self, buffer, start, stop, gradients, wire_dtype):
        self.data = buffer[start:stop]
        self.grads = buffer[start:max(start, min(stop, gradients))]  # without the control elements
        use_wire = wire_dtype is not None and buffer.dtype.is_floating_point and buffer.dtype != wire_dtype
        self.wire = torch.empty(stop - start, dtype=wire_dtype) if use_wire else None


class GradientReducer:
    """Sums or averages the gradients of `params` over `comm`, one Allreduce per piece of a bucket.

    op="average" divides by the world size (Horovod's default), as each gradient
    enters its bucket: until the reduction, `.grad` holds this rank's share (read or
    change gradients after it, as Horovod asks). op="sum" leaves the sum, for
    callers that already scaled their loss by the global batch size.
    `control` extra elements ride at the end of the last bucket (`self.control`):
    a caller writes per-rank values there before `allreduce_grads()` and reads
    their sum after, with no message of its own (the trainer's stop flag).
    """

    def __init__(self, params, comm, *, bucket_mb=25.0, op="average", control=0, chunk_mb=DEFAULT_CHUNK_MB,
                 compression="none", overlap=False):
        if bucket_mb <= 0 or chunk_mb <= 0:
            raise ValueError(f"bucket_mb and chunk_mb must be > 0, got {bucket_mb} and {chunk_mb}")
        if op not in ("average", "sum"):
            raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
        if compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSION)}, got {compression!r}")
        params = list({id(p): p for p in params if p.requires_grad}.values())  # each once
        if any(p.device.type != "cpu" for p in params):
            raise ValueError("distml reduces CPU tensors; move the model to the CPU")
        self.comm, self.op = comm, op
        # The share: 1/size while no other reducer holds these parameters (op="average"), else None.
        # _round counts reductions; _shared[i][k] == _round: bucket i's slice k holds its share.
        self._params, self._share, self._share_t = {id(p) for p in params}, None, None
        self._generation, self._round = None, 0
        self.buckets, self._shared, self.overlap = [], [], False  # what others' _check_sharing() reads
        self._arrivals, self._reduced_at = 0, -1  # gradients backward brought; their count at the last reduction
        self._join_live()
        plan = plan_buckets(params, int(bucket_mb * 2**20))
        self.buckets = [Bucket(b, extra=control if i == len(plan) - 1 else 0) for i, b in enumerate(plan)]
        self.control = self.buckets[-1].extra if self.buckets else torch.zeros(0)
        self._pieces = [_pieces(b, chunk_mb, COMPRESSION[compression]) for b in self.buckets]
        self._labels = [[f"bucket {i + 1} of {len(self.buckets)}" + (f", piece {j + 1} of {len(pieces)}"
                                                                     if len(pieces) > 1 else "")
                         for j in range(len(pieces))] for i, pieces in enumerate(self._pieces)]  # the call record's
        self._shared = [[-1] * len(b.params) for b in self.buckets]
        self._accumulators, hooks = [], []  # accumulators kept, or their hooks go with them
        for i, bucket in enumerate(self.buckets):
            for k, p in enumerate(bucket.params):
                # A pre-hook on the gradient accumulator, as DDP's: it runs after the user's tensor
                # hooks and not for torch.autograd.grad(), whose results must not alias a bucket.
                with torch.enable_grad():  # a reducer made under no_grad() still finds it
                    self._accumulators.append(p.view_as(p).grad_fn.next_functions[0][0])
                hooks.append(self._accumulators[-1].register_prehook(weak_grad_hook(self, "_into_bucket", i, k)))
        self.overlap = overlap and comm.size > 1
        if self.overlap:
            hooks += self._start_overlap(control)
        weakref.finalize(self, _remove, hooks)  # a reducer made anew for the same model: no stale hooks

    def zero_grad(self, set_to_none=True):
        """Set the gradients to None, so that the next backward writes them into the buckets.

        set_to_none=False zeroes the buckets in place instead (the `.grad` stay
        views of them, at the cost of a pass over the bytes and a slower backward).
        """
        if self.overlap:
            if self._started:
                raise RuntimeError("zero_grad() while bucket reductions started by backward() are in flight: "
                                   "call allreduce_grads() (the optimizer's step()) first")
            self._ready = [0] * len(self.buckets)
        self.control.zero_()
        for bucket in self.buckets:
            if set_to_none:
                for p in bucket.params:
                    p.grad = None
            else:
                bucket.attach_grads()
                bucket.grads.zero_()

    def _into_bucket(self, i, k, grads):
        """Backward's gradient for parameter k of bucket i: into its slice when `.grad` is None.

        autograd keeps an incoming gradient that nothing else references as
        `.grad` (no copy), so a fresh view of the slice holding the gradient (or
        its share) becomes the `.grad`. Where autograd would copy it anyway
        (create_graph, a sparse gradient, a non-contiguous parameter) the
        gradient passes unchanged and `attach_grads()` takes care of it. A
        later backward accumulates into the slice: its share, for the average.
        """
        (grad,) = grads
        self._arrivals += 1
        self._check_sharing()
        bucket, shared = self.buckets[i], self._shared[i]
        if bucket.params[k].grad is None:
            if grad.is_sparse or torch.is_grad_enabled() or not bucket.params[k].is_contiguous():
                return None
            shared[k] = self._round
            out = bucket.views[k].detach()  # a fresh tensor on the slice: autograd keeps it, uncopied
            return (out.copy_(grad) if self._share is None else torch.mul(grad, self._share_t, out=out),)
        if self._share is None or not bucket.holds(k):
            return None  # plain accumulation (attach_grads() brings a `.grad` kept elsewhere in)
        if torch.is_grad_enabled():  # create_graph: autograd adds out of place, so the slice is left behind
            if shared[k] == self._round:
                bucket.views[k].mul_(self.comm.size)  # the whole gradient again, for attach_grads() to copy
                shared[k] = -1
            return None
        if shared[k] != self._round:  # the last reduction's result, or zeroed in place
            bucket.take(k, self._share)
            shared[k] = self._round
        return (grad * self._share,)

    def _join_live(self):
        """Join the live reducers; those sharing a parameter make their shares whole (the new buckets copy them)."""
        sharing = self._sharing()
        if any(other.overlap and other._started for other in sharing):
            raise RuntimeError("a GradientReducer over parameters whose bucket reductions, started by backward(), "
                               "are in flight: call allreduce_grads() (the optimizer's step()) on the first one before")
        _LIVE.add(self)
        _GENERATION[0] += 1
        for other in sharing:
            other._check_sharing()

    def _sharing(self):
        """The other live reducers holding any of these parameters."""
        return [other for other in list(_LIVE) if other is not self and other._params & self._params]

    def _check_sharing(self):
        """Divide as gradients enter the buckets only while no other reducer holds these parameters.

        Run when reducers come or go (rarely): a reducer dividing after the
        reduction first makes the shares in its slices whole again.
        """
        if self._generation == _GENERATION[0] or (self.overlap and self._started):
            return
        self._generation = _GENERATION[0]
        share = not self._sharing() and self.op == "average" and self.comm.size > 1
        if share != (self._share is not None):
            for bucket, shared in zip(self.buckets, self._shared):
                for k, view in enumerate(bucket.views):
                    if self._share is not None and shared[k] == self._round and bucket.holds(k):
                        view.mul_(self.comm.size)  # a share made whole again
                    shared[k] = -1
            self._share = 1.0 / self.comm.size if share else None
            # as a 0-dim tensor for the hook's torch.mul(..., out=): 1 us on a small gradient, with a float 2.6
            self._share_t = torch.tensor(self._share, dtype=torch.float64) if share else None

    def reduced(self):
        """Whether the buckets still hold the last reduction's result (no backward since, no `.grad` replaced)."""
        return (self._reduced_at == self._arrivals and not (self.overlap and self._started)
                and all(bucket.holds(k) for bucket in self.buckets for k in range(len(bucket.params))))

    def attach_grads(self):
        """Make every `.grad` a view of its bucket slice (a zero one where backward left it None).

        allreduce_grads() does this first; call it yourself to read the buckets
        before. For op="average" a slice then holds its gradient's share.
        """
        for i in range(len(self.buckets)):
            self._attach(i)

    def _attach(self, i):
        self._check_sharing()
        bucket, shared = self.buckets[i], self._shared[i]
        for k in range(len(bucket.params)):
            # None (unused parameter, no backward), kept elsewhere, or a whole value in a slice meant for a share
            if not bucket.holds(k) or (self._share is not None and shared[k] != self._round):
                bucket.take(k, self._share)
            shared[k] = self._round

    def allreduce_grads(self):
        """Reduce every bucket in place, piece by piece; afterwards each `.grad` holds the result."""
        if self.overlap:
            return self._finish_overlap()
        for i, (pieces, labels) in enumerate(zip(self._pieces, self._labels)):
            self._attach(i)
            if self.comm.size == 1:
                continue  # nothing to reduce (and no rounding to half precision)
            for piece, label in zip(pieces, labels):
                if piece.wire is None:
                    self.comm.allreduce_(piece.data, what=label)
                else:
                    self.comm.allreduce_(piece.wire.copy_(piece.data), what=label)
                self._unpack(piece)
        self._round, self._reduced_at = self._round + 1, self._arrivals

    def _unpack(self, piece):
        """A reduced piece back into float32 (from its half twin); divided for an average of whole gradients."""
        if piece.wire is not None:
            piece.data.copy_(piece.wire)
        if self.op == "average" and self._share is None:
            piece.grads.div_(self.comm.size)

    # -- overlap: a bucket's reduction starts in backward, once its last gradient is in ----------------
    def _start_overlap(self, control):
        """Hooks count each bucket's finished gradients; buckets start in one fixed order on every rank.

        Backward finishes the last layers first, so the order is the plan's,
        reversed; the bucket carrying control elements goes last, since the
        caller writes them after backward. Returns the hooks' handles.
        """
        order = list(range(len(self.buckets)))[::-1]
        if control and order:
            order.append(order.pop(0))
        self._order, self._ready, self._started = order, [0] * len(self.buckets), []
        return [p.register_post_accumulate_grad_hook(weak_grad_hook(self, "_grad_ready", i))
                for i, bucket in enumerate(self.buckets) for p in bucket.params]

    def _grad_ready(self, index, param):
        self._ready[index] += 1
        if self._ready[index] > len(self.buckets[index].params):
            raise RuntimeError("overlap=True reduces a bucket as soon as backward has filled it: take one "
                               "backward() per step, or use overlap=False to accumulate gradients")
        while len(self._started) < len(self._order) - 1:  # the last one waits for allreduce_grads
            nxt = self._order[len(self._started)]
            if self._ready[nxt] < len(self.buckets[nxt].params):
                break
            self._start_bucket(nxt)

    def _start_bucket(self, index):
        self._attach(index)  # a gradient autograd kept outside its slice (sparse, hooks...)
        requests = []
        for piece in self._pieces[index]:
            target = piece.data if piece.wire is None else piece.wire.copy_(piece.data)
            requests.append(self.comm.iallreduce_(target))
        self._started.append((index, requests))

    def _finish_overlap(self):
        for index in self._order[len(self._started):]:
            self._start_bucket(index)
        for index, requests in self._started:
            for piece, request, label in zip(self._pieces[index], requests, self._labels[index]):
                self.comm.wait(request, what=label)
                self._unpack(piece)
        self._ready, self._started = [0] * len(self.buckets), []
        self._round, self._reduced_at = self._round + 1, self._arrivals


def weak_grad_hook(owner, method, *args):
    """A hook returning owner.method(*args, value) while `owner` lives, else None (a no-op).

    For post-accumulate-grad hooks (value: the parameter) and gradient
    accumulator pre-hooks (value: the incoming gradients). A hook whose owner
    is gone (a reducer or an optimizer made anew for the same model) stays
    inert until its handle is removed.
    """
    ref = weakref.ref(owner)

    def hook(value):
        target = ref()
        return None if target is None else getattr(target, method)(*args, value)
    return hook


def _remove(handles):
    for handle in handles:
        handle.remove()
    _GENERATION[0] += 1


def _pieces(bucket, chunk_mb, wire_dtype):
    """A bucket's buffer cut into the fewest pieces of at most `chunk_mb`, all of about one size.

    Equal sizes: a 4.2 MB bucket in 4 MiB pieces is two of 2.1 MB, not 4 MiB and a
    small remainder that costs a whole call's latency.
    """
    buffer = bucket.buffer
    most = max(1, int(chunk_mb * 2**20) // buffer.element_size())
    count = -(-buffer.numel() // most)
    step = max(1, -(-buffer.numel() // max(count, 1)))
    return [_Piece(buffer, start, min(start + step, buffer.numel()), bucket.grads.numel(), wire_dtype)
            for start in range(0, max(buffer.numel(), 1), step)]

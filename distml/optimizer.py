"""DistributedOptimizer: any torch optimizer, its step() preceded by the gradient reduction.

It is a torch.optim.Optimizer (so every lr_scheduler drives it) that holds no
state of its own: param_groups, state and defaults are the wrapped optimizer's.
Its reductions run on communicators of their own (distml.matching): one for
the gradient buckets, checked alike on every rank when they are made, one for
the "did anything change since synchronize()" check and one for a closure's
loss. A rank in your loop's collective can therefore never be matched with
another rank's gradient reduction. One spare element of the last bucket
carries this rank's caught stop signal (distml.stop_requested()).
"""
import torch

from . import comm as _comm
from .matching import negotiate
from .reducer import DEFAULT_CHUNK_MB, GradientReducer
from .signals import LOOP_STOP
from .zero import ShardedOptimizer

__all__ = ["DistributedOptimizer", "WrappingOptimizer", "reduced_closure"]


class WrappingOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer holding nothing of its own: param_groups, state and defaults are
    `self.optimizer`'s (Optimizer.__init__ is deliberately not called), and so is anything else
    asked for. Subclasses make their reduction in `_build()` (again after add_param_group, a
    collective) and forget what they knew of the gradients in `_forget()` (after load_state_dict)."""

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self._forget()
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        self._build()

    def __getattr__(self, name):  # hooks, and whatever else the wrapped optimizer offers
        return getattr(self.__dict__["optimizer"], name)

    def __repr__(self):
        return f"{type(self).__name__}({self.optimizer!r})"


class DistributedOptimizer(WrappingOptimizer):
    """Wraps any torch optimizer: step() first reduces the gradients over all ranks.

    It reduces the gradients of the parameters the optimizer updates; `model`
    is accepted for Horovod-style call sites and not needed (with zero=2, its parameters' order
    tells which bucket backward finishes first).
    The gradients live in fused bucket buffers (see `reducer`): after
    zero_grad() they are None, and backward writes them into the buffers, for
    op="average" already divided by the world size (this rank's share: read or
    change gradients after synchronize()). op="sum" is for losses already
    divided by the global batch size (uneven last batches: ShardSampler.global_size).
    chunk_mb, compression ("fp16", "bf16") and overlap as `distml train`'s --chunk-mb, --compression
    and --overlap (overlap needs one backward() per step). A collective: make it on every rank.

    zero=1 or 2 shards the optimizer as `distml train --zero` (distml.zero): each rank keeps
    and steps 1/N of the state (and at 2 of the gradients), then the parameters are
    all-gathered. Clip with this object's clip_grad_norm_() after synchronize() (the
    gradients' slices are reduced, not the parameters' `.grad`), and state_dict() is a
    collective that gathers the whole state on root, in your optimizer's own format.
    backward_passes_per_step (zero=2): every rank makes this many backward passes a step, and each
    bucket is reduce-scattered in the last one, from backward's hooks; a rank with fewer (no data)
    reduces in step(), so make no other collective between the last backward and step().
    """

    def __init__(self, optimizer, model=None, *, bucket_mb=25.0, op="average", comm=None,
                 chunk_mb=DEFAULT_CHUNK_MB, compression="none", overlap=False, zero=0, backward_passes_per_step=1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, not {type(optimizer).__name__}")
        self.__dict__["optimizer"] = optimizer  # before anything reaches __getattr__
        base = comm or _comm.world()
        self._options = dict(bucket_mb=bucket_mb, op=op, chunk_mb=chunk_mb, compression=compression,
                             overlap=overlap)
        if zero not in (0, 1, 2):
            raise ValueError(f"zero must be 0, 1 or 2, got {zero!r}")
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
        if zero and overlap:
            raise ValueError("zero with overlap=True: overlap starts each bucket's Allreduce in backward, but a "
                             "sharded optimizer reduce-scatters the gradients into slices instead (zero=2 reduces "
                             "each bucket as backward finishes it)")
        self.zero, self.sharded, self.passes, self._model = zero, None, backward_passes_per_step, model
        self._channels = {name: base.dup() for name in ("gradients", "control", "closure", "plan")}
        self._synchronized, self._steps = False, 0
        self._build()

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _build(self):
        """The buckets of the parameters that train now, checked alike on every rank (on a channel of its
        own: a rank building while another reduces gradients waits, and is reported, instead)."""
        params = self._params()
        self._trainable = [p.requires_grad for p in params]
        if self.zero:
            return self._build_sharded()
        self.reducer = GradientReducer(params, self._channels["gradients"], control=1, **self._options)
        plan = [(str(b.buffer.dtype).removeprefix("torch."), b.buffer.numel()) for b in self.reducer.buckets]
        negotiate(self._channels["plan"], f"DistributedOptimizer({sum(len(b.params) for b in self.reducer.buckets)} "
                  f"tensors in buckets {plan}, " + ", ".join(f"{k}={v}" for k, v in self._options.items()) + ")")

    def _build_sharded(self):
        if self.sharded is not None:
            raise RuntimeError("a sharded DistributedOptimizer's groups are cut into slices when it is made: "
                               "add parameter groups (or change requires_grad) before making it")
        options = {k: v for k, v in self._options.items() if k != "overlap"}
        self.sharded = ShardedOptimizer(self.optimizer, self._channels["gradients"], stage=self.zero,
                                        model=self._model if isinstance(self._model, torch.nn.Module) else None, **options)
        self.sharded.passes = self.passes
        self.reducer = None
        plan = [(str(g.data.dtype).removeprefix("torch."), g.padded) for g in self.sharded.groups]
        negotiate(self._channels["plan"], f"DistributedOptimizer(zero={self.zero}, flat groups {plan}, "
                  + ", ".join(f"{k}={v}" for k, v in options.items()) + ")")

    def add_param_group(self, param_group):
        if self.zero:
            raise RuntimeError("a sharded DistributedOptimizer's groups are cut into slices when it is made: "
                               "add parameter groups before making it")
        super().add_param_group(param_group)

    def state_dict(self):
        """Your optimizer's state_dict; with zero, a collective: the whole state gathered on root (other
        ranks get the param_groups only; save it from root)."""
        return self.sharded.state_dict() if self.sharded else self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self._forget()
        (self.sharded or self.optimizer).load_state_dict(state_dict)

    def clip_grad_norm_(self, max_norm):
        """Clip the reduced gradients (after synchronize()) to global norm max_norm; returns the norm.

        With zero, from the slices' squared norms (one small Allreduce); without, as torch's.
        """
        if self.sharded:
            return self.sharded.clip_grad_norm_(max_norm)
        return float(torch.nn.utils.clip_grad_norm_([p for p in self._params() if p.grad is not None], max_norm))

    def _trainable_changed(self):
        return [p.requires_grad for p in self._params()] != self._trainable

    def _forget(self):
        self._synchronized = False

    @property
    def comm(self):
        return self._channels["gradients"]

    def zero_grad(self, set_to_none=True):
        """As torch's: None (the fast path, see `reducer`), or zeroed in place with set_to_none=False.

        Parameters frozen or unfrozen (requires_grad) since the buckets were made get buckets anew here,
        as torch's optimizers skip frozen ones: a collective, like every zero_grad() of the loop.
        """
        if self._trainable_changed():
            for p in self._params():
                p.grad = None  # none left in the old buckets' views
            self._build()
        (self.sharded or self.reducer).zero_grad(set_to_none)
        self._synchronized = False

    def synchronize(self):
        """Reduce the gradients now; step() then steps on them without reducing again.

        For `backward(); synchronize(); clip_grad_norm_(...); step()`: clipping
        before it would see this rank's share, not the average. A backward (or
        a `.grad` replaced) after synchronize() is reduced by step() as usual.
        """
        self._reduce()
        self._synchronized = True

    def step(self, closure=None):
        """Reduce the gradients (unless synchronize() did and nothing changed since), then step.

        A closure (LBFGS evaluates several) is reduced after each evaluation,
        and the loss it returns combined over the ranks by `op`, so that every
        rank takes the same decisions from the same numbers.
        """
        synchronized, self._synchronized = self._synchronized, False
        if self.sharded:
            if closure is not None:
                raise ValueError("a sharded optimizer's step() takes no closure: the optimizers that need one "
                                 "(LBFGS) need the whole parameter vector and are refused")
            if not synchronized:
                self._reduce()
            self.sharded.step_and_gather()
            loss = None
        elif closure is not None:
            comm = self._channels["closure"]
            loss = self.optimizer.step(reduced_closure(closure, self._reduce_unless_reduced, comm.allreduce_,
                                                       comm.size, average=self.reducer.op == "average"))
        else:
            self._reduce_unless_reduced() if synchronized else self._reduce()
            loss = self.optimizer.step()
        self._steps += 1
        self.comm.calls.context = f"your loop, after optimizer step {self._steps}"
        return loss

    def _reduce(self):
        """The gradient reduction, carrying this rank's caught stop signal in the control element."""
        if self._trainable_changed():
            raise RuntimeError("parameters were frozen or unfrozen between zero_grad() and step(): change "
                               "requires_grad before zero_grad(), which then makes the gradient buckets anew")
        self.comm.calls.context = f"optimizer step {self._steps + 1}: gradient reduction"
        if self.sharded:
            self.sharded.reduce_gradients()
            stop = torch.tensor([1 if LOOP_STOP.caught() else 0], dtype=torch.int64)
            LOOP_STOP.record(self._channels["control"].allreduce_max_(stop, what="the stop signal").item())
            return
        control = self.reducer.control
        control.fill_(1.0 if LOOP_STOP.caught() else 0.0)
        self.reducer.allreduce_grads()
        if control.numel():
            LOOP_STOP.record(control[0].item())

    def _reduce_unless_reduced(self):
        """Reduce unless every rank's buckets still hold the last result.

        The ranks agree first (one int64 MAX): a rank without data may have
        skipped its backward, and deciding alone it would skip an Allreduce
        the others wait in.
        """
        changed = torch.tensor([0 if self.reducer.reduced() else 1], dtype=torch.int64)
        if self._channels["control"].allreduce_max_(changed, what="whether gradients changed since the "
                                                                   "reduction").item():
            self._reduce()


def reduced_closure(closure, reduce, allreduce_sum, size, *, average):
    """`closure` for an optimizer's step(): gradients reduced after each evaluation, the loss combined.

    Every rank then sees the same gradients and the same loss, so an optimizer
    that decides from them (LBFGS's line search and stopping tests) takes the
    same path everywhere. The loss comes back detached, as the closure's type:
    a tensor of its dtype, or a float.
    """
    def evaluate():
        loss = closure()
        reduce()
        value = 0.0 if loss is None else float(loss.detach() if torch.is_tensor(loss) else loss)
        total = allreduce_sum(torch.tensor([value, loss is not None], dtype=torch.float64))
        if total[1].item() not in (0, size):  # the same sum everywhere, so every rank raises
            raise ValueError("the closure returned a loss on some ranks and None on others")
        if loss is None:
            return None
        combined = total[0].item() / (size if average else 1)
        return torch.tensor(combined, dtype=loss.dtype) if torch.is_tensor(loss) else combined
    return evaluate

"""Differential privacy: Poisson sampling, Gaussian noise, adaptive clipping and the accountant.

DP-SGD (sync mode) and DP-FedAvg (federated mode) share one mechanism. Each
contribution (a sample's gradient, a client's update) is clipped to L2 norm C;
the contributions of a Poisson-sampled set (each one in with probability q,
independently) are summed; Gaussian noise N(0, (zC)^2) is added once to the
sum, which is divided by the *expected* set size. That is the event Google's
`dp-accounting` composes as PoissonSampled(q, Gaussian(z)) per step or round,
so the epsilon it reports is the one the code performs (shuffled fixed-size
batches accounted as Poisson sampling under-report it: Chua et al., ICML 2024).

The noise and the Poisson samples come from generators seeded by (seed,
step), so a run is reproducible and its result does not depend on the number
of ranks; both are predictable to whoever knows the seed, which is not for
production: `--dp-secure-noise` draws the noise from the operating system's
entropy, and the sampling from a seed root draws there.
"""
import math
import os

import numpy as np
import torch

from .config import UsageError
from .sharding import rng

__all__ = ["Accountant", "calibrate", "require_accounting", "poisson_sample", "NoiseSource", "AdaptiveClip",
           "update_noise_multiplier", "clip_factor"]

DISCRETIZATION = 1e-3  # the PLD accountant's grid: 0.06 s a call, epsilon within 1e-4 of the 1e-4 grid's (measured)
MAX_NOISE = 1000.0  # --dp-epsilon: a noise multiplier above this is refused as out of reach
MIN_NOISE = 0.1  # ... and one below this as more epsilon than noise can meaningfully give


def require_accounting():
    """dp_accounting, or a UsageError naming the pip command (it is the `privacy` extra)."""
    try:
        import dp_accounting
    except ImportError:
        raise UsageError("differential privacy needs Google's dp-accounting: pip install 'distml[privacy]' "
                         "(or pip install dp-accounting)") from None
    return dp_accounting


def _event(q, z, steps):
    dpa = require_accounting()
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)


def _pld():
    from dp_accounting import pld
    return pld.PLDAccountant(value_discretization_interval=DISCRETIZATION)


class Accountant:
    """Epsilon at `delta` after `steps` Poisson-sampled Gaussian steps (privacy loss distributions)."""

    def __init__(self, sample_rate, noise_multiplier, delta):
        self.sample_rate, self.noise_multiplier, self.delta = sample_rate, noise_multiplier, delta
        self._cache = (None, None)

    def epsilon(self, steps):
        """inf without noise; 0 before the first step."""
        if steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if self._cache[0] != steps:
            accountant = _pld()
            accountant.compose(_event(self.sample_rate, self.noise_multiplier, steps))
            self._cache = (steps, accountant.get_epsilon(self.delta))
        return self._cache[1]


def calibrate(sample_rate, steps, epsilon, delta):
    """The smallest noise multiplier whose run of `steps` ends at or under `epsilon` (UsageError if none)."""
    dpa = require_accounting()
    top = Accountant(sample_rate, MAX_NOISE, delta).epsilon(steps)
    if top > epsilon:
        raise UsageError(f"--dp-epsilon {epsilon} is out of reach: even noise multiplier {MAX_NOISE:g} spends "
                         f"{top:.3g} over the run's {steps} steps at q={sample_rate:.4g}; allow more epsilon, "
                         f"or train fewer steps or with a smaller sampling rate")
    bottom = Accountant(sample_rate, MIN_NOISE, delta).epsilon(steps)
    if bottom <= epsilon:
        raise UsageError(f"--dp-epsilon {epsilon} is more than noise multiplier {MIN_NOISE} spends ({bottom:.3g}) "
                         f"over the run's {steps} steps: ask for less epsilon, or give --dp-noise")
    z = dpa.calibrate_dp_mechanism(_pld, lambda z: _event(sample_rate, z, steps), epsilon, delta,
                                   dpa.LowerEndpointAndGuess(MIN_NOISE, 1.0), tol=1e-3)
    while Accountant(sample_rate, z, delta).epsilon(steps) > epsilon:  # bisection's last interval: its upper end
        z *= 1.0001
    return z


def poisson_sample(seed, purpose, position, population, rate):
    """Sorted indices of a Poisson sample: each of `population` in with probability `rate`, independently.

    The same on every rank and for any number of ranks (seeded by the position).
    """
    return np.flatnonzero(rng(seed, purpose, *position).random(population) < rate)


class NoiseSource:
    """Gaussian noise, seeded by (seed, step), or from the OS's entropy (secure=True)."""

    def __init__(self, seed, secure=False):
        self.seed, self.secure = seed, secure

    def gaussian(self, shape, std, position, dtype=torch.float64):
        """A tensor of N(0, std^2) draws for step or round `position` (an int or tuple)."""
        n = math.prod(shape)
        if self.secure:
            values = torch.from_numpy(_os_gaussian(n))
        else:
            key = position if isinstance(position, tuple) else (position,)
            generator = torch.Generator().manual_seed(int(rng(self.seed, "dp-noise", *key).integers(2**63)))
            values = torch.randn(n, generator=generator, dtype=torch.float64)
        return (values * std).to(dtype).reshape(shape)


def _os_gaussian(n):
    """n standard normal draws by Box-Muller from os.urandom's uniforms (53-bit, in (0, 1])."""
    words = np.frombuffer(os.urandom(16 * ((n + 1) // 2)), dtype=np.uint64).reshape(-1, 2)
    u = ((words >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = 2.0 * np.pi * u[:, 1]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def clip_factor(norms, clip):
    """min(1, C / (norm + 1e-6)) for each norm (Opacus's guard against a zero norm)."""
    return (clip / (norms + 1e-6)).clamp(max=1.0)


def update_noise_multiplier(noise_multiplier, count_stddev):
    """The update's share of the noise when the clipped count costs privacy too (Andrew et al. 2021):
    z^-2 = z_update^-2 + (2 sigma_b)^-2, as TensorFlow Federated's gaussian_adaptive."""
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise UsageError(f"--dp-adaptive-clip: the clipped count's noise (std {count_stddev:g} = clients per "
                         f"round / 20) would spend more than noise multiplier {noise_multiplier:.4g} allows in "
                         f"all; it needs z < {2 * count_stddev:g}: sample more clients per round or lower the noise")
    return rest ** -0.5


class AdaptiveClip:
    """The clip norm tracks a quantile of the update norms (Andrew et al. 2021).

    Each client reports whether its update fitted (norm <= C), less 1/2; with b the
    noised share that fitted, C <- C * exp(-eta (b - quantile)): too many fitting
    shrinks C, too few grows it, until `quantile` of the norms fit.
    """

    def __init__(self, clip, quantile, expected_clients, eta=0.2):
        self.clip, self.quantile, self.eta = clip, quantile, eta
        self.expected = expected_clients
        self.count_stddev = expected_clients / 20  # TFF's default for the clipped count's noise

    def update(self, centred_count):
        """Move C from the noised sum over clients of (fitted - 1/2), fitted = 1 if ||update|| <= C.

        Centred, each client moves the sum by at most 1/2, the sensitivity that
        the noise split (2 sigma_b) assumes; TFF's quantile estimator does the same.
        """
        share = centred_count / self.expected + 0.5
        self.clip *= math.exp(-self.eta * (share - self.quantile))
        return self.clip


class PrivateRun:
    """One run's privacy: its noise multiplier (given, or calibrated to --dp-epsilon), clip and epsilon.

    `sample_rate` is q of the Poisson sampling, `steps` the steps or rounds of
    the whole run and `expected` the expected number of contributions a step
    (the fixed denominator of the noised mean).
    """

    def __init__(self, cfg, sample_rate, steps, expected, comm):
        self.delta, self.sample_rate, self.expected = cfg.dp_delta, sample_rate, expected
        self.sample_seed = cfg.seed  # who is in each step: secret too under --dp-secure-noise (below)
        if cfg.dp_secure_noise:  # subsampling amplifies privacy only if the sample cannot be predicted
            self.sample_seed = comm.bcast_object(int.from_bytes(os.urandom(8), "little") if comm.is_root else None)
        self.noise_multiplier = cfg.dp_noise if cfg.dp_noise is not None else \
            calibrate(sample_rate, steps, cfg.dp_epsilon, cfg.dp_delta)
        self.accountant = Accountant(sample_rate, self.noise_multiplier, cfg.dp_delta)
        self.noise = NoiseSource(cfg.seed, cfg.dp_secure_noise)
        self.fixed_clip = cfg.dp_clip
        self.adaptive = AdaptiveClip(cfg.dp_clip, cfg.dp_adaptive_clip, expected) if cfg.dp_adaptive_clip else None
        self.update_multiplier = self.noise_multiplier
        if self.adaptive and self.noise_multiplier > 0:
            self.update_multiplier = update_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev)

    @property
    def clip(self):
        return self.adaptive.clip if self.adaptive else self.fixed_clip

    def update_std(self):
        """The std of the noise on the summed contributions: z (its update share) x C."""
        return self.update_multiplier * self.clip

    def count_std(self):
        """The std of the noise on the count of updates that fitted under C (adaptive clipping)."""
        return self.adaptive.count_stddev if self.adaptive and self.noise_multiplier > 0 else 0.0

    def record(self, steps):
        """The fields of an epoch's or round's record, and of the summary."""
        return {"epsilon": self.accountant.epsilon(steps), "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "dp_clip": self.clip, "dp_sample_rate": self.sample_rate,
                "dp_adaptive": self.adaptive is not None}

    def state_dict(self):
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "delta": self.delta,
                "clip": self.clip}

    def check_resume(self, state):
        """Why a checkpoint's privacy state cannot continue this run's accounting, or None."""
        if state is None:
            return "was made without differential privacy; this run has --dp-clip"
        for name in ("noise_multiplier", "sample_rate", "delta"):
            if not math.isclose(state[name], getattr(self, name), rel_tol=1e-9):
                return (f"was made with DP {name} {state[name]:.6g}, this run has {getattr(self, name):.6g}: "
                        f"epsilon could not be accounted across the two (resume with the same settings)")
        return None

    def load_state_dict(self, state):
        if self.adaptive:
            self.adaptive.clip = state["clip"]

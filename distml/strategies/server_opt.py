"""Server optimizers for federated averaging (Reddi et al., "Adaptive Federated Optimization", 2021).

The server treats the averaged client update delta = mean(local - global) as a
pseudo-gradient step direction. avg with lr 1 is FedAvg; avgm adds server
momentum (Hsu et al. 2019); adam, yogi and adagrad are Reddi et al.'s
Algorithm 2 (no bias correction, adaptivity tau, v starting at tau^2). Written
here because torch.optim has no Yogi and its Adam/Adagrad differ in those
details.
"""
import torch

__all__ = ["ServerOptimizer", "KINDS"]

KINDS = ("avg", "avgm", "adam", "yogi", "adagrad")


class ServerOptimizer:
    def __init__(self, kind, lr, momentum, like, *, beta2=0.99, tau=1e-3):
        if kind not in KINDS:
            raise ValueError(f"server optimizer must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, momentum, beta2, tau
        self.m = torch.zeros_like(like)
        self.v = torch.full_like(like, tau * tau)

    @torch.no_grad()
    def step(self, x, delta):
        """x += the server's step for the averaged update `delta`, in place."""
        if self.kind == "avg":
            x.add_(delta, alpha=self.lr)
            return
        if self.kind == "avgm":
            self.m.mul_(self.beta1).add_(delta)
            x.add_(self.m, alpha=self.lr)
            return
        self.m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        square = delta * delta
        if self.kind == "adagrad":
            self.v.add_(square)
        elif self.kind == "adam":
            self.v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        else:  # yogi: v moves towards delta^2 additively, by at most (1 - beta2) delta^2
            self.v.sub_(square * torch.sign(self.v - square), alpha=1 - self.beta2)
        x.addcdiv_(self.m, self.v.sqrt().add_(self.tau), value=self.lr)

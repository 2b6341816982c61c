"""Training strategies, one file per mode, all behind `base.Strategy`."""
from .base import Strategy
from .async_ps import AsyncStrategy
from .federated import FederatedStrategy
from .sync import SyncStrategy

STRATEGIES = {"sync": SyncStrategy, "async": AsyncStrategy, "federated": FederatedStrategy}

__all__ = ["Strategy", "SyncStrategy", "AsyncStrategy", "FederatedStrategy", "STRATEGIES"]

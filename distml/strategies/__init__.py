"""Training strategies, one file per mode, all behind `base.Strategy`."""
from .base import Strategy
from .async_ps import AsyncStrategy
from .sync import SyncStrategy

STRATEGIES = {"sync": SyncStrategy, "async": AsyncStrategy}

__all__ = ["Strategy", "SyncStrategy", "AsyncStrategy", "STRATEGIES"]

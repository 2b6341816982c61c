"""Training strategies, one file per mode, all behind `base.Strategy`."""
from .base import Strategy
from .sync import SyncStrategy

STRATEGIES = {"sync": SyncStrategy}

__all__ = ["Strategy", "SyncStrategy", "STRATEGIES"]

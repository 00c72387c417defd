"""The supervised process pool that runs engine jobs; TensorFlow is imported only inside its workers."""

from __future__ import annotations

from service.workers.child import take_nice, take_realtime
from service.workers.config import PoolConfig, resolve_devices, visible_gpus, worker_memory_ceiling
from service.workers.pool import WorkerPool

__all__ = [
    "PoolConfig",
    "WorkerPool",
    "resolve_devices",
    "take_nice",
    "take_realtime",
    "visible_gpus",
    "worker_memory_ceiling",
]

"""Test-only worker handlers: each job is a dict whose "op" says what the worker process should do."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

import numpy as np

from service.errors import ShapeError
from service.limits import Limits

# Memory an "allocate" job keeps alive, as a leak would.
_HOARD: list[np.ndarray] = []
_WARMED = False
# after_reply: how often the worker loop called it, and whether its next call should raise.
_AFTER = {"calls": 0, "raise": False}


def warmup() -> None:
    global _WARMED
    _WARMED = True


def slow_warmup() -> None:
    """A start-up as slow as TensorFlow's import: long enough to see who serves meanwhile."""
    time.sleep(1.5)
    warmup()


def dispatch(job: dict[str, Any], limits: Limits) -> Any:
    op = job["op"]
    if op == "echo":
        return job.get("value")
    if op == "sleep":
        time.sleep(job["seconds"])
        return job.get("value")
    if op == "pid":
        return os.getpid()
    if op == "abort":
        os.abort()
    if op == "segfault":
        ctypes.string_at(0)
    if op == "allocate":
        _HOARD.append(np.ones(job["mb"] * 2**20, dtype=np.uint8))  # ones, not zeros: pages are touched
        return job.get("value")
    if op == "shape_error":
        raise ShapeError("x has shape (2,) but y has shape (3,)", left=[2], right=[3])
    if op == "bug":
        raise ValueError("secret internal detail")
    if op == "env":
        return {name: os.environ.get(name) for name in job["names"]}
    if op == "modules":
        return sorted(name for name in sys.modules if name.split(".")[0] in job["roots"])
    if op == "warmed":
        return _WARMED
    if op == "limits":
        return limits
    if op == "after_replies":
        _AFTER["raise"] = bool(job.get("then_raise", False))
        return _AFTER["calls"]
    raise AssertionError(f"unknown op {op!r}")


def after_reply() -> None:
    """The worker loop calls this after each reply is sent (the engine builds numpy plans there)."""
    _AFTER["calls"] += 1
    if _AFTER["raise"]:
        _AFTER["raise"] = False
        raise RuntimeError("after_reply failed")


class SignedJob(dict[str, Any]):
    """A job with a compile-cache signature, as service.jobs.GradientJob has."""

    def signature(self) -> str:
        return str(self.get("signature", ""))

"""Where a request's work runs: on the event loop when it is about a millisecond or less, else in a thread.

The event loop answers every client, so nothing on it may take long; a thread hop costs ~0.1-0.2 ms,
too much to pay on every small request. Each piece of work is judged by what it is, before it runs:

- parsing a JSON body: by its bytes (orjson reads ~600 KB of float lists per millisecond here);
- decoding or encoding tensors: by their element count, claimed from shapes without decoding;
- checking a program (parse, resolve, count): by the characters of its texts that are not in the
  check cache (the parser and checker do ~350 characters per millisecond), so a repeated program
  costs a dictionary lookup wherever it is;
- a model spec: bounded by ``max_layers`` (64 layers check in ~0.4 ms), so it never needs a thread.

The measurements are from this project's 2-core machines (Python 3.11); `tests/api/test_offload.py`
checks each decision, `bench/api_bounds.py` the effect on /healthz.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

__all__ = [
    "ON_LOOP_BODY_BYTES",
    "ON_LOOP_ELEMENTS",
    "ON_LOOP_PROGRAM_CHARS",
    "RequestWork",
    "LOOP_SWITCH_INTERVAL_S",
    "WORK_THREAD_NICE",
    "claimed_elements",
    "off_loop_if",
    "keep_the_loop_responsive",
]

T = TypeVar("T")

# ~1 ms of orjson parsing of a body of JSON numbers (base64 bodies parse about twice as fast).
ON_LOOP_BODY_BYTES = 512 * 1024
# ~1 ms of decoding a JSON list of floats into numpy (base64 is ~50x cheaper; the bound is for lists).
ON_LOOP_ELEMENTS = 32 * 1024
# ~1 ms of parsing and checking program text that the check cache does not know.
ON_LOOP_PROGRAM_CHARS = 400

# How long a thread that computes may keep the interpreter while the event loop waits for it. Python's
# default, 5 ms, is paid at every point where the loop gives the GIL up and takes it back (each
# socket read and write): a /healthz answer takes a few of those, so a checking thread made its p99
# 70-135 ms (bench/api_bounds.py). At 0.5 ms the loop waits a tenth as long; the cost is more frequent
# switches in the thread, a few percent of its speed.
LOOP_SWITCH_INTERVAL_S = 0.0005

# The nice value of threads doing costly request work: the kernel then gives the event loop's thread
# (nice 0) about ten times their share of a busy core, so a thread that checks a 100,000-character
# program slows the loop's answers little even when every core is taken (2-core machines).
WORK_THREAD_NICE = 10

_MAX_RANK = 32
_thread_state = threading.local()  # deeper nesting is refused when decoding; counting stops there too


@dataclass(frozen=True, slots=True)
class RequestWork:
    """What preparing a request will cost, measured before any of it is done."""

    body_bytes: int = 0  # JSON still to parse (0 once parsed)
    elements: int = 0  # tensor elements to decode, as claimed by their shapes
    program_chars: int = 0  # program text the check cache does not know

    @property
    def costly(self) -> bool:
        """More than about a millisecond of work: it goes to a thread."""
        return (
            self.body_bytes > ON_LOOP_BODY_BYTES
            or self.elements > ON_LOOP_ELEMENTS
            or self.program_chars > ON_LOOP_PROGRAM_CHARS
        )


def claimed_elements(values: Iterable[Any]) -> int:
    """About how many elements these wire tensors hold, from their shapes alone (nothing is decoded).

    A base64 tensor's ``shape`` and a nested list's lengths along its first elements; a claim that
    turns out false is caught when decoding (which then runs wherever this count sent it).
    """
    total = 0
    for value in values:
        if isinstance(value, Mapping):
            shape = value.get("shape")
            if isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                # Any zero-length axis counts as one: decoding still reads every other axis.
                total += math.prod(max(1, abs(d)) for d in shape)
            continue
        count = 1
        for _ in range(_MAX_RANK):
            if not isinstance(value, list):
                break
            count *= max(1, len(value))
            if not value:
                break
            value = value[0]
        total += count
    return total


def keep_the_loop_responsive() -> None:
    """Tune the API process for a loop that shares it with working threads (once, as the app starts).

    - the GIL switch interval (``LOOP_SWITCH_INTERVAL_S``);
    - ``gc.freeze()`` after start-up: the modules, app and settings (~10^5 objects) move out of the
      collector's reach, so a full collection, which a checking thread's allocations trigger and
      which holds the GIL throughout, scans only what requests created. Without it, /healthz p99
      under a loop of 100,000-character programs was 57-69 ms; with it, 33 ms (bench/api_bounds.py).
    """
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


def _yielding(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in a thread that first makes itself nicer than the event loop (once per thread)."""
    if not getattr(_thread_state, "niced", False):
        _thread_state.niced = True
        try:  # Linux: a thread's own nice value (PRIO_PROCESS with a thread id)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORK_THREAD_NICE)
        except (AttributeError, OSError):  # elsewhere, or not allowed: the work still runs
            pass
    return work(*args)


async def off_loop_if(costly: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: in a (nicer) thread when ``costly``, else right here on the event loop."""
    if costly:
        return await run_in_threadpool(_yielding, work, *args)
    return work(*args)

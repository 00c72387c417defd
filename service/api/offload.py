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

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

__all__ = [
    "ON_LOOP_BODY_BYTES",
    "ON_LOOP_ELEMENTS",
    "ON_LOOP_PROGRAM_CHARS",
    "RequestWork",
    "claimed_elements",
    "off_loop_if",
]

T = TypeVar("T")

# ~1 ms of orjson parsing of a body of JSON numbers (base64 bodies parse about twice as fast).
ON_LOOP_BODY_BYTES = 512 * 1024
# ~1 ms of decoding a JSON list of floats into numpy (base64 is ~50x cheaper; the bound is for lists).
ON_LOOP_ELEMENTS = 32 * 1024
# ~1 ms of parsing and checking program text that the check cache does not know.
ON_LOOP_PROGRAM_CHARS = 400

_MAX_RANK = 32  # deeper nesting is refused when decoding; counting stops there too


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


async def off_loop_if(costly: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: in a thread when ``costly``, else right here on the event loop."""
    if costly:
        return await run_in_threadpool(work, *args)
    return work(*args)

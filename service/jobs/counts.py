"""Loop counts from request constants: ``fori(n, ...)`` where ``n`` is a constant of the request.

A loop's step count is static (the loop is traced once, its size bounds are checked before it is
built), so the value of such a constant is part of the compiled program, like a literal would be:
a job lists these constants (``counts``, found by ``service.expr.program``'s check) and puts their
values in its signature. Each must hold one integer, 0 .. ``MAX_COUNT``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.errors import InvalidRequest

__all__ = ["MAX_COUNT", "counts_signature", "loop_counts"]

MAX_COUNT = 2**31 - 1  # as for any integer literal of the language


def loop_counts(constants: Mapping[str, np.ndarray], counts: Sequence[str]) -> dict[str, int]:
    """The value of each constant named in ``counts``, or the 422 saying why it cannot be a count."""
    out: dict[str, int] = {}
    for name in counts:
        field = f"constants.{name}"
        if name not in constants:
            raise InvalidRequest(f"{field} is a loop's step count but is not given", field=field)
        value = np.asarray(constants[name])
        if value.shape != ():
            raise InvalidRequest(
                f"{field} is the step count of a fori(): it must be one integer (a scalar), "
                f"not shape {list(value.shape)}",
                field=field,
            )
        number = float(value)
        if not (number.is_integer() and 0 <= number <= MAX_COUNT):
            raise InvalidRequest(
                f"{field} is the step count of a fori(): it must be an integer from 0 to {MAX_COUNT}, "
                f"got {number!r}",
                field=field,
            )
        out[name] = int(number)
    return out


def counts_signature(constants: Mapping[str, np.ndarray], counts: Sequence[str]) -> str:
    """The counts' values as a job's signature spells them (the job was checked: they are integers)."""
    return ",".join(f"{name}={int(np.asarray(constants[name]))}" for name in counts)

"""The independent reference of the engine tests: float64 central finite differences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Arrays = dict[str, np.ndarray]


def shifted(variables: Arrays, name: str, index: tuple[int, ...], delta: float) -> Arrays:
    out = {k: v.copy() for k, v in variables.items()}
    out[name][index] += delta
    return out


def finite_difference(
    fn: Callable[[Arrays], np.ndarray], variables: Arrays, name: str, step: float, points: int
) -> np.ndarray:
    """d fn / d variables[name], shape fn(...).shape + variable.shape, by a 3- or 5-point stencil."""
    columns = []
    for index in np.ndindex(variables[name].shape):

        def at(delta: float, index: tuple[int, ...] = index) -> np.ndarray:
            return np.asarray(fn(shifted(variables, name, index, delta)), np.float64)

        if points == 3:
            columns.append((at(step) - at(-step)) / (2 * step))
        else:
            columns.append((-at(2 * step) + 8 * at(step) - 8 * at(-step) + at(-2 * step)) / (12 * step))
    out_shape = columns[0].shape
    return np.moveaxis(np.array(columns), 0, -1).reshape(out_shape + variables[name].shape)

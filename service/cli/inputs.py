"""Command-line values and files as arrays: tensors (3, 1,2,3, JSON, @file.npy), NAME=VALUE lists,
and the spec and data files of ``tapeserve train``. A value that cannot be used is a UsageError."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from service.cli.exits import UsageError

__all__ = ["load_train_inputs", "parse_assignments", "parse_tensor"]


def parse_tensor(text: str, what: str) -> Any:
    """A command-line tensor: 3, 1,2,3, JSON nested lists (NaN/Infinity allowed), or @file.npy."""
    import numpy as np

    text = text.strip()
    if text.startswith("@"):
        try:
            return np.load(text[1:], allow_pickle=False)  # never pickles: a file is data, not code
        except (OSError, ValueError) as error:
            raise UsageError(f"{what}: cannot read {text[1:]}: {error}") from None
    try:
        if text.startswith("["):
            value = json.loads(text, parse_constant=float)
            return np.array(value, dtype=np.float64)
        if "," in text:
            return np.array([float(item) for item in text.split(",") if item.strip()], dtype=np.float64)
        return np.float64(float(text))
    except (ValueError, TypeError) as error:
        raise UsageError(
            f"{what}: {text!r} is not a tensor (write 3, 1,2,3, [[1,2],[3,4]] or @file.npy): {error}"
        ) from None


def parse_assignments(items: Sequence[str], option: str) -> dict[str, Any]:
    """``--var x=1,2 --var y=3`` as {"x": array, "y": array}; each name once."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"{option} {item!r}: write NAME=VALUE, e.g. {option} x=1,2,3")
        if name in values:
            raise UsageError(f"{option}: {name} is given twice")
        values[name] = parse_tensor(value, f"{option} {name}")
    return values


def load_train_inputs(spec_path: str, data_path: str) -> tuple[dict[str, Any], Any, Any]:
    """(request template, x, y) from the spec file (a model spec or a request template) and the .npz."""
    import numpy as np

    try:
        with open(spec_path, encoding="utf-8") as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the spec {spec_path}: {error}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{spec_path} must hold a JSON object (a model spec or a request template)")
    template = dict(spec) if "model" in spec else {"model": spec}
    try:
        with np.load(data_path, allow_pickle=False) as data:  # data, never pickled code
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the data {data_path}: {error}") from None
    if "x" not in arrays:
        raise UsageError(f"{data_path} has no array named x (it has: {', '.join(arrays) or 'none'})")
    return template, arrays["x"], arrays.get("y")

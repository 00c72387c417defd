"""GradBench's evals (github.com/gradbench/gradbench) written as tapeserve requests, one module per eval.

Each module has ``FUNCTIONS``: the eval's function names mapped to ``(client, input) -> output``,
where ``input`` is the eval's JSON input and ``output`` what GradBench expects back. The service does
the math in float64; the client only reshapes inputs and outputs (and lays out ba's sparse Jacobian and
ht's pose table). ``tool.py`` speaks GradBench's protocol on stdin/stdout with these modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.client import Client

Evaluate = Callable[[Client, Any], Any]

# Every request computes in float64: GradBench checks |x-y|/max(1,|x|+|y|) <= 1e-4 against float64.
DTYPE = "float64"

__all__ = ["DTYPE", "Evaluate"]

"""The limits every request is checked against before work starts (plain data, shared by all layers)."""

from __future__ import annotations

from dataclasses import dataclass

# The shortest deadline a request may ask for (timeout_s): below it no answer but a 504 is possible
# (the hop to a worker alone can take this long on a loaded machine), so it is refused as a 422.
MIN_TIMEOUT_S = 0.1


@dataclass(frozen=True, slots=True)
class Limits:
    # 16 MiB holds a 1M-element float64 tensor in base64 (~11 MiB) with room to spare.
    max_body_bytes: int = 16 * 1024 * 1024
    # Long enough for any hand-written model; short enough to parse in well under a millisecond.
    max_expression_chars: int = 20_000
    # Every text of one request together (expression, function bodies, custom gradients): checked
    # before any of them is parsed, so a program's check costs milliseconds, not seconds.
    max_program_chars: int = 100_000
    # Nesting far beyond anything a person writes, far below the ~1,000 frames Python allows.
    max_nesting_depth: int = 100
    # Graph size after inlining user functions; bounds tracing time (~tens of ms per 1,000 ops).
    max_syntax_nodes: int = 10_000
    # One input tensor: 1M elements is 8 MB in float64.
    max_input_elements: int = 1_000_000
    # Any intermediate or output tensor, checked from static shapes before anything runs (80 MB f64).
    max_tensor_elements: int = 10_000_000
    # Numeric literals: beyond float64's range a literal is a typo or an attack, not a value.
    max_literal_digits: int = 400
    # Names of variables, constants, functions and parameters: longer than any name a person writes;
    # messages quote names and caches keep them, so their length is bounded before either.
    max_name_chars: int = 64
    # User-defined functions per request.
    max_functions: int = 64
    # Variables plus constants per request.
    max_inputs: int = 64
    # Highest derivative order for `order`.
    max_order: int = 4
    # Batch points per request when `batch` is true (the leading axis).
    max_batch: int = 100_000
    # Model parameters: 1M float32 weights are 4 MB raw, ~11 MB as JSON numbers each way.
    max_params: int = 1_000_000
    # Layers per model spec: deeper than any model a stateless per-request service should build.
    max_layers: int = 64
    # Optimizer steps per request: the seed's 500-epoch loop with room; streaming shows progress.
    max_steps: int = 10_000

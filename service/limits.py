"""The limits every request is checked against before work starts (plain data, shared by all layers)."""

from __future__ import annotations

from dataclasses import dataclass

# The shortest deadline a request may ask for (timeout_s): below it no answer but a 504 is possible
# (the hop to a worker alone can take this long on a loaded machine), so it is refused as a 422.
MIN_TIMEOUT_S = 0.1

# What one input element may cost a worker at most, bytes: the float64 input, its copy in the traced
# call, its gradient and a typical program's intermediates of the input's size, 16 float64 copies
# in all. A maximal input then takes at most the worker's whole ceiling, not more.
BYTES_PER_INPUT_ELEMENT = 128
# Never below the flat limit the service started with: a small ceiling must not refuse what a
# laptop-sized request always could send.
MIN_DERIVED_INPUT_ELEMENTS = 1_000_000


def input_elements_for(memory_limit_mb: int | None, max_tensor_elements: int, fallback: int) -> int:
    """The per-input element limit that follows a worker's memory ceiling (MiB; None: off/unknown).

    The ceiling divided by what an element may cost, between 1,000,000 and the intermediate-tensor
    limit (an input is a tensor too); ``fallback`` (capped likewise) when there is no ceiling.
    """
    if memory_limit_mb is None:
        return min(fallback, max_tensor_elements)
    derived = memory_limit_mb * 2**20 // BYTES_PER_INPUT_ELEMENT
    return min(max_tensor_elements, max(MIN_DERIVED_INPUT_ELEMENTS, derived))


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
    # One input tensor. The server derives it from the worker memory ceiling when it is not set
    # (input_elements_for below); this is the value when the ceiling is off or unknown: 2M elements
    # is 16 MB in float64 (GradBench's largest lse input, 1.28M, fits).
    max_input_elements: int = 2_000_000
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

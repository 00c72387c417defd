"""What every job kind's compiled programs share: the bounded program cache, tracing, error text.

A program is whatever one job signature compiles to (a traced tape program, or a Keras model with
its optimizer and traced functions); each kind keeps its programs in a ``ProgramCache`` keyed by
the job's ``signature()``. Imported only in worker processes (TensorFlow).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import tensorflow as tf
from tensorflow.python.eager import context

from service.errors import NotDifferentiable, ShapeError, TapeserveError

__all__ = ["FlatCall", "ProgramCache", "dense", "error_message", "trace", "without_grappler"]

P = TypeVar("P")


class ProgramCache(Generic[P]):
    """A bounded LRU of compiled programs; evicting one frees its graphs (and model, optimizer)."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.entries: OrderedDict[str, P] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> P | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return entry

    def put(self, key: str, program: P) -> None:
        self.entries[key] = program
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def get_or_build(self, key: str, build: Callable[[], P]) -> tuple[P, str]:
        """The program and "hit", or the one ``build`` makes (then cached) and "miss"."""
        program = self.get(key)
        if program is not None:
            return program, "hit"
        program = build()
        self.put(key, program)
        return program, "miss"

    def info(self) -> dict[str, int]:
        return {"size": len(self.entries), "capacity": self.size, "hits": self.hits, "misses": self.misses}


def error_message(text: str, default: str) -> str:
    """The op's own complaint from a TF error's text, without TF's construction traceback."""
    noise = ("File ", "Graph execution error", "Detected at node", "[[", "Traceback")
    lines = [ln.strip() for ln in text.splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(noise)]
    return (useful[-1] if useful else default)[:300]


def dense(grads: list[Any]) -> list[Any]:
    """Gradients through gather (embeddings) come back as IndexedSlices; clients, clipping and outer
    tapes need tensors."""
    return [tf.convert_to_tensor(g) for g in grads]


class FlatCall:
    """A traced concrete function called through its flat entry point.

    ``ConcreteFunction.__call__`` canonicalizes and unpacks its arguments against the structured
    signature, ~0.5 ms a call here: as much as the 32-64-1 training step itself. The input signature
    is fixed when tracing, so a dtype and shape check per argument is all that binding would do;
    ``_call_flat`` is private, but stable across the tensorflow minor version pyproject.toml pins.
    """

    __slots__ = ("_call", "_concrete", "_specs")

    def __init__(self, concrete: Any, specs: list[tf.TensorSpec]) -> None:
        self._concrete = concrete
        self._specs = specs
        self._call = getattr(concrete, "_call_flat", None)

    def __call__(self, *args: Any) -> Any:
        specs = enumerate(zip(args, self._specs, strict=True))
        tensors = [self._tensor(a, spec, i) for i, (a, spec) in specs]
        if self._call is None:
            return self._concrete(*tensors)
        return self._call(tensors, self._concrete.captured_inputs)

    @staticmethod
    def _tensor(arg: Any, spec: tf.TensorSpec, i: int) -> Any:
        tensor = arg if isinstance(arg, tf.Tensor) else tf.constant(arg, spec.dtype)
        if tensor.dtype != spec.dtype or not spec.shape.is_compatible_with(tensor.shape):
            raise ShapeError(
                f"input {i} of the compiled program is {tensor.dtype.name}{tensor.shape.as_list()}; "
                f"it expects {spec.dtype.name}{spec.shape.as_list()}"
            )
        return tensor


def trace(fn: Callable[..., Any], specs: list[tf.TensorSpec]) -> Callable[..., Any]:
    """A function traced now, so build errors surface as 4xx before any step runs; called flat."""
    traced = tf.function(fn, input_signature=specs, autograph=False)
    try:
        concrete = traced.get_concrete_function()
    except TapeserveError:
        raise
    except LookupError as exc:
        raise NotDifferentiable(f"an operation has no gradient: {exc}") from None
    except (ValueError, TypeError) as exc:
        message = error_message(str(exc), type(exc).__name__)
        raise ShapeError(f"the model could not be built for these inputs: {message}") from None
    return FlatCall(concrete, specs)


@functools.cache
def _grappler_off() -> Any:
    """The worker's function call options with Grappler's meta optimizer off (made at first use, so
    it copies the configuration the worker set up at start)."""
    config = context.context().config
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return context.FunctionCallOptions(config_proto=config)


def without_grappler(call: Callable[..., Sequence[Any]]) -> Callable[..., Sequence[Any]]:
    """``call`` (a traced program's flat call) run without Grappler's graph optimizations.

    A function is optimized when it is first called, as part of instantiating it: for a small
    program (rosen10 gradient+Hessian, ~210 nodes) Grappler is ~7 of the ~21 ms of CPU the first
    call takes, and it gains nothing measurable on later calls of such a program. Whether Grappler
    runs comes from the calling thread's function call options (TensorFlow's private eager
    context, stable across the minor version pyproject.toml pins). Instantiations are cached per
    options: a program is instantiated once without Grappler, and once more with it if a call fails.

    A call that fails runs again optimized: when several ops of a graph would fail, which one
    reports first follows the graph's node order, which Grappler changes, and the client gets the
    message it always got (e.g. segment_sum's own "out of range" rather than its gradient's gather).
    """

    def call_without_grappler(*args: Any) -> Sequence[Any]:
        ctx = context.context()
        saved = ctx.function_call_options
        ctx.function_call_options = _grappler_off()
        try:
            return call(*args)
        except tf.errors.InvalidArgumentError:
            pass  # answered below, outside this handler: the optimized call's error is the one to raise
        finally:
            ctx.function_call_options = saved
        return call(*args)

    return call_without_grappler

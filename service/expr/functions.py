"""The one table of allowed functions: signature, one-line doc and TensorFlow rule side by side.

Importing this module does not import TensorFlow: each rule receives the compiler's context
(``ctx.tf`` is the tensorflow module, ``ctx.dtype`` the request's float dtype), so the API can list
and check calls while only worker processes ever run them. Names follow numpy, semantics follow TF.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BUILTINS", "CONSTANTS", "Builtin", "Context", "Param", "REQUIRED"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Param kinds. Tensor kinds take any expression; the others must be literals (they fix shapes).
TENSOR = "tensor"  # any expression
TENSORS = "tensors"  # a list [a, b, ...] of expressions
VARIADIC = "*tensors"  # the remaining positional arguments, each an expression
AXIS = "axis"  # None, an integer, or a tuple of integers
INT = "int"  # an integer literal
SHAPE = "shape"  # an integer or a tuple of integers
STR = "str"  # a string literal
BOOL = "bool"  # True or False
NUMBER = "number"  # a numeric literal (also pi, e, inf)
DTYPE = "dtype"  # "float32", "float64", "int32" or "bool"
ORD = "ord"  # a norm order: None, 1, 2, inf, or "fro"

DTYPES = ("float32", "float64", "int32", "bool")
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "inf": math.inf}


class Context(Protocol):
    """What a rule may use: TensorFlow, the request dtype, and the element-count guard."""

    tf: Any
    dtype: Any

    def check_elements(self, count: float, what: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: str = TENSOR
    default: Any = REQUIRED

    def render(self) -> str:
        if self.kind == VARIADIC:
            return f"*{self.name}"
        return self.name if self.default is REQUIRED else f"{self.name}={self.default!r}"


@dataclass(frozen=True, slots=True)
class Builtin:
    name: str
    params: tuple[Param, ...]
    doc: str
    rule: Callable[..., Any]
    category: str

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(p.render() for p in self.params)})"


BUILTINS: dict[str, Builtin] = {}


def _add(category: str, name: str, params: Sequence[Param | str], doc: str) -> Callable[..., Any]:
    def register(rule: Callable[..., Any]) -> Callable[..., Any]:
        ps = tuple(Param(p) if isinstance(p, str) else p for p in params)
        BUILTINS[name] = Builtin(name, ps, doc, rule, category)
        return rule

    return register


def _unary(name: str, doc: str, rule: Callable[[Context, Any], Any]) -> None:
    _add("elementwise", name, ["x"], doc)(rule)


# -- elementwise ---------------------------------------------------------------------------------

_unary("abs", "Absolute value |x|.", lambda c, x: c.tf.abs(x))
_unary("sign", "Sign of x: -1, 0 or 1 (zero derivative).", lambda c, x: c.tf.sign(x))
_unary("sqrt", "Square root.", lambda c, x: c.tf.sqrt(x))
_unary("square", "x squared.", lambda c, x: c.tf.square(x))
_unary("exp", "Exponential e**x.", lambda c, x: c.tf.exp(x))
_unary("expm1", "exp(x) - 1, accurate near 0.", lambda c, x: c.tf.math.expm1(x))
_unary("log", "Natural logarithm.", lambda c, x: c.tf.math.log(x))
_unary("log1p", "log(1 + x), accurate near 0.", lambda c, x: c.tf.math.log1p(x))
_unary("log2", "Base-2 logarithm.", lambda c, x: c.tf.math.log(x) / math.log(2.0))
_unary("log10", "Base-10 logarithm.", lambda c, x: c.tf.math.log(x) / math.log(10.0))
_unary("sin", "Sine (radians).", lambda c, x: c.tf.sin(x))
_unary("cos", "Cosine (radians).", lambda c, x: c.tf.cos(x))
_unary("tan", "Tangent (radians).", lambda c, x: c.tf.tan(x))
_unary("arcsin", "Inverse sine.", lambda c, x: c.tf.asin(x))
_unary("arccos", "Inverse cosine.", lambda c, x: c.tf.acos(x))
_unary("arctan", "Inverse tangent.", lambda c, x: c.tf.atan(x))
_unary("sinh", "Hyperbolic sine.", lambda c, x: c.tf.sinh(x))
_unary("cosh", "Hyperbolic cosine.", lambda c, x: c.tf.cosh(x))
_unary("tanh", "Hyperbolic tangent.", lambda c, x: c.tf.tanh(x))
_unary("arcsinh", "Inverse hyperbolic sine.", lambda c, x: c.tf.asinh(x))
_unary("arccosh", "Inverse hyperbolic cosine.", lambda c, x: c.tf.acosh(x))
_unary("arctanh", "Inverse hyperbolic tangent.", lambda c, x: c.tf.atanh(x))
_unary("sigmoid", "Logistic sigmoid 1 / (1 + exp(-x)).", lambda c, x: c.tf.sigmoid(x))
_unary("relu", "max(x, 0).", lambda c, x: c.tf.nn.relu(x))
_unary("softplus", "log(1 + exp(x)).", lambda c, x: c.tf.nn.softplus(x))
_unary("elu", "Exponential linear unit (alpha 1).", lambda c, x: c.tf.nn.elu(x))
_unary("selu", "Scaled exponential linear unit.", lambda c, x: c.tf.nn.selu(x))
# Written out rather than tf.nn.gelu, which rounds its 1/sqrt(2) to float32 even in float64.
_unary(
    "gelu",
    "Gaussian error linear unit (exact, erf form).",
    lambda c, x: 0.5 * x * (1.0 + c.tf.math.erf(x * c.tf.constant(1.0 / math.sqrt(2.0), x.dtype))),
)
_unary("swish", "x * sigmoid(x) (SiLU).", lambda c, x: c.tf.nn.silu(x))
_unary("erf", "Error function.", lambda c, x: c.tf.math.erf(x))
_unary("lgamma", "log |Gamma(x)|.", lambda c, x: c.tf.math.lgamma(x))
_unary("digamma", "Digamma psi(x), the derivative of lgamma.", lambda c, x: c.tf.math.digamma(x))
_unary("floor", "Round down (zero derivative).", lambda c, x: c.tf.floor(x))
_unary("ceil", "Round up (zero derivative).", lambda c, x: c.tf.math.ceil(x))
_unary("round", "Round half to even, like numpy (zero derivative).", lambda c, x: c.tf.round(x))
_unary("zeros_like", "Zeros with x's shape.", lambda c, x: c.tf.zeros_like(x))
_unary("ones_like", "Ones with x's shape.", lambda c, x: c.tf.ones_like(x))


@_add("elementwise", "multigammaln", ["a", Param("p", INT)],
      "log of the multivariate gamma function Gamma_p(a), elementwise (scipy's multigammaln).")  # fmt: skip
def _multigammaln(c: Context, a: Any, p: int) -> Any:
    # log Gamma_p(a) = p(p-1)/4 log(pi) + sum_{j=1..p} lgamma(a + (1-j)/2); p fixes the term count
    if p < 1:
        raise ValueError("multigammaln p must be at least 1")
    if p > 10_000:  # one lgamma op per term: more terms than any dimension a request can carry
        raise ValueError("multigammaln p may be at most 10000")
    tf = c.tf
    terms = [tf.math.lgamma(a + (1.0 - j) / 2.0) for j in range(1, p + 1)]
    return tf.add_n(terms) + p * (p - 1) / 4.0 * math.log(math.pi)


_add("elementwise", "arctan2", ["y", "x"], "Angle of the point (x, y), elementwise.")(
    lambda c, y, x: c.tf.atan2(y, x)
)
_add("elementwise", "maximum", ["a", "b"], "Elementwise maximum (broadcasting).")(
    lambda c, a, b: c.tf.maximum(a, b)
)
_add("elementwise", "minimum", ["a", "b"], "Elementwise minimum (broadcasting).")(
    lambda c, a, b: c.tf.minimum(a, b)
)
_add("elementwise", "clip", ["x", "lo", "hi"], "x limited to [lo, hi], elementwise.")(
    lambda c, x, lo, hi: c.tf.minimum(c.tf.maximum(x, lo), hi)
)
_add("elementwise", "where", ["condition", "a", "b"], "a where condition holds, else b (broadcasting).")(
    lambda c, cond, a, b: c.tf.where(cond, a, b)
)


@_add(
    "elementwise",
    "cast",
    ["x", Param("dtype", DTYPE)],
    'x converted to "float32", "float64", "int32" or "bool".',
)
def _cast(c: Context, x: Any, dtype: str) -> Any:
    return c.tf.cast(x, getattr(c.tf, dtype))


# -- reductions ----------------------------------------------------------------------------------

_AXIS = Param("axis", AXIS, None)
_KEEP = Param("keepdims", BOOL, False)


def _reduction(name: str, doc: str, tf_name: str) -> None:
    def rule(c: Context, x: Any, axis: Any, keepdims: bool) -> Any:
        fn = c.tf.math
        for part in tf_name.split("."):
            fn = getattr(fn, part)
        return fn(x, axis=axis, keepdims=keepdims)

    _add("reduction", name, ["x", _AXIS, _KEEP], doc)(rule)


_reduction("sum", "Sum over axis (all axes by default).", "reduce_sum")
_reduction("mean", "Mean over axis (all axes by default).", "reduce_mean")
_reduction("prod", "Product over axis (all axes by default).", "reduce_prod")
_reduction("max", "Maximum over axis (all axes by default).", "reduce_max")
_reduction("min", "Minimum over axis (all axes by default).", "reduce_min")
_reduction("logsumexp", "log(sum(exp(x))) over axis, computed stably.", "reduce_logsumexp")
_reduction("var", "Population variance (ddof=0, like numpy) over axis.", "reduce_variance")
_reduction("std", "Population standard deviation (ddof=0) over axis.", "reduce_std")


@_add("reduction", "norm", ["x", Param("ord", ORD, None), _AXIS, _KEEP],
      'Entrywise norm over axis: ord None/2/"fro" Euclidean, 1 sum |x|, inf max |x|.')  # fmt: skip
def _norm(c: Context, x: Any, ord: Any, axis: Any, keepdims: bool) -> Any:
    tf = c.tf
    if ord == 1:
        return tf.reduce_sum(tf.abs(x), axis=axis, keepdims=keepdims)
    if ord == math.inf:
        return tf.reduce_max(tf.abs(x), axis=axis, keepdims=keepdims)
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=keepdims))


def _cumulative(tf_name: str) -> Callable[..., Any]:
    def rule(c: Context, x: Any, axis: Any) -> Any:
        if axis is None:  # numpy flattens first
            x, axis = c.tf.reshape(x, [-1]), 0
        return getattr(c.tf.math, tf_name)(x, axis=axis)

    return rule


_add(
    "reduction", "cumsum", ["x", Param("axis", INT, None)], "Running sum along axis (flattened by default)."
)(_cumulative("cumsum"))
_add(
    "reduction",
    "cumprod",
    ["x", Param("axis", INT, None)],
    "Running product along axis (flattened by default).",
)(_cumulative("cumprod"))

# -- linear algebra ------------------------------------------------------------------------------


@_add(
    "linalg",
    "matmul",
    ["a", "b"],
    "Matrix product with numpy's rules for 1-D operands and batch broadcasting.",
)
def _matmul(c: Context, a: Any, b: Any) -> Any:
    tf = c.tf
    ra, rb = len(a.shape), len(b.shape)
    if ra == 0 or rb == 0:
        raise ValueError("matmul does not take scalars; use * instead")
    if ra == 1 and rb == 1:
        return tf.tensordot(a, b, 1)
    if ra == 1:
        return tf.squeeze(tf.linalg.matmul(a[None, :], b), -2)
    if rb == 1:
        return tf.squeeze(tf.linalg.matmul(a, b[:, None]), -1)
    return tf.linalg.matmul(a, b)


@_add(
    "linalg",
    "dot",
    ["a", "b"],
    "numpy dot: inner product of vectors, matrix product, or sum over a's last axis.",
)
def _dot(c: Context, a: Any, b: Any) -> Any:
    tf = c.tf
    ra, rb = len(a.shape), len(b.shape)
    if ra == 0 or rb == 0:
        return a * b
    if rb == 1:
        return tf.tensordot(a, b, [[ra - 1], [0]])
    return tf.tensordot(a, b, [[ra - 1], [rb - 2]])


@_add("linalg", "einsum", [Param("subscripts", STR), Param("operands", VARIADIC)],
      'Einstein summation, e.g. einsum("ij,jk->ik", a, b).')  # fmt: skip
def _einsum(c: Context, subscripts: str, *operands: Any) -> Any:
    return c.tf.einsum(subscripts, *operands)


@_add("linalg", "transpose", ["x", Param("axes", AXIS, None)], "Permute axes (reverse them by default).")
def _transpose(c: Context, x: Any, axes: Any) -> Any:
    return c.tf.transpose(x, perm=None if axes is None else list(axes))


@_add("linalg", "trace", ["x"], "Sum of the diagonal over the first two axes, like numpy.")
def _trace(c: Context, x: Any) -> Any:
    rank = len(x.shape)
    perm = [*range(2, rank), 0, 1]
    return c.tf.linalg.trace(c.tf.transpose(x, perm) if rank > 2 else x)


@_add("linalg", "cross", ["a", "b"], "Cross product over the last axis (length 3), broadcasting like numpy.")
def _cross(c: Context, a: Any, b: Any) -> Any:
    tf = c.tf
    if not a.shape or not b.shape or int(a.shape[-1]) != 3 or int(b.shape[-1]) != 3:
        raise ValueError("cross takes vectors of length 3 along the last axis")
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return tf.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], axis=-1)


_add("linalg", "det", ["x"], "Determinant of a square matrix (batched over leading axes).")(
    lambda c, x: c.tf.linalg.det(x)
)
_add("linalg", "slogdet", ["x"], "log |det x| (the second result of numpy's slogdet).")(
    lambda c, x: c.tf.linalg.slogdet(x)[1]
)
_add("linalg", "inv", ["x"], "Matrix inverse.")(lambda c, x: c.tf.linalg.inv(x))
_add("linalg", "cholesky", ["x"], "Lower Cholesky factor of a symmetric positive-definite matrix.")(
    lambda c, x: c.tf.linalg.cholesky(x)
)


@_add("linalg", "solve", ["a", "b"], "x with a @ x = b (b a vector or a matrix).")
def _solve(c: Context, a: Any, b: Any) -> Any:
    tf = c.tf
    if len(b.shape) == len(a.shape) - 1:
        return tf.squeeze(tf.linalg.solve(a, b[..., None]), -1)
    return tf.linalg.solve(a, b)


@_add("linalg", "diag", ["x", Param("k", INT, 0)], "Vector -> diagonal matrix; matrix -> its k-th diagonal.")
def _diag(c: Context, x: Any, k: int) -> Any:
    if len(x.shape) == 1:
        n = int(x.shape[0]) + abs(k)
        c.check_elements(n * n, "diag")
        return c.tf.linalg.diag(x, k=k)
    if len(x.shape) == 2:
        return c.tf.linalg.diag_part(x, k=k)
    raise ValueError(f"diag takes a 1-D or 2-D tensor, got {len(x.shape)}-D")


@_add("linalg", "eye", [Param("n", INT), Param("m", INT, None)], "n x m identity matrix (m defaults to n).")
def _eye(c: Context, n: int, m: int | None) -> Any:
    c.check_elements(n * (n if m is None else m), "eye")
    return c.tf.eye(n, m, dtype=c.dtype)


# -- shapes --------------------------------------------------------------------------------------


@_add("shape", "reshape", ["x", Param("shape", SHAPE)], "Same elements in a new shape (one -1 allowed).")
def _reshape(c: Context, x: Any, shape: tuple[int, ...]) -> Any:
    return c.tf.reshape(x, list(shape))


@_add(
    "shape",
    "concatenate",
    [Param("arrays", TENSORS), Param("axis", INT, 0)],
    "Join [a, b, ...] along an axis.",
)
def _concatenate(c: Context, arrays: list[Any], axis: int) -> Any:
    return c.tf.concat(arrays, axis=axis)


@_add(
    "shape", "stack", [Param("arrays", TENSORS), Param("axis", INT, 0)], "Stack [a, b, ...] along a new axis."
)
def _stack(c: Context, arrays: list[Any], axis: int) -> Any:
    return c.tf.stack(arrays, axis=axis)


@_add("shape", "expand_dims", ["x", Param("axis", INT)], "Insert an axis of length 1.")
def _expand_dims(c: Context, x: Any, axis: int) -> Any:
    return c.tf.expand_dims(x, axis)


@_add("shape", "squeeze", ["x", Param("axis", AXIS, None)], "Remove axes of length 1.")
def _squeeze(c: Context, x: Any, axis: Any) -> Any:
    return c.tf.squeeze(x, axis=axis)


@_add("shape", "tile", ["x", Param("reps", SHAPE)], "Repeat x reps times along each axis.")
def _tile(c: Context, x: Any, reps: tuple[int, ...]) -> Any:
    reps = tuple(reps)
    if len(reps) < len(x.shape):
        reps = (1,) * (len(x.shape) - len(reps)) + reps
    elif len(reps) > len(x.shape):
        x = c.tf.reshape(x, [1] * (len(reps) - len(x.shape)) + list(x.shape))
    c.check_elements(math.prod(reps) * math.prod(int(d) for d in x.shape), "tile")
    return c.tf.tile(x, list(reps))


@_add("shape", "broadcast_to", ["x", Param("shape", SHAPE)], "x broadcast to a shape.")
def _broadcast_to(c: Context, x: Any, shape: tuple[int, ...]) -> Any:
    c.check_elements(math.prod(shape), "broadcast_to")
    return c.tf.broadcast_to(x, list(shape))


def _indices(c: Context, indices: Any) -> Any:
    if indices.dtype.is_floating:
        indices = c.tf.round(indices)
    return c.tf.cast(indices, c.tf.int32)


@_add(
    "shape",
    "take",
    ["x", "indices", Param("axis", INT, None)],
    "Elements at integer indices (flattened x by default).",
)
def _take(c: Context, x: Any, indices: Any, axis: int | None) -> Any:
    if axis is None:
        x, axis = c.tf.reshape(x, [-1]), 0
    return c.tf.gather(x, _indices(c, indices), axis=axis)


@_add(
    "shape", "gather", ["x", "indices", Param("axis", INT, 0)], "Slices of x at integer indices along axis."
)
def _gather(c: Context, x: Any, indices: Any, axis: int) -> Any:
    return c.tf.gather(x, _indices(c, indices), axis=axis)


@_add(
    "shape",
    "scatter_add",
    ["x", "indices", "updates"],
    "x with updates[i] added to x[indices[i]] along axis 0 (repeated indices accumulate).",
)
def _scatter_add(c: Context, x: Any, indices: Any, updates: Any) -> Any:
    tf = c.tf
    if len(indices.shape) != 1:
        raise ValueError(f"scatter_add takes 1-D indices, got {len(indices.shape)}-D")
    if len(x.shape) == 0:
        raise ValueError("scatter_add takes an x of at least one axis")
    rows = _indices(c, indices)
    expected = [int(indices.shape[0]), *(int(d) for d in x.shape[1:])]
    updates = tf.broadcast_to(tf.cast(updates, x.dtype), expected)
    return tf.tensor_scatter_nd_add(x, rows[:, None], updates)


@_add(
    "shape",
    "segment_sum",
    ["data", "segment_ids", Param("num_segments", INT)],
    "Sums of data's rows by integer segment id (ids in [0, num_segments); out-of-range ids are an error).",
)
def _segment_sum(c: Context, data: Any, segment_ids: Any, num_segments: int) -> Any:
    tf = c.tf
    if num_segments < 0:
        raise ValueError("segment_sum num_segments must not be negative")
    rank = len(segment_ids.shape)
    if rank == 0 or list(data.shape[:rank]) != list(segment_ids.shape):
        raise ValueError(
            f"segment_sum: segment_ids of shape {list(segment_ids.shape)} must match the leading axes of "
            f"data of shape {list(data.shape)}"
        )
    c.check_elements(num_segments * math.prod(int(d) for d in data.shape[rank:]), "segment_sum")
    ids = _indices(c, segment_ids)
    # unsorted_segment_sum drops negative ids silently; refuse them like the ones past the end
    ids = tf.where(ids < 0, tf.constant(num_segments, ids.dtype), ids)
    return tf.math.unsorted_segment_sum(data, ids, num_segments)


@_add("shape", "zeros", [Param("shape", SHAPE)], "A tensor of zeros.")
def _zeros(c: Context, shape: tuple[int, ...]) -> Any:
    c.check_elements(math.prod(shape), "zeros")
    return c.tf.zeros(list(shape), c.dtype)


@_add("shape", "ones", [Param("shape", SHAPE)], "A tensor of ones.")
def _ones(c: Context, shape: tuple[int, ...]) -> Any:
    c.check_elements(math.prod(shape), "ones")
    return c.tf.ones(list(shape), c.dtype)


@_add("shape", "arange", [Param("start", NUMBER), Param("stop", NUMBER, None), Param("step", NUMBER, 1)],
      "Evenly spaced values in [start, stop), like numpy.")  # fmt: skip
def _arange(c: Context, start: float, stop: float | None, step: float) -> Any:
    if stop is None:
        start, stop = 0, start
    if step == 0:
        raise ValueError("arange step must not be zero")
    count = max(0, math.ceil((stop - start) / step)) if math.isfinite(stop - start) else math.inf
    c.check_elements(count, "arange")
    return c.tf.range(start, stop, step, dtype=c.dtype)


@_add("shape", "linspace", [Param("start", NUMBER), Param("stop", NUMBER), Param("num", INT, 50)],
      "num evenly spaced values from start to stop inclusive.")  # fmt: skip
def _linspace(c: Context, start: float, stop: float, num: int) -> Any:
    if num < 0:
        raise ValueError("linspace num must not be negative")
    c.check_elements(num, "linspace")
    return c.tf.linspace(c.tf.constant(start, c.dtype), c.tf.constant(stop, c.dtype), num)


def _band(c: Context, x: Any, k: int, upper: bool) -> Any:
    tf = c.tf
    if len(x.shape) < 2:
        raise ValueError("triu/tril take a tensor of at least 2 dimensions")
    rows = tf.range(int(x.shape[-2]))[:, None]
    cols = tf.range(int(x.shape[-1]))[None, :]
    mask = (cols - rows >= k) if upper else (cols - rows <= k)
    return tf.where(mask, x, tf.zeros_like(x))


_add("shape", "triu", ["x", Param("k", INT, 0)], "Upper triangle (elements below the k-th diagonal zeroed).")(
    lambda c, x, k: _band(c, x, k, True)
)
_add("shape", "tril", ["x", Param("k", INT, 0)], "Lower triangle (elements above the k-th diagonal zeroed).")(
    lambda c, x, k: _band(c, x, k, False)
)


@_add(
    "shape", "one_hot", ["indices", Param("depth", INT)], "One-hot rows of length depth for integer indices."
)
def _one_hot(c: Context, indices: Any, depth: int) -> Any:
    c.check_elements(math.prod(int(d) for d in indices.shape) * depth, "one_hot")
    return c.tf.one_hot(_indices(c, indices), depth, dtype=c.dtype)


# -- others --------------------------------------------------------------------------------------

_add("other", "softmax", ["x", Param("axis", INT, -1)], "exp(x) / sum(exp(x)) along axis.")(
    lambda c, x, axis: c.tf.nn.softmax(x, axis=axis)
)
_add("other", "log_softmax", ["x", Param("axis", INT, -1)], "log(softmax(x)) along axis, computed stably.")(
    lambda c, x, axis: c.tf.nn.log_softmax(x, axis=axis)
)
_add("gradient", "stop_gradient", ["x"], "x, but no gradient flows back through it.")(
    lambda c, x: c.tf.stop_gradient(x)
)


@_add(
    "gradient",
    "clip_gradient",
    ["x", "lo", "hi"],
    "x forward; every gradient flowing back through it (any order) is clipped to [lo, hi].",
)
def _clip_gradient(c: Context, x: Any, lo: Any, hi: Any) -> Any:
    tf = c.tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def identity(v: Any) -> Any:
        def grad(dy: Any) -> Any:
            return tf.clip_by_value(dy, tf.cast(lo, dy.dtype), tf.cast(hi, dy.dtype))

        return tf.identity(v), grad

    return identity(x)

"""Numpy plans: a small traced tape program's graph, run op by op with numpy instead of TF's runtime.

TensorFlow still builds everything: the expression is traced under GradientTapes, and the plan is
the resulting graph, read node by node. What changes is who executes it. Calling a traced function
through TF's runtime costs ~0.15 ms however small the program (a tensor per input, the function
executor, its thread pool), two to three times that when the worker has been idle for a moment;
for a 10-element Rosenbrock gradient that is nearly all of the work. A plan for the same graph is a
list of ~30 numpy calls on tiny arrays.

A graph becomes a plan only if every node has a numpy kernel here (``_FACTORIES``: pure ops with
numpy equivalents, written as TF's kernels compute them) or is answered from static shapes; ops
whose inputs are all known (shape arithmetic, broadcast reduction axes) are folded once, when the
plan is built, and nested function calls are inlined. The runner asks for a plan on a program's
second call, builds it once that call's reply is sent, and keeps it only if it reproduces
TensorFlow's outputs for that call. TensorFlow stays the authority at run time too: a plan that
raises, or whose outputs are not all finite (where the two libraries' NaN and infinity conventions
may differ), is answered by TF instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Plan", "UnsupportedGraph", "build_plan"]

Kernel = Callable[..., Any]


class UnsupportedGraph(Exception):
    """The graph has a node the plan cannot run (or a shape it cannot know): TF runs it."""


class Plan:
    """Registers (constants pre-filled) and steps ``(kernel, input registers, output register)``."""

    __slots__ = ("fixed", "inputs", "outputs", "registers", "steps")

    def __init__(
        self,
        registers: list[Any],
        steps: list[tuple[Kernel, tuple[int, ...], int]],
        inputs: list[int],
        outputs: list[int],
    ) -> None:
        self.registers = registers
        self.steps = steps
        self.inputs = inputs
        self.outputs = outputs
        # Registers no step writes (constants and inputs): an output that is one is returned as a copy.
        self.fixed = frozenset(range(len(registers))) - {out for _, _, out in steps}

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for these inputs (in the graph's input order); numpy errors propagate."""
        regs = self.registers.copy()
        for slot, array in zip(self.inputs, arrays, strict=True):
            regs[slot] = array
        with np.errstate(all="ignore"):  # TF is silent about overflow and 0/0; so is the plan
            for kernel, args, out in self.steps:
                if len(args) == 2:
                    regs[out] = kernel(regs[args[0]], regs[args[1]])
                elif len(args) == 1:
                    regs[out] = kernel(regs[args[0]])
                else:
                    regs[out] = kernel(*[regs[a] for a in args])
        return [_fresh(regs[o], o in self.fixed) for o in self.outputs]


def _fresh(value: Any, fixed: bool) -> np.ndarray:
    """An output the caller may keep and change: never a constant of the plan, an input or a view."""
    if not fixed and type(value) is np.ndarray and value.flags.owndata and value.flags.writeable:
        return value
    return np.array(value)


# --- kernels -----------------------------------------------------------------------------------
# Each takes the node's input values (numpy arrays) and returns its one output. Kernels that need
# the node's attributes are made by a factory given the node (see _FACTORIES).


def _reciprocal(x: Any) -> Any:
    return np.divide(np.ones((), x.dtype), x)


def _rsqrt(x: Any) -> Any:
    return np.divide(np.ones((), x.dtype), np.sqrt(x))


def _sigmoid(x: Any) -> Any:
    one = np.ones((), x.dtype)
    return one / (one + np.exp(-x))


def _relu(x: Any) -> Any:
    return np.maximum(x, np.zeros((), x.dtype))


def _softplus(x: Any) -> Any:
    """TF's (Eigen's) softplus: x above -log(eps) - 2, exp(x) below log(eps) + 2, log1p(exp(x)) between."""
    threshold = np.log(np.finfo(x.dtype).eps) + 2
    e = np.exp(x)
    return np.where(x > -threshold, x, np.where(x < threshold, e, np.log1p(e)))


def _softplus_grad(dy: Any, x: Any) -> Any:
    return dy / (np.exp(-x) + np.ones((), x.dtype))


_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


def _elu(x: Any) -> Any:
    one = np.ones((), x.dtype)
    return np.where(x < 0, np.exp(x) - one, x)


def _elu_grad(dy: Any, y: Any) -> Any:
    return np.where(y < 0, (y + np.ones((), y.dtype)) * dy, dy)


def _selu(x: Any) -> Any:
    scale, scale_alpha = np.asarray(_SELU_SCALE, x.dtype), np.asarray(_SELU_SCALE * _SELU_ALPHA, x.dtype)
    return np.where(x < 0, scale_alpha * (np.exp(x) - np.ones((), x.dtype)), scale * x)


def _selu_grad(dy: Any, y: Any) -> Any:
    scale, scale_alpha = np.asarray(_SELU_SCALE, y.dtype), np.asarray(_SELU_SCALE * _SELU_ALPHA, y.dtype)
    return np.where(y < 0, dy * (y + scale_alpha), dy * scale)


def _add_n(*xs: Any) -> Any:
    total = xs[0]
    for x in xs[1:]:
        total = np.add(total, x)
    return total


def _tanh_grad(y: Any, dy: Any) -> Any:
    return dy * (np.ones((), y.dtype) - y * y)


def _sigmoid_grad(y: Any, dy: Any) -> Any:
    return dy * y * (np.ones((), y.dtype) - y)


def _sqrt_grad(y: Any, dy: Any) -> Any:
    return np.asarray(0.5, y.dtype) * dy / y


def _rsqrt_grad(y: Any, dy: Any) -> Any:
    return np.asarray(-0.5, y.dtype) * (dy * y) * (y * y)


def _reciprocal_grad(y: Any, dy: Any) -> Any:
    return -dy * y * y


def _relu_grad(dy: Any, x: Any) -> Any:
    return np.where(x > 0, dy, np.zeros((), dy.dtype))


def _div_no_nan(x: Any, y: Any) -> Any:
    return np.where(y == 0, np.zeros((), np.result_type(x, y)), np.divide(x, np.where(y == 0, 1, y)))


def _squared_difference(x: Any, y: Any) -> Any:
    d = np.subtract(x, y)
    return d * d


def _select(cond: Any, t: Any, e: Any) -> Any:
    """Select: an elementwise condition, a scalar one, or one per row (its own rule, not broadcasting)."""
    cond, t = np.asarray(cond), np.asarray(t)
    if cond.ndim == 1 and t.ndim > 1:
        cond = cond.reshape(cond.shape + (1,) * (t.ndim - 1))
    elif cond.shape != t.shape and cond.ndim != 0:
        raise ValueError("Select with a condition of another shape")
    return np.where(cond, t, e)


def _floor_div(x: Any, y: Any) -> Any:
    if np.issubdtype(np.result_type(x, y), np.integer):
        return np.floor_divide(x, y)
    return np.floor(np.divide(x, y))  # TF's float FloorDiv: floor of the true quotient


def _invert_permutation(p: Any) -> Any:
    return np.argsort(p).astype(np.asarray(p).dtype)


def _reshape(x: Any, shape: Any) -> Any:
    return np.reshape(x, [int(s) for s in np.ravel(shape)])


def _tile(x: Any, multiples: Any) -> Any:
    return np.tile(x, [int(m) for m in np.ravel(multiples)])


def _broadcast_to(x: Any, shape: Any) -> Any:
    return np.broadcast_to(x, [int(s) for s in np.ravel(shape)])


def _expand_dims(x: Any, axis: Any) -> Any:
    return np.expand_dims(x, int(np.ravel(axis)[0]))


def _transpose(x: Any, perm: Any) -> Any:
    return np.transpose(x, [int(p) for p in np.ravel(perm)])


def _concat(*xs: Any) -> Any:
    return np.concatenate(xs[:-1], axis=int(xs[-1]))


def _fill(dims: Any, value: Any) -> Any:
    return np.full([int(d) for d in np.ravel(dims)], value, dtype=np.asarray(value).dtype)


def _zeros_like(x: Any) -> Any:
    return np.zeros_like(x)


def _ones_like(x: Any) -> Any:
    return np.ones_like(x)


def _identity(x: Any) -> Any:
    return x


def _gather(params: Any, indices: Any, axis: Any) -> Any:
    axis = int(axis)
    size = np.shape(params)[axis]
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise IndexError("gather index out of range")  # TF answers with its own error
    return np.take(params, indices, axis=axis)


def _unsorted_segment_sum(data: Any, ids: Any, num_segments: Any) -> Any:
    """UnsortedSegmentSum (gather's gradient); ids out of [0, n) go to TF, which drops or refuses them."""
    n, ids, data = int(num_segments), np.asarray(ids), np.asarray(data)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError("segment id out of range")
    out = np.zeros((n, *data.shape[ids.ndim :]), data.dtype)
    np.add.at(out, ids, data)
    return out


def _broadcast_gradient_args(s0: Any, s1: Any) -> tuple[Any, Any]:
    """The axes to sum each operand's gradient over, as TF's BroadcastGradientArgs (folded only)."""
    s0, s1 = [int(v) for v in np.ravel(s0)], [int(v) for v in np.ravel(s1)]
    if s0 == s1:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    rank = max(len(s0), len(s1))
    p0, p1 = [1] * (rank - len(s0)) + s0, [1] * (rank - len(s1)) + s1
    r0 = [i for i in range(rank) if p0[i] == 1]
    r1 = [i for i in range(rank) if p1[i] == 1]
    return np.asarray(r0, np.int32), np.asarray(r1, np.int32)


def _list_diff(x: Any, y: Any) -> tuple[Any, Any]:
    """ListDiff (fold only): the values of x not in y, and their positions."""
    x, drop = np.ravel(x), set(np.ravel(y).tolist())
    keep = [i for i, v in enumerate(x.tolist()) if v not in drop]
    return x[keep], np.asarray(keep, np.int32)


def _concat_offset(axis: Any, *shapes: Any) -> list[Any]:
    """ConcatOffset (fold only): where each operand of a concatenation starts."""
    axis, offsets, at = int(axis), [], 0
    for shape in shapes:
        offset = np.zeros_like(np.ravel(shape))
        offset[axis] = at
        at += int(np.ravel(shape)[axis])
        offsets.append(offset)
    return offsets


# Ops with several outputs, all computed from shapes known in advance.
_FOLD_ONLY: dict[str, Callable[..., Any]] = {
    "BroadcastGradientArgs": _broadcast_gradient_args,
    "ListDiff": _list_diff,
    "ConcatOffset": _concat_offset,
}


def _slice(x: Any, begin: Any, size: Any) -> Any:
    index = tuple(
        slice(int(b), None if int(n) == -1 else int(b) + int(n))
        for b, n in zip(np.ravel(begin), np.ravel(size), strict=True)
    )
    return np.asarray(x)[index]


def _pad(x: Any, paddings: Any) -> Any:
    return np.pad(x, [(int(a), int(b)) for a, b in np.asarray(paddings).reshape(-1, 2)])


_UNARY: dict[str, Kernel] = {
    "Abs": np.abs, "Acos": np.arccos, "Acosh": np.arccosh, "Asin": np.arcsin, "Asinh": np.arcsinh,
    "Atan": np.arctan, "Atanh": np.arctanh, "Ceil": np.ceil, "Cos": np.cos, "Cosh": np.cosh,
    "Exp": np.exp, "Expm1": np.expm1, "Floor": np.floor, "Inv": _reciprocal,
    "Log": np.log, "Log1p": np.log1p, "Neg": np.negative, "OnesLike": _ones_like,
    "Reciprocal": _reciprocal, "Relu": _relu, "Rsqrt": _rsqrt, "Sigmoid": _sigmoid, "Sign": np.sign,
    "Sin": np.sin, "Sinh": np.sinh, "Sqrt": np.sqrt, "Square": np.square,
    "Tan": np.tan, "Tanh": np.tanh, "ZerosLike": _zeros_like, "LogicalNot": np.logical_not,
    "PlaceholderWithDefault": _identity, "EnsureShape": _identity, "Snapshot": _identity,
    "Round": np.rint, "InvertPermutation": _invert_permutation, "Softplus": _softplus, "Elu": _elu,
    "Selu": _selu,
}  # fmt: skip
_BINARY: dict[str, Kernel] = {
    "Add": np.add, "AddV2": np.add, "Sub": np.subtract, "Mul": np.multiply, "RealDiv": np.divide,
    "Div": np.divide, "FloorDiv": _floor_div, "FloorMod": np.mod, "Pow": np.power,
    "Maximum": np.maximum, "Minimum": np.minimum,
    "Atan2": np.arctan2, "SquaredDifference": _squared_difference, "DivNoNan": _div_no_nan,
    "Greater": np.greater, "GreaterEqual": np.greater_equal, "Less": np.less,
    "LessEqual": np.less_equal, "Equal": np.equal, "NotEqual": np.not_equal,
    "LogicalAnd": np.logical_and, "LogicalOr": np.logical_or,
    "TanhGrad": _tanh_grad, "SigmoidGrad": _sigmoid_grad, "SqrtGrad": _sqrt_grad,
    "RsqrtGrad": _rsqrt_grad, "ReciprocalGrad": _reciprocal_grad, "InvGrad": _reciprocal_grad,
    "ReluGrad": _relu_grad, "SoftplusGrad": _softplus_grad, "EluGrad": _elu_grad,
    "SeluGrad": _selu_grad, "Reshape": _reshape, "Tile": _tile, "BroadcastTo": _broadcast_to,
    "ExpandDims": _expand_dims, "Transpose": _transpose, "Fill": _fill,
}  # fmt: skip
_OTHER: dict[str, Kernel] = {
    "AddN": _add_n, "ConcatV2": _concat, "SelectV2": np.where, "Select": _select,
    "Slice": _slice, "Pad": _pad, "UnsortedSegmentSum": _unsorted_segment_sum,
}  # fmt: skip
# Comparisons and division by an integer are left out on purpose where their integer forms differ
# (TF's Div floors integers): the dtype check in build_plan keeps integers to folded shape math.


def _reduction(ufunc: np.ufunc, mean: bool = False) -> Callable[[Any, list[Any]], Kernel]:
    """Sum, Prod, Max, Min and Mean over the axes given as the node's second input.

    The ufunc's own reduce (np.sum and friends add ~3 us of Python around it); keep_dims and the
    input's dtype as TF has them. Mean is floating-only: TF's integer mean truncates.
    """
    keeps_dtype = ufunc in (np.add, np.multiply)

    def factory(node: Any, consts: list[Any]) -> Kernel:
        keep = bool(node.get_attr("keep_dims"))
        known = None if consts[1] is None else [int(a) for a in np.ravel(consts[1])]

        def reduce(x: Any, axis: Any) -> Any:
            x = np.asarray(x)
            wanted = known if known is not None else [int(a) for a in np.ravel(axis)]
            axes = tuple(a % x.ndim if a < 0 else a for a in wanted)
            if keeps_dtype:
                out = ufunc.reduce(x, axis=axes, keepdims=keep, dtype=x.dtype)
            else:
                out = ufunc.reduce(x, axis=axes, keepdims=keep)
            if mean:
                if x.dtype.kind != "f":
                    raise TypeError("integer mean")
                count = 1
                for a in axes:
                    count *= x.shape[a]
                out = out / np.asarray(count, x.dtype)
            return out

        return reduce

    return factory


_MASKS = ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask")


def _strided_index(node: Any, begin: Any, end: Any, strides: Any) -> tuple[Any, ...]:
    masks = {k: int(node.get_attr(k)) for k in _MASKS}
    index: list[Any] = []
    for i, (b, e, s) in enumerate(zip(np.ravel(begin), np.ravel(end), np.ravel(strides), strict=True)):
        bit = 1 << i
        if masks["ellipsis_mask"] & bit:
            index.append(Ellipsis)
        elif masks["new_axis_mask"] & bit:
            index.append(None)
        elif masks["shrink_axis_mask"] & bit:
            index.append(int(b))
        else:
            start = None if masks["begin_mask"] & bit else int(b)
            stop = None if masks["end_mask"] & bit else int(e)
            index.append(slice(start, stop, int(s)))
    return tuple(index)


def _strided_slice(node: Any, consts: list[Any]) -> Kernel:
    _, begin, end, strides = consts
    if begin is None or end is None or strides is None:
        raise UnsupportedGraph("StridedSlice with computed bounds")
    index = _strided_index(node, begin, end, strides)

    def kernel(x: Any, *_: Any) -> Any:
        return x[index]

    return kernel


def _strided_slice_grad(node: Any, consts: list[Any]) -> Kernel:
    shape, begin, end, strides, _ = consts
    if shape is None or begin is None or end is None or strides is None:
        raise UnsupportedGraph("StridedSliceGrad with computed bounds")
    index = _strided_index(node, begin, end, strides)
    dims = [int(d) for d in np.ravel(shape)]

    def kernel(_s: Any, _b: Any, _e: Any, _st: Any, dy: Any) -> Any:
        out = np.zeros(dims, np.asarray(dy).dtype)
        out[index] = dy
        return out

    return kernel


def _matmul(node: Any, consts: list[Any]) -> Kernel:
    ta, tb = bool(node.get_attr("transpose_a")), bool(node.get_attr("transpose_b"))

    def kernel(a: Any, b: Any) -> Any:
        return np.matmul(a.T if ta else a, b.T if tb else b)

    return kernel


def _batch_matmul(node: Any, consts: list[Any]) -> Kernel:
    ax, ay = bool(node.get_attr("adj_x")), bool(node.get_attr("adj_y"))

    def kernel(x: Any, y: Any) -> Any:
        return np.matmul(np.swapaxes(x, -1, -2) if ax else x, np.swapaxes(y, -1, -2) if ay else y)

    return kernel


def _cast(node: Any, consts: list[Any]) -> Kernel:
    target = np.dtype(node.get_attr("DstT").as_numpy_dtype)

    def kernel(x: Any) -> Any:
        return np.asarray(x).astype(target)

    return kernel


def _pack(node: Any, consts: list[Any]) -> Kernel:
    axis = int(node.get_attr("axis"))

    def kernel(*xs: Any) -> Any:
        return np.stack(xs, axis=axis)

    return kernel


def _squeeze(node: Any, consts: list[Any]) -> Kernel:
    dims = tuple(int(d) for d in node.get_attr("squeeze_dims"))

    def kernel(x: Any) -> Any:
        return np.squeeze(x, axis=dims or None)

    return kernel


def _range(node: Any, consts: list[Any]) -> Kernel:
    dtype = np.dtype(node.get_attr("Tidx").as_numpy_dtype)

    def kernel(start: Any, limit: Any, delta: Any) -> Any:
        return np.arange(start, limit, delta, dtype=dtype)

    return kernel


def _matrix_diag(node: Any, consts: list[Any]) -> Kernel:
    """MatrixDiagV3 in the form pfor uses: the main diagonal (k=0) of a square matrix, zeros elsewhere."""
    _, k, rows, cols, padding = consts
    if k is None or rows is None or cols is None or padding is None:
        raise UnsupportedGraph("MatrixDiagV3 with computed arguments")
    if np.ravel(k).tolist() != [0] or int(rows) != -1 or int(cols) != -1 or float(padding) != 0.0:
        raise UnsupportedGraph("MatrixDiagV3 off the main diagonal")

    def kernel(diagonal: Any, *_: Any) -> Any:
        diagonal = np.asarray(diagonal)
        n = diagonal.shape[-1]
        out = np.zeros((*diagonal.shape, n), diagonal.dtype)
        out[..., np.arange(n), np.arange(n)] = diagonal
        return out

    return kernel


def _cumulative(numpy_fn: Kernel) -> Callable[[Any, list[Any]], Kernel]:
    """Cumsum and Cumprod, with TF's exclusive and reverse flags."""

    def factory(node: Any, consts: list[Any]) -> Kernel:
        exclusive, reverse = bool(node.get_attr("exclusive")), bool(node.get_attr("reverse"))

        def kernel(x: Any, axis: Any) -> Any:
            x, a = np.asarray(x), int(axis)
            if reverse:
                x = np.flip(x, a)
            out = numpy_fn(x, axis=a, dtype=x.dtype)
            if exclusive:
                identity = np.zeros_like if numpy_fn is np.cumsum else np.ones_like
                first = identity(np.take(out, [0], axis=a))
                out = np.concatenate([first, np.take(out, np.arange(x.shape[a] - 1), axis=a)], axis=a)
            return np.flip(out, a) if reverse else out

        return kernel

    return factory


def _gather_v2(node: Any, consts: list[Any]) -> Kernel:
    """GatherV2; with batch_dims b (as pfor vectorizes a gather), one gather per batch element."""
    batch_dims = int(node.get_attr("batch_dims"))
    if batch_dims == 0:
        return _gather

    def batched(params: Any, indices: Any, axis: Any) -> Any:
        params, indices = np.asarray(params), np.asarray(indices)
        b = batch_dims + indices.ndim if batch_dims < 0 else batch_dims
        a = int(axis) + params.ndim if int(axis) < 0 else int(axis)
        batch = params.shape[:b]
        if a < b or indices.shape[:b] != batch or not np.prod(batch, dtype=np.int64):
            raise ValueError("a batched gather this kernel does not cover")
        flat_params = params.reshape(-1, *params.shape[b:])
        flat_indices = indices.reshape(-1, *indices.shape[b:])
        parts = [_gather(p, i, a - b) for p, i in zip(flat_params, flat_indices, strict=True)]
        return np.stack(parts).reshape(*batch, *parts[0].shape)

    return batched


def _with_consts(kernel: Kernel) -> Callable[[Any, list[Any]], Kernel]:
    return lambda node, consts: kernel


_FACTORIES: dict[str, Callable[[Any, list[Any]], Kernel]] = {
    **{name: _with_consts(k) for name, k in {**_UNARY, **_BINARY, **_OTHER}.items()},
    "Sum": _reduction(np.add),
    "Prod": _reduction(np.multiply),
    "Mean": _reduction(np.add, mean=True),
    "Max": _reduction(np.maximum),
    "Min": _reduction(np.minimum),
    "StridedSlice": _strided_slice,
    "StridedSliceGrad": _strided_slice_grad,
    "MatMul": _matmul,
    "BatchMatMulV2": _batch_matmul,
    "Cast": _cast,
    "Pack": _pack,
    "Squeeze": _squeeze,
    "Range": _range,
    "MatrixDiagV3": _matrix_diag,
    "GatherV2": _gather_v2,
    "Cumsum": _cumulative(np.cumsum),
    "Cumprod": _cumulative(np.cumprod),
}
# Ops the plan answers from static shapes alone, whatever their inputs' values.
_STATIC = {"Shape", "Size", "Rank", "ShapeN"}
_VALUE_DTYPES = (np.float32, np.float64, np.bool_)


def _static(node: Any) -> list[Any]:
    shapes = [t.shape for t in node.inputs]
    if not all(s.is_fully_defined() for s in shapes):
        raise UnsupportedGraph(f"{node.type} of a tensor whose shape is not static")
    dtype = np.dtype(node.get_attr("out_type").as_numpy_dtype) if node.type != "Rank" else np.int32
    if node.type == "Shape":
        return [np.asarray(shapes[0].as_list(), dtype)]
    if node.type == "ShapeN":
        return [np.asarray(s.as_list(), dtype) for s in shapes]
    if node.type == "Size":
        return [np.asarray(shapes[0].num_elements(), dtype)]
    return [np.asarray(shapes[0].rank, dtype)]


def build_plan(graph: Any, inputs: Sequence[Any], outputs: Sequence[Any], max_nodes: int = 4000) -> Plan:
    """A plan computing ``outputs`` from ``inputs`` (tensors of ``graph``); raises UnsupportedGraph.

    Calls of nested functions (PartitionedCall, as ForwardAccumulator and pfor emit them) are inlined.
    """
    builder = _Builder(max_nodes)
    for t in inputs:
        builder.refs[t.name] = builder.new_slot(None)
    results = builder.emit(graph, {}, [t.name for t in outputs])
    out_slots = [r if isinstance(r, int) else builder.new_slot(r.value) for r in results]
    steps = _live_steps(builder.steps, out_slots)
    return Plan(builder.registers, steps, [builder.refs[t.name] for t in inputs], out_slots)  # type: ignore[misc]


def _live_steps(
    steps: list[tuple[Kernel, tuple[int, ...], int]], outputs: Sequence[int]
) -> list[tuple[Kernel, tuple[int, ...], int]]:
    """The steps some output depends on, in order: TF's executor prunes the rest too.

    A traced graph keeps nodes no output needs: pfor, converting a Hessian's rows, emits the loop
    body's own second backward pass beside the vectorized one (14 of the 52 steps of rosen10's
    gradient+Hessian). Kernels are pure, so dropping them changes nothing but the time.
    """
    live = set(outputs)
    kept = []
    for step in reversed(steps):
        if step[2] in live:
            live.update(step[1])
            kept.append(step)
    kept.reverse()
    return kept


class _Known:
    """A value known when the plan is built (a constant, or folded from constants)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Builder:
    """Walks graphs node by node; ``refs`` maps a tensor name to a register index or a _Known value."""

    def __init__(self, max_nodes: int) -> None:
        self.registers: list[Any] = []
        self.steps: list[tuple[Kernel, tuple[int, ...], int]] = []
        self.refs: dict[str, int | _Known] = {}
        self.budget = max_nodes

    def new_slot(self, value: Any) -> int:
        self.registers.append(value)
        return len(self.registers) - 1

    def emit(
        self, graph: Any, bound: dict[str, int | _Known], wanted: list[str], prefix: str = ""
    ) -> list[int | _Known]:
        """Emit ``graph``'s nodes; ``bound`` gives its placeholders' refs (empty for the outer graph)."""
        from tensorflow import make_ndarray  # reading the graph needs TF; running the plan does not

        refs = self.refs
        nodes = graph.get_operations()
        self.budget -= len(nodes)
        if self.budget < 0:
            raise UnsupportedGraph("too many nodes")
        for node in nodes:
            names = [prefix + t.name for t in node.outputs]
            inputs = [prefix + t.name for t in node.inputs]
            kind = node.type
            if kind == "Placeholder":
                if prefix:
                    refs[names[0]] = bound[node.outputs[0].name]
                elif names[0] not in refs:
                    raise UnsupportedGraph("a placeholder that is not an input")
            elif kind == "Const":
                refs[names[0]] = _Known(make_ndarray(node.get_attr("value")))
            elif kind == "NoOp":
                continue
            elif kind in ("Identity", "IdentityN", "StopGradient"):  # aliases, not steps
                for name, source in zip(names, inputs, strict=True):
                    refs[name] = refs[source]
            elif kind in _STATIC:
                for name, value in zip(names, _static(node), strict=True):
                    refs[name] = _Known(value)
            elif kind in ("PartitionedCall", "StatefulPartitionedCall"):
                function = graph._get_function(node.get_attr("f").name)  # TF has no public lookup
                if function is None:
                    raise UnsupportedGraph("a call of an unknown function")
                inner = function.graph
                inner_bound = {p.name: refs[i] for p, i in zip(inner.inputs, inputs, strict=True)}
                results = self.emit(inner, inner_bound, [t.name for t in inner.outputs], f"{names[0]}/")
                for name, result in zip(names, results, strict=True):
                    refs[name] = result
            elif kind == "Unpack":  # one step per output: each takes its slice along the axis
                axis = int(node.get_attr("axis"))
                for i, name in enumerate(names):
                    self._step(lambda x, i=i, a=axis: np.take(x, i, axis=a), [refs[inputs[0]]], name)
            elif kind in _FOLD_ONLY:
                args = [refs[i] for i in inputs]
                if not all(isinstance(a, _Known) for a in args):
                    raise UnsupportedGraph(f"{kind} of values not known in advance")
                values = _FOLD_ONLY[kind](*[a.value for a in args])  # type: ignore[union-attr]
                for name, value in zip(names, values, strict=True):
                    refs[name] = _Known(np.asarray(value))
            else:
                self._kernel_node(node, names, inputs)
        missing = [w for w in wanted if prefix + w not in refs]
        if missing:
            raise UnsupportedGraph(f"outputs {missing} are not computed")
        return [refs[prefix + w] for w in wanted]

    def _kernel_node(self, node: Any, names: list[str], inputs: list[str]) -> None:
        factory = _FACTORIES.get(node.type)
        if factory is None:
            raise UnsupportedGraph(f"no numpy kernel for {node.type}")
        if len(names) != 1:
            raise UnsupportedGraph(f"{node.type} with {len(names)} outputs")
        args = [self.refs[i] for i in inputs]
        consts = [a.value if isinstance(a, _Known) else None for a in args]
        kernel = factory(node, consts)
        if all(isinstance(a, _Known) for a in args):  # everything known: fold it now
            self.refs[names[0]] = _Known(np.asarray(kernel(*consts)))
            return
        output = node.outputs[0]
        if np.dtype(output.dtype.as_numpy_dtype) not in _VALUE_DTYPES:
            raise UnsupportedGraph(f"{node.type} computes {output.dtype.name} values at run time")
        self._step(kernel, args, names[0])

    def _step(self, kernel: Kernel, args: list[int | _Known], name: str) -> None:
        slots = tuple(a if isinstance(a, int) else self.new_slot(a.value) for a in args)
        out = self.new_slot(None)
        self.refs[name] = out
        self.steps.append((kernel, slots, out))

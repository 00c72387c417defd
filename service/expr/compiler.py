"""Syntax tree -> TensorFlow ops, via the one table of allowed functions (imports TensorFlow).

Called while a tape program is traced, so every tensor has a static shape: each op's result is
checked against the element limit as it is built, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import tensorflow as tf

from service.errors import (
    DTypeError,
    InvalidArgument,
    LimitExceeded,
    ShapeError,
    SourceLocation,
    TapeserveError,
)
from service.expr import nodes as n
from service.expr.functions import BUILTINS, CONSTANTS, TENSORS, VARIADIC
from service.expr.program import FORMS, Form, FunctionDef, Program, bind_builtin
from service.limits import Limits

__all__ = ["Compiler"]

_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": tf.add,
    "-": tf.subtract,
    "*": tf.multiply,
    "/": tf.math.truediv,
    "//": tf.math.floordiv,
    "%": tf.math.floormod,
}
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": tf.equal,
    "!=": tf.not_equal,
    "<": tf.less,
    "<=": tf.less_equal,
    ">": tf.greater,
    ">=": tf.greater_equal,
}


_ZERO = tf.UnconnectedGradients.ZERO


def _elements(t: Any) -> int:
    """Elements of a tensor for a size check (a zero-length axis counts as one)."""
    return math.prod(max(int(d), 1) for d in t.shape) if t.shape.is_fully_defined() else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else type(exc).__name__
    # TF prefixes graph-construction messages with op plumbing; keep what a user can act on.
    for marker in ("Dimensions must be equal", "Incompatible shapes", "Shape must be", "Cannot reshape"):
        if marker in str(exc):
            message = str(exc)[str(exc).index(marker) :].splitlines()[0]
            break
    return message[:300]


class Compiler:
    """Builds the ops of one program for given input tensors (called inside a tf.function trace)."""

    def __init__(
        self,
        program: Program,
        dtype: Any,
        limits: Limits,
        batch_size: int = 1,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        self.program = program
        # The values of the request constants used as loop step counts (``program.counts``): a
        # count is static, so it is known while tracing, and it is part of the job's signature.
        self.counts = dict(counts or {})
        self.tf = tf
        self.dtype = dtype
        self.limits = limits
        # Under vectorized_map the traced shapes are per point; the real tensors are batch_size times
        # larger. An empty batch still traces the per-point program: it counts as one point, so a
        # zero-length axis never cancels another axis in a size check.
        self.batch_size = max(batch_size, 1)
        # The largest tensor (elements per point) this program built: derivatives that vectorize
        # over rows (Jacobians, Hessians, order k) hold a copy of it per row, checked before tracing them.
        self.largest = 1
        self._user: dict[str, Callable[..., Any]] = {}
        self._source = "expression"

    # -- the Context protocol for function rules ------------------------------------------------

    def check_elements(self, count: float, what: str) -> None:
        if count * self.batch_size > self.limits.max_tensor_elements:
            raise LimitExceeded(
                f"{what} would create {count * self.batch_size:.0f} elements; at most "
                f"{self.limits.max_tensor_elements} are allowed for any tensor",
                limit="max_tensor_elements",
                allowed=self.limits.max_tensor_elements,
                estimate=int(count * self.batch_size),
            )

    # -- entry points ---------------------------------------------------------------------------

    def evaluate(self, inputs: Mapping[str, Any]) -> Any:
        """The expression's value for input tensors ``inputs`` (variables and constants by name)."""
        self._source = "expression"
        return self._float(self.compile(self.program.expression, dict(inputs)), self.program.expression)

    # -- errors ---------------------------------------------------------------------------------

    def _where(self, span: n.Span) -> dict[str, Any]:
        end = span.end_column if span.end_line == span.line else None
        return {
            "text": self.program.sources.get(self._source),
            "where": SourceLocation(self._source, span.line, span.column, end),
        }

    def _checked(self, node: n.Node, build: Callable[[], Any]) -> Any:
        """Build one op, turning TF's construction errors into located user errors."""
        try:
            out = build()
        except TapeserveError as exc:
            if isinstance(exc, LimitExceeded) and "line" not in exc.extra:
                raise LimitExceeded(exc.detail, **exc.extra, **self._where(node.span)) from None
            raise
        except (ValueError, tf.errors.InvalidArgumentError) as exc:
            raise ShapeError(_first_line(exc), **self._where(node.span)) from None
        except TypeError as exc:
            raise DTypeError(_first_line(exc), **self._where(node.span)) from None
        if isinstance(out, tf.Tensor) and out.shape.is_fully_defined():
            count = out.shape.num_elements() or 0
            self.largest = max(self.largest, count)
            if count * self.batch_size > self.limits.max_tensor_elements:
                raise LimitExceeded(
                    f"this part of the expression has shape {list(out.shape)}"
                    + (f" per point ({self.batch_size} points)" if self.batch_size > 1 else "")
                    + f", {count * self.batch_size} elements; at most "
                    f"{self.limits.max_tensor_elements} are allowed for any tensor",
                    limit="max_tensor_elements",
                    allowed=self.limits.max_tensor_elements,
                    estimate=count * self.batch_size,
                    **self._where(node.span),
                )
        return out

    # -- dtype helpers --------------------------------------------------------------------------

    def _float(self, t: Any, node: n.Node) -> Any:
        """Bring a value to the working float dtype (booleans become 0/1 masks)."""
        if not isinstance(t, tf.Tensor | tf.Variable):
            return tf.constant(t, self.dtype)
        if t.dtype == self.dtype:
            return t
        if t.dtype.is_floating or t.dtype.is_integer or t.dtype == tf.bool:
            return tf.cast(t, self.dtype)
        raise DTypeError(f"cannot use a {t.dtype.name} value here", **self._where(node.span))

    def _bool(self, t: Any) -> Any:
        if isinstance(t, tf.Tensor) and t.dtype == tf.bool:
            return t
        return tf.not_equal(self._float(t, n.NoneLit(n.Span(1, 1, 1, 1))), 0)

    def _numeric_pair(self, a: Any, b: Any, node: n.Node) -> tuple[Any, Any]:
        """Operands of arithmetic: the wider float of the two, else the working dtype."""
        floats = [t.dtype for t in (a, b) if t.dtype.is_floating]
        target = max(floats, key=lambda d: d.size) if floats else self.dtype
        if a.dtype != target:
            a = tf.cast(a, target)
        if b.dtype != target:
            b = tf.cast(b, target)
        return a, b

    # -- nodes ----------------------------------------------------------------------------------

    def compile(self, node: n.Node, env: dict[str, Any]) -> Any:
        match node:
            case n.Num(value=value):
                return tf.constant(value, self.dtype)
            case n.Bool(value=value):
                return tf.constant(value)
            case n.Name(id=name):
                if name in env:
                    return env[name]
                return tf.constant(CONSTANTS[name], self.dtype)
            case n.Seq(items=items):
                parts = [self._float(self.compile(item, env), item) for item in items]
                return self._checked(node, lambda: tf.stack(parts))
            case n.Unary(op="not", operand=operand):
                value = self._bool(self.compile(operand, env))
                return tf.logical_not(value)
            case n.Unary(op=op, operand=operand):
                value = self._float(self.compile(operand, env), operand)
                return value if op == "+" else tf.negative(value)
            case n.Power(base=base, exponent=exponent):
                return self._power(node, base, exponent, env)
            case n.Chain(ops=ops, operands=operands):
                acc = self._float(self.compile(operands[0], env), operands[0])
                for op, operand in zip(ops, operands[1:], strict=True):
                    rhs = self._float(self.compile(operand, env), operand)
                    acc = self._binary(node, op, acc, rhs)
                return acc
            case n.Compare(ops=ops, operands=operands):
                values = [self._float(self.compile(o, env), o) for o in operands]
                result = None
                for op, lhs, rhs in zip(ops, values, values[1:], strict=False):
                    pair = self._numeric_pair(lhs, rhs, node)
                    cmp = self._checked(node, partial(_COMPARE[op], *pair))
                    both = None if result is None else partial(tf.logical_and, result, cmp)
                    result = cmp if both is None else self._checked(node, both)
                return result
            case n.BoolOp(op=op, operands=operands):
                combine = tf.logical_and if op == "and" else tf.logical_or
                acc = self._bool(self.compile(operands[0], env))
                for operand in operands[1:]:
                    rhs = self._bool(self.compile(operand, env))
                    acc = self._checked(node, partial(combine, acc, rhs))
                return acc
            case n.IfExp(body=body, test=test, orelse=orelse):
                cond = self._bool(self.compile(test, env))
                a = self._float(self.compile(body, env), body)
                b = self._float(self.compile(orelse, env), orelse)
                a, b = self._numeric_pair(a, b, node)
                return self._checked(node, lambda: tf.where(cond, a, b))
            case n.Subscript():
                return self._subscript(node, env)
            case n.Call():
                return self._call(node, env)
        raise InvalidArgument(f"{type(node).__name__} is not a value here", **self._where(node.span))

    def _binary(self, node: n.Node, op: str, a: Any, b: Any) -> Any:
        a, b = self._numeric_pair(a, b, node)
        if op == "@":
            rule = BUILTINS["matmul"].rule
            return self._checked(node, lambda: rule(self, a, b))
        return self._checked(node, lambda: _ARITH[op](a, b))

    def _power(self, node: n.Node, base_node: n.Node, exp_node: n.Node, env: dict[str, Any]) -> Any:
        base = self._float(self.compile(base_node, env), base_node)
        # Small integer literal exponents become products: exact at 0 for every derivative order
        # (pow's gradient rule evaluates log(0) there and can produce NaN in second order).
        if isinstance(exp_node, n.Num) and exp_node.is_int and 0 <= exp_node.value <= 4:
            k = int(exp_node.value)
            if k == 0:
                return self._checked(node, lambda: tf.ones_like(base))
            if k == 2:
                return self._checked(node, lambda: tf.square(base))
            out = base
            for _ in range(k - 1):
                out = self._checked(node, partial(tf.multiply, out, base))
            return out
        exponent = self._float(self.compile(exp_node, env), exp_node)
        base, exponent = self._numeric_pair(base, exponent, node)
        return self._checked(node, lambda: tf.pow(base, exponent))

    # -- indexing -------------------------------------------------------------------------------

    def _static_int(self, item: n.Node, what: str) -> int:
        from service.expr.program import _static  # one definition of what a literal is

        value: int = _static(item, "int", what, self.program.sources.get(self._source), self._source)
        return value

    def _subscript(self, node: n.Subscript, env: dict[str, Any]) -> Any:
        value = self.compile(node.value, env)
        key: list[Any] = []
        for item in node.index:
            if isinstance(item, n.NoneLit):
                key.append(None)
            elif isinstance(item, n.EllipsisLit):
                key.append(Ellipsis)
            elif isinstance(item, n.Slice):
                parts = [
                    None if part is None else self._static_int(part, "a slice bound")
                    for part in (item.lower, item.upper, item.step)
                ]
                if parts[2] == 0:
                    raise InvalidArgument("slice step cannot be zero", **self._where(item.span))
                key.append(slice(*parts))
            else:
                if not (
                    isinstance(item, n.Num) or isinstance(item, n.Unary) and isinstance(item.operand, n.Num)
                ):
                    raise InvalidArgument(
                        "an index must be an integer literal, a slice of integer literals, None or '...'; "
                        "use take(x, indices, axis) or gather(...) for computed indices",
                        **self._where(item.span),
                    )
                key.append(self._static_int(item, "an index"))
        if sum(1 for k in key if k is Ellipsis) > 1:
            raise InvalidArgument("an index can only have a single '...'", **self._where(node.span))
        rank = len(value.shape)
        used = sum(1 for k in key if k is not None and k is not Ellipsis)
        if used > rank:
            raise ShapeError(
                f"too many indices: the value has {rank} dimension(s), {used} were indexed",
                **self._where(node.span),
            )
        # Integer indices out of range would fail at run time; static shapes let us say so now.
        dim = 0
        for k in key:
            if k is Ellipsis:
                dim = rank - sum(1 for j in key[key.index(k) + 1 :] if j is not None and j is not Ellipsis)
                continue
            if k is None:
                continue
            if isinstance(k, int):
                size = value.shape[dim]
                if size is not None and not -size <= k < size:
                    raise ShapeError(
                        f"index {k} is out of range for axis {dim} of length {size}", **self._where(node.span)
                    )
            dim += 1
        return self._checked(node, lambda: value[tuple(key)])

    # -- calls ----------------------------------------------------------------------------------

    def _call(self, node: n.Call, env: dict[str, Any]) -> Any:
        if node.func in FORMS:
            return self._form(FORMS[node.func], node, env)
        if node.func in self.program.functions:
            args = [self._float(self.compile(a, env), a) for a in node.args]
            fn = self._user_function(self.program.functions[node.func])
            saved = self._source
            try:
                return self._checked(node, lambda: fn(*args))
            finally:
                self._source = saved
        builtin = BUILTINS[node.func]
        bound = bind_builtin(builtin, node, self.program.sources.get(self._source), self._source)
        values: list[Any] = []
        variadic: list[Any] = []
        for param, value in zip(builtin.params, bound.values, strict=True):
            if param.kind == "tensor":
                values.append(self._operand(value, env, builtin.name, param.name))
            elif param.kind == TENSORS:
                values.append([self._float(self.compile(v, env), v) for v in value])
            elif param.kind == VARIADIC:
                variadic = [self._float(self.compile(v, env), v) for v in value]
            else:
                values.append(value)
        return self._checked(node, lambda: builtin.rule(self, *values, *variadic))

    # -- loops and derivatives of user functions -------------------------------------------------

    def _form(self, form: Form, node: n.Call, env: dict[str, Any]) -> Any:
        """scan, fori, grad, hvp: program.py checked the function's name, arity and the step count."""
        target = node.args[form.function_index]
        assert isinstance(target, n.Name)
        fn = self._user_function(self.program.functions[target.id])
        rest = node.args[form.function_index + 1 :]
        values = [self._float(self.compile(arg, env), arg) for arg in rest]
        own, extra = values[: form.tensors], values[form.tensors :]
        if form.name == "grad":
            return self._checked(node, lambda: self._gradient(node, target.id, fn, own[0], None, extra))
        if form.name == "hvp":
            return self._checked(node, lambda: self._gradient(node, target.id, fn, own[0], own[1], extra))
        if form.name == "scan":
            return self._checked(node, lambda: self._scan(node, target.id, fn, own[0], own[1], extra))
        count = node.args[0]
        if isinstance(count, n.Name) and count.id in self.program.counts:
            if count.id not in self.counts:  # the job's own checks make this unreachable from the API
                raise InvalidArgument(
                    f"the step count of fori() names the constant {count.id!r}, whose value this job "
                    "does not carry among its loop counts",
                    **self._where(count.span),
                )
            steps = self.counts[count.id]
        else:
            steps = self._static_int(count, "the step count of fori()")
        return self._checked(node, lambda: self._fori(node, target.id, fn, steps, own[0], extra))

    def _gradient(
        self, node: n.Call, name: str, fn: Callable[..., Any], x: Any, v: Any, extra: list[Any]
    ) -> Any:
        """d fn(x, *extra) / dx (v None), or its Hessian times v: tapes nested inside the caller's.

        The tapes record on every enclosing tape (the engine's, an outer grad's), so derivatives of
        this derivative are derivatives of derivatives. x enters through its own identity, so only
        the first parameter is differentiated even when x is also passed among ``extra``.
        """
        form = "grad" if v is None else "hvp"
        if v is not None and v.shape != x.shape:
            raise ShapeError(
                f"hvp() needs v of the shape of x: x has shape {list(x.shape)}, v has {list(v.shape)}",
                **self._where(node.span),
            )
        point = tf.identity(x)
        with tf.GradientTape() as outer:
            outer.watch(point)
            with tf.GradientTape() as inner:
                inner.watch(point)
                y = fn(point, *extra)
            if y.shape.rank != 0:
                raise ShapeError(
                    f"{form}() needs {name}() to return a scalar; it returns shape {list(y.shape)} "
                    "(reduce it, e.g. sum(...))",
                    **self._where(node.span),
                )
            g = tf.convert_to_tensor(inner.gradient(y, point, unconnected_gradients=_ZERO))
        if v is None:
            return g
        return tf.convert_to_tensor(outer.gradient(g, point, output_gradients=v, unconnected_gradients=_ZERO))

    def _loop(self, node: n.Call, what: str, steps: int, step: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap one step of a loop: run when TF traces the loop body (once, whatever ``steps`` is).

        The gradient of a loop keeps every tensor of the step for every step (and scan stacks its
        carries), so each counts ``steps`` times against the element limit, as if unrolled: checked
        right after the step is traced, before the loop op exists or any derivative of it is traced.
        The stacked size is this loop's contribution to ``largest``, which bounds the Jacobian rows.
        """

        def traced(*args: Any) -> Any:
            outside = self.largest
            self.largest = 1
            try:
                out = step(*args)
                per_step = max(self.largest, *(_elements(a) for a in args))
            finally:
                self.largest = outside
            stacked = steps * per_step
            if stacked * self.batch_size > self.limits.max_tensor_elements:
                raise LimitExceeded(
                    f"{what} runs {steps} steps over tensors of up to {per_step} elements"
                    + (f" per point ({self.batch_size} points)" if self.batch_size > 1 else "")
                    + f": its gradient keeps each of them for every step, {stacked * self.batch_size} "
                    f"elements; at most {self.limits.max_tensor_elements} are allowed for any tensor",
                    limit="max_tensor_elements",
                    allowed=self.limits.max_tensor_elements,
                    estimate=stacked * self.batch_size,
                    construct=what,
                    **self._where(node.span),
                )
            self.largest = max(outside, stacked)
            return out

        return traced

    def _carry(self, node: n.Call, name: str, carry: Any, new: Any) -> Any:
        if new.shape != carry.shape:
            raise ShapeError(
                f"{name}() returns shape {list(new.shape)}, its carry has shape {list(carry.shape)}: "
                "a loop's carry keeps its shape from step to step",
                **self._where(node.span),
            )
        return new

    def _fori(
        self, node: n.Call, name: str, fn: Callable[..., Any], steps: int, init: Any, extra: list[Any]
    ) -> Any:
        if steps == 0:
            return tf.identity(init)

        def step(i: Any, carry: Any) -> tuple[Any, Any]:
            new = fn(tf.cast(i, self.dtype), carry, *extra)
            return i + 1, self._carry(node, name, carry, new)

        body = self._loop(node, f"fori({steps}, {name}, ...)", steps, step)
        start = (tf.constant(0), init)
        _, out = tf.while_loop(lambda i, _: i < steps, body, start, maximum_iterations=steps)
        return out

    def _scan(
        self, node: n.Call, name: str, fn: Callable[..., Any], init: Any, xs: Any, extra: list[Any]
    ) -> Any:
        if xs.shape.rank == 0:
            raise ShapeError(
                "scan() steps over the rows of xs (its first axis); this xs is a scalar",
                **self._where(node.span),
            )
        steps = int(xs.shape[0])
        if steps == 0:
            return tf.zeros([0, *init.shape], init.dtype)

        def step(carry: Any, x: Any) -> Any:
            return self._carry(node, name, carry, fn(carry, x, *extra))

        body = self._loop(node, f"scan({name}, ...) over {steps} rows", steps, step)
        return tf.scan(body, xs, initializer=init)

    def _operand(self, node: n.Node, env: dict[str, Any], func: str, param: str) -> Any:
        value = self.compile(node, env)
        if func == "where" and param == "condition":
            return self._bool(value)
        if func == "cast":
            return value
        return self._float(value, node)

    def _user_function(self, fdef: FunctionDef) -> Callable[..., Any]:
        if fdef.name in self._user:
            return self._user[fdef.name]
        source = f"functions.{fdef.name}.body"

        def body(*args: Any) -> Any:
            saved = self._source
            self._source = source
            try:
                return self._float(
                    self.compile(fdef.body, dict(zip(fdef.params, args, strict=True))), fdef.body
                )
            finally:
                self._source = saved

        if fdef.gradient is None:
            self._user[fdef.name] = body
            return body
        gradient = fdef.gradient

        def with_gradient(*args: Any) -> Any:
            @tf.custom_gradient  # type: ignore[untyped-decorator]
            def inner(*xs: Any) -> Any:
                y = body(*xs)

                def grad(dy: Any) -> Any:
                    env = dict(zip(fdef.params, xs, strict=True))
                    env["y"], env["dy"] = y, dy
                    missing = [p for p in fdef.params if p not in gradient]
                    auto: dict[str, Any] = {}
                    if missing:
                        # Parameters without a gradient expression get autodiff of the body.
                        with tf.GradientTape() as tape:
                            watched = [xs[fdef.params.index(p)] for p in missing]
                            tape.watch(watched)
                            y2 = body(*xs)
                        grads = tape.gradient(
                            y2,
                            watched,
                            output_gradients=dy,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO,
                        )
                        auto = dict(zip(missing, grads, strict=True))
                    out = []
                    for p, x in zip(fdef.params, xs, strict=True):
                        if p in auto:
                            out.append(auto[p])
                            continue
                        saved = self._source
                        self._source = f"functions.{fdef.name}.gradient.{p}"
                        try:
                            g = self._float(self.compile(gradient[p], env), gradient[p])
                            out.append(self._unbroadcast(g, x, gradient[p]))
                        finally:
                            self._source = saved
                    return out

                return y, grad

            return inner(*args)

        self._user[fdef.name] = with_gradient
        return with_gradient

    def _unbroadcast(self, g: Any, x: Any, node: n.Node) -> Any:
        """Sum a gradient over the axes along which its parameter was broadcast."""
        gs, xs = list(g.shape), list(x.shape)
        if gs == xs:
            return g
        extra = len(gs) - len(xs)
        if extra < 0:
            try:
                return tf.broadcast_to(g, x.shape)
            except ValueError:
                raise ShapeError(
                    f"the gradient expression has shape {gs}, its parameter has shape {xs}",
                    **self._where(node.span),
                ) from None
        axes = list(range(extra))
        for i, (gd, xd) in enumerate(zip(gs[extra:], xs, strict=True)):
            if xd == 1 and gd != 1:
                axes.append(extra + i)
            elif gd != xd and gd != 1:
                raise ShapeError(
                    f"the gradient expression has shape {gs}, its parameter has shape {xs}",
                    **self._where(node.span),
                )
        return tf.reshape(tf.reduce_sum(g, axis=axes), x.shape) if axes else tf.broadcast_to(g, x.shape)

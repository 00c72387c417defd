"""Checks a request's expression and user functions as a whole, without TensorFlow.

``build_program`` parses every piece of text, resolves every name, binds every call to its
signature (static arguments must be literals), refuses recursion and counts syntax nodes after
inlining user functions, so the API rejects bad programs before any worker is involved.
"""

from __future__ import annotations

import difflib
import keyword
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.boundedcache import BoundedCache
from service.errors import InvalidArgument, InvalidRequest, LimitExceeded, SourceLocation, UnknownName
from service.expr import nodes as n
from service.expr.functions import (
    AXIS,
    BOOL,
    BUILTINS,
    CONSTANTS,
    DTYPE,
    DTYPES,
    INT,
    NUMBER,
    ORD,
    REQUIRED,
    SHAPE,
    STR,
    TENSORS,
    VARIADIC,
    Builtin,
)
from service.expr.parser import parse_expression
from service.limits import Limits

__all__ = [
    "FORMS",
    "BoundCall",
    "Form",
    "FunctionDef",
    "Program",
    "bind_builtin",
    "build_program",
    "check_program",
    "is_identifier",
]

# Static integers (axes, shapes, counts) are bounded so no user text becomes Python big-int work.
_MAX_STATIC_INT = 2**31 - 1
_RESERVED = {"y", "dy"}  # names a gradient expression sees besides the parameters


@dataclass(frozen=True, slots=True)
class Form:
    """A call one of whose arguments names a user function: a loop or a derivative of that function.

    The arguments are ``[count,] function, <tensors> tensors, *args``: the function is called with
    ``params`` values of the construct's own, then the trailing ``*args`` unchanged (loop-invariant
    weights, data), so its parameter count must be ``params + len(args)``.
    """

    name: str
    signature: str
    doc: str
    counted: bool  # a static integer count comes first (fori)
    tensors: int  # tensor arguments after the function name, before *args
    params: int  # values the construct passes the function before *args
    # Syntax nodes of the function count this many times: a derivative traces the function's
    # forward graph and one backward graph per order on top of it.
    weight: int
    order: int  # derivative order the construct adds to its function's (nested tapes)

    @property
    def function_index(self) -> int:
        return 1 if self.counted else 0


FORMS: dict[str, Form] = {
    form.name: form
    for form in (
        Form(
            "scan",
            "scan(step, init, xs, *args)",
            "The carries step(carry, x, *args) returns for each row x of xs, stacked; one graph loop.",
            counted=False,
            tensors=2,
            params=2,
            weight=1,
            order=0,
        ),
        Form(
            "fori",
            "fori(n, body, init, *args)",
            "The carry after n steps carry = body(i, carry, *args), i = 0..n-1; one graph loop.",
            counted=True,
            tensors=1,
            params=2,
            weight=1,
            order=0,
        ),
        Form(
            "grad",
            "grad(f, x, *args)",
            "Gradient of the scalar f(x, *args) with respect to x.",
            counted=False,
            tensors=1,
            params=1,
            weight=2,
            order=1,
        ),
        Form(
            "hvp",
            "hvp(f, x, v, *args)",
            "Hessian of the scalar f(x, *args) with respect to x, times v (the shape of x).",
            counted=False,
            tensors=2,
            params=1,
            weight=4,
            order=2,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class FunctionDef:
    """A user function: parameters, body, and optional gradient expressions per parameter."""

    name: str
    params: tuple[str, ...]
    body: n.Node
    body_text: str
    gradient: dict[str, n.Node] | None
    gradient_text: dict[str, str] | None
    doc: str = ""


@dataclass(frozen=True, slots=True)
class Program:
    """A checked request program: the expression, user functions (in definition order), inputs."""

    expression: n.Node
    text: str
    functions: dict[str, FunctionDef]
    variables: tuple[str, ...]
    constants: tuple[str, ...]
    node_count: int
    sources: dict[str, str] = field(default_factory=dict)  # source name -> text, for error carets
    # The deepest nesting of derivatives taken inside the program (grad 1, hvp 2, through calls):
    # the engine's own derivatives nest on top of it.
    derivative_order: int = 0
    forms: frozenset[str] = frozenset()  # the loops and derivatives (FORMS) the program uses
    # Request constants used as a loop's step count (``fori(n, ...)`` in the expression): their
    # values shape the compiled program, so a job puts them in its signature (service.jobs).
    counts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BoundCall:
    """A builtin call with each parameter's argument: a node (tensor kinds) or a static value."""

    builtin: Builtin
    values: tuple[Any, ...]  # per param: Node, list[Node] (TENSORS/VARIADIC) or a Python value


def _check_name_length(name: str, what: str, field: str, limits: Limits) -> None:
    """Before anything else looks at a name (messages quote it, caches keep it): its length."""
    if len(name) > limits.max_name_chars:
        raise LimitExceeded(
            f"{what} {name[:32]!r}... has {len(name)} characters; "
            f"at most {limits.max_name_chars} are allowed",
            limit="max_name_chars",
            allowed=limits.max_name_chars,
            field=field,
        )


def is_identifier(name: str) -> bool:
    return name.isidentifier() and name.isascii() and not keyword.iskeyword(name)


class _Checker:
    def __init__(self, sources: dict[str, str], limits: Limits) -> None:
        self.sources = sources
        self.limits = limits
        # Derivative order of each checked function, and the deepest seen in the current tree.
        self.orders: dict[str, int] = {}
        self.order = 0
        self.forms: set[str] = set()
        self.constants: frozenset[str] = frozenset()  # the request's constants, by name
        self.counts: set[str] = set()  # those used as step counts

    def where(self, source: str, span: n.Span) -> dict[str, Any]:
        end = span.end_column if span.end_line == span.line else None
        return {
            "text": self.sources.get(source),
            "where": SourceLocation(source, span.line, span.column, end),
        }

    def check(
        self,
        node: n.Node | n.Slice | n.Keyword,
        source: str,
        names: frozenset[str],
        functions: Mapping[str, FunctionDef],
        sizes: Mapping[str, int],
        forbidden: Mapping[str, str],
    ) -> int:
        """Validate a tree; returns its syntax-node count with user functions inlined.

        Every node counts, as the parser counted it (static arguments and index markers too); a
        call of a user function adds the function's own count.
        """
        count = 1
        if isinstance(node, n.Name):
            if node.id not in names and node.id not in CONSTANTS:
                raise self.unknown(node.id, node.span, source, names | set(CONSTANTS), "name")
        elif isinstance(node, n.Call):
            count += self.check_call(node, source, names, functions, sizes, forbidden)
            return count
        elif isinstance(node, n.Str):
            raise InvalidArgument(
                "a string is only allowed as an argument that takes one (einsum subscripts, cast dtype)",
                **self.where(source, node.span),
            )
        elif isinstance(node, n.NoneLit | n.EllipsisLit):
            what = "None" if isinstance(node, n.NoneLit) else "'...'"
            raise InvalidArgument(
                f"{what} is only allowed inside an index, e.g. x[:, None] or x[..., 0]",
                **self.where(source, node.span),
            )
        elif isinstance(node, n.Subscript):
            count += self.check(node.value, source, names, functions, sizes, forbidden)
            for item in node.index:
                if isinstance(item, n.NoneLit | n.EllipsisLit):
                    count += 1
                else:
                    count += self.check(item, source, names, functions, sizes, forbidden)
            return count
        for child in n.children(node):
            count += self.check(child, source, names, functions, sizes, forbidden)
        return count

    def unknown(self, name: str, span: n.Span, source: str, known: Any, what: str) -> UnknownName:
        candidates = sorted(set(known))
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        if name.startswith("__"):
            hint = "; dunder names do not exist in the expression language"
        return UnknownName(
            f"unknown {what} {name!r}{hint}",
            name=name,
            suggestions=close,
            **self.where(source, span),
        )

    def check_call(
        self,
        call: n.Call,
        source: str,
        names: frozenset[str],
        functions: Mapping[str, FunctionDef],
        sizes: Mapping[str, int],
        forbidden: Mapping[str, str],
    ) -> int:
        if call.func in forbidden:
            raise InvalidArgument(forbidden[call.func], **self.where(source, call.func_span))
        count = 0
        tensor_args: list[n.Node]
        if call.func in FORMS:
            count, tensor_args = self.check_form(FORMS[call.func], call, source, functions, sizes, forbidden)
        elif call.func in functions:
            self.order = max(self.order, self.orders.get(call.func, 0))
            fdef = functions[call.func]
            if call.keywords:
                raise InvalidArgument(
                    f"user function {call.func!r} takes positional arguments only",
                    **self.where(source, call.keywords[0].span),
                )
            if len(call.args) != len(fdef.params):
                raise InvalidArgument(
                    f"{call.func}() takes {len(fdef.params)} argument(s) "
                    f"({', '.join(fdef.params)}), got {len(call.args)}",
                    **self.where(source, call.span),
                )
            count += sizes[call.func]
            tensor_args = list(call.args)
        elif call.func in BUILTINS:
            bound = bind_builtin(BUILTINS[call.func], call, self.sources.get(source), source)
            tensor_args = []
            for param, value in zip(bound.builtin.params, bound.values, strict=True):
                if param.kind in (TENSORS, VARIADIC):
                    tensor_args.extend(value)
                elif param.kind == "tensor" and value is not None:
                    tensor_args.append(value)
            # Static arguments (axes, shapes, literals) and keyword markers count as parsed.
            count += n.tree_size(call) - 1 - sum(n.tree_size(arg) for arg in tensor_args)
        else:
            known = set(BUILTINS) | set(functions)
            raise self.unknown(call.func, call.func_span, source, known, "function")
        for arg in tensor_args:
            count += self.check(arg, source, names, functions, sizes, forbidden)
        return count

    def check_form(
        self,
        form: Form,
        call: n.Call,
        source: str,
        functions: Mapping[str, FunctionDef],
        sizes: Mapping[str, int],
        forbidden: Mapping[str, str],
    ) -> tuple[int, list[n.Node]]:
        """A loop or derivative call: its function, its count and its arity; returns (nodes, tensor args)."""
        example = f"; e.g. {form.signature} with functions: {{name: {{params: [...], body: ...}}}}"
        if call.keywords:
            raise InvalidArgument(
                f"{form.name}() takes positional arguments only; signature: {form.signature}",
                **self.where(source, call.keywords[0].span),
            )
        first = form.function_index + 1 + form.tensors
        if len(call.args) < first:
            raise InvalidArgument(
                f"{form.name}() needs at least {first} arguments, got {len(call.args)}; "
                f"signature: {form.signature}",
                **self.where(source, call.span),
            )
        count_name = call.args[0] if form.counted and isinstance(call.args[0], n.Name) else None
        if count_name is not None and count_name.id not in CONSTANTS:
            # A request constant as the count: the top-level expression sees the constants, a
            # function body only its parameters (tensors, not counts).
            if source != "expression" or count_name.id not in self.constants:
                why = (
                    f"{count_name.id!r} is not one of the request's constants"
                    if source == "expression"
                    else "a function's parameters are tensors, not counts: write the count as a literal"
                )
                raise InvalidArgument(
                    f"the step count of {form.name}() must be an integer literal or, in the request's "
                    f"expression, the name of a request constant holding one integer; {why}",
                    **self.where(source, count_name.span),
                )
            self.counts.add(count_name.id)
        elif form.counted:
            what = f"the step count of {form.name}()"
            steps = _static(call.args[0], INT, what, self.sources.get(source), source)
            if steps < 0:
                raise InvalidArgument(
                    f"the step count of {form.name}() must be at least 0, got {steps}",
                    **self.where(source, call.args[0].span),
                )
        target = call.args[form.function_index]
        if not isinstance(target, n.Name):
            raise InvalidArgument(
                f"argument {form.function_index + 1} of {form.name}() must name one of the request's "
                f"functions{example}",
                **self.where(source, target.span),
            )
        if target.id in forbidden:
            raise InvalidArgument(forbidden[target.id], **self.where(source, target.span))
        if target.id not in functions:
            if target.id in BUILTINS:
                raise InvalidArgument(
                    f"{target.id} is a built-in function; {form.name}() takes the name of one of the "
                    f"request's functions (define one whose body calls {target.id}){example}",
                    **self.where(source, target.span),
                )
            raise self.unknown(target.id, target.span, source, functions, "function")
        fdef = functions[target.id]
        args = list(call.args[form.function_index + 1 :])
        extra = len(args) - form.tensors
        if len(fdef.params) != form.params + extra:
            raise InvalidArgument(
                f"{form.name}() calls {target.id}() with {form.params} value(s) of its own"
                + (f" and the {extra} extra argument(s) after them" if extra else "")
                + f", {form.params + extra} in all; {target.id}() takes {len(fdef.params)} "
                f"({', '.join(fdef.params)}); signature: {form.signature}",
                **self.where(source, call.span),
            )
        self.order = max(self.order, form.order + self.orders.get(target.id, 0))
        self.forms.add(form.name)
        # The function's graph is traced once per call (never per step), weighted for derivatives;
        # the function's name and the step count count as parsed.
        static = n.tree_size(target) + (n.tree_size(call.args[0]) if form.counted else 0)
        return form.weight * sizes[target.id] + static, args


def _static(node: n.Node, kind: str, what: str, text: str | None, source: str) -> Any:
    """The Python value of a literal argument of a static kind, or InvalidArgument."""

    def fail(expected: str) -> InvalidArgument:
        end = node.span.end_column if node.span.end_line == node.span.line else None
        return InvalidArgument(
            f"{what} must be {expected}",
            text=text,
            where=SourceLocation(source, node.span.line, node.span.column, end),
        )

    def number(m: n.Node) -> float | None:
        if isinstance(m, n.Num):
            return m.value
        if isinstance(m, n.Name) and m.id in CONSTANTS:
            return CONSTANTS[m.id]
        if isinstance(m, n.Unary) and m.op in "-+":
            inner = number(m.operand)
            return None if inner is None else (-inner if m.op == "-" else inner)
        return None

    def integer(m: n.Node) -> int | None:
        value = number(m)
        inner = m.operand if isinstance(m, n.Unary) else m
        if value is None or not (isinstance(inner, n.Num) and inner.is_int):
            return None
        if abs(value) > _MAX_STATIC_INT:
            raise fail(f"an integer of at most {_MAX_STATIC_INT} in magnitude")
        return int(value)

    def integers(m: n.Node) -> tuple[int, ...] | None:
        if isinstance(m, n.Seq):
            out = [integer(item) for item in m.items]
            return None if any(v is None for v in out) else tuple(v for v in out if v is not None)
        single = integer(m)
        return None if single is None else (single,)

    if kind == INT:
        if isinstance(node, n.NoneLit):
            return None
        value = integer(node)
        if value is None:
            raise fail("an integer literal")
        return value
    if kind == AXIS:
        if isinstance(node, n.NoneLit):
            return None
        single = integer(node)
        if single is not None:
            return single
        values = integers(node)
        if values is None:
            raise fail("None, an integer literal or a tuple of integer literals")
        return values
    if kind == SHAPE:
        values = integers(node)
        if values is None:
            raise fail("an integer literal or a tuple of integer literals")
        return values
    if kind == NUMBER:
        if isinstance(node, n.NoneLit):
            return None
        literal = number(node)
        if literal is None:
            raise fail("a numeric literal")
        return literal
    if kind == ORD:
        if isinstance(node, n.NoneLit):
            return None
        if isinstance(node, n.Str) and node.value == "fro":
            return "fro"
        order = number(node)
        if order not in (1, 2, math.inf):
            raise fail('None, 1, 2, inf or "fro"')
        return order
    if kind == BOOL:
        if not isinstance(node, n.Bool):
            raise fail("True or False")
        return node.value
    if kind == STR:
        if not isinstance(node, n.Str):
            raise fail("a string literal")
        return node.value
    if kind == DTYPE:
        if not isinstance(node, n.Str) or node.value not in DTYPES:
            raise fail(f"one of {', '.join(repr(d) for d in DTYPES)}")
        return node.value
    raise AssertionError(f"unknown parameter kind {kind}")


def bind_builtin(builtin: Builtin, call: n.Call, text: str | None, source: str) -> BoundCall:
    """Match a call's arguments to a builtin's parameters, resolving static ones to values."""

    def fail(message: str, span: n.Span) -> InvalidArgument:
        end = span.end_column if span.end_line == span.line else None
        return InvalidArgument(
            f"{message}; signature: {builtin.signature}",
            text=text,
            where=SourceLocation(source, span.line, span.column, end),
        )

    params = builtin.params
    slots: list[Any] = [REQUIRED] * len(params)
    positional = list(call.args)
    for i, param in enumerate(params):
        if not positional:
            break
        if param.kind == VARIADIC:
            slots[i] = positional
            positional = []
            break
        slots[i] = positional.pop(0)
    if positional:
        raise fail(f"{builtin.name}() takes at most {len(params)} positional argument(s)", positional[0].span)
    by_name = {p.name: i for i, p in enumerate(params)}
    for kw in call.keywords:
        if kw.name not in by_name or params[by_name[kw.name]].kind == VARIADIC:
            raise fail(f"{builtin.name}() has no argument {kw.name!r}", kw.span)
        if slots[by_name[kw.name]] is not REQUIRED:
            raise fail(f"{builtin.name}() got argument {kw.name!r} twice", kw.span)
        slots[by_name[kw.name]] = kw.value
    values: list[Any] = []
    for param, slot in zip(params, slots, strict=True):
        what = f"argument {param.name!r} of {builtin.name}()"
        if slot is REQUIRED:
            if param.kind == VARIADIC:
                values.append([])
                continue
            if param.default is REQUIRED:
                raise fail(f"{builtin.name}() is missing argument {param.name!r}", call.span)
            values.append(param.default)
        elif param.kind == "tensor":
            values.append(slot)
        elif param.kind == VARIADIC:
            values.append(list(slot))
        elif param.kind == TENSORS:
            if not isinstance(slot, n.Seq) or not slot.items:
                raise fail(f"{what} must be a non-empty list such as [a, b]", slot.span)
            values.append(list(slot.items))
        else:
            values.append(_static(slot, param.kind, what, text, source))
    if builtin.name == "einsum":
        if not values[1]:
            raise fail("einsum() needs at least one operand", call.span)
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,->. ")
        if not set(values[0]) <= allowed:
            raise fail("einsum subscripts may contain only letters, ',', '->' and '...'", call.span)
    return BoundCall(builtin, tuple(values))


def _total_chars(expression: str, functions: Mapping[str, Mapping[str, Any]]) -> int:
    """The length of every text a program would parse (non-texts count 0: they are refused later)."""
    total = len(expression)
    for spec in functions.values():
        body = spec.get("body") if isinstance(spec, Mapping) else None
        total += len(body) if isinstance(body, str) else 0
        gradient = spec.get("gradient") if isinstance(spec, Mapping) else None
        if isinstance(gradient, Mapping):
            total += sum(len(text) for text in gradient.values() if isinstance(text, str))
    return total


def _spec_text(spec: Mapping[str, Any], key: str, where: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string", field=where)
    return value


def build_program(
    expression: str,
    variables: Sequence[str],
    constants: Sequence[str] = (),
    functions: Mapping[str, Mapping[str, Any]] | None = None,
    limits: Limits | None = None,
) -> Program:
    """Parse and check a whole request program. ``functions`` maps name -> {params, body, gradient}."""
    limits = limits or Limits()
    functions = functions or {}
    if len(functions) > limits.max_functions:
        raise LimitExceeded(
            f"{len(functions)} functions given; at most {limits.max_functions} are allowed",
            limit="max_functions",
            allowed=limits.max_functions,
        )
    inputs = [*variables, *constants]
    if len(inputs) > limits.max_inputs:
        raise LimitExceeded(
            f"{len(inputs)} variables and constants given; at most {limits.max_inputs} are allowed",
            limit="max_inputs",
            allowed=limits.max_inputs,
        )
    taken: dict[str, str] = {}
    for kind, names in (("variable", variables), ("constant", constants), ("function", list(functions))):
        field_name = {"variable": "variables", "constant": "constants", "function": "functions"}[kind]
        for name in names:
            _check_name_length(name, f"{kind} name", f"{field_name}.{name[:32]}", limits)
            if not is_identifier(name):
                raise InvalidRequest(
                    f"{kind} name {name!r} is not a valid identifier (letters, digits and _, "
                    "not starting with a digit, not a keyword)",
                    field=f"{field_name}.{name}",
                )
            if name.startswith("__"):
                raise InvalidRequest(
                    f"{kind} name {name!r}: names may not start with '__'", field=f"{field_name}.{name}"
                )
            if name in BUILTINS or name in CONSTANTS or name in FORMS:
                what = "constant" if name in CONSTANTS else "built-in function"
                raise InvalidRequest(
                    f"{kind} name {name!r} would hide the {what} of that name; choose another name",
                    field=f"{field_name}.{name}",
                )
            if name in taken:
                raise InvalidRequest(
                    f"{kind} name {name!r} is already used by a {taken[name]}", field=f"{field_name}.{name}"
                )
            taken[name] = kind

    total = _total_chars(expression, functions)
    if total > limits.max_program_chars:
        raise LimitExceeded(
            f"the request's texts (expression, function bodies and gradients) have {total} characters "
            f"together; at most {limits.max_program_chars} are allowed",
            limit="max_program_chars",
            allowed=limits.max_program_chars,
        )
    sources: dict[str, str] = {"expression": expression}
    checker = _Checker(sources, limits)
    checker.constants = frozenset(constants)
    order = list(functions)
    defs: dict[str, FunctionDef] = {}
    sizes: dict[str, int] = {}
    for index, (fname, spec) in enumerate(functions.items()):
        where = f"functions.{fname}"
        raw_params = spec.get("params", [])
        if not isinstance(raw_params, list | tuple) or not all(isinstance(p, str) for p in raw_params):
            raise InvalidRequest(f"{where}.params must be a list of names", field=f"{where}.params")
        params = tuple(raw_params)
        for p in params:
            _check_name_length(p, f"parameter name of {fname}()", f"{where}.params", limits)
            if not is_identifier(p) or p.startswith("__") or p in BUILTINS or p in CONSTANTS or p in FORMS:
                raise InvalidRequest(
                    f"parameter name {p!r} of {fname}() is not allowed (an identifier that is not a "
                    "built-in function or constant)",
                    field=f"{where}.params",
                )
        if len(set(params)) != len(params):
            raise InvalidRequest(f"{fname}() has a repeated parameter name", field=f"{where}.params")
        body_text = _spec_text(spec, "body", f"{where}.body")
        sources[f"{where}.body"] = body_text
        body = parse_expression(body_text, limits, f"{where}.body")  # stops at max_syntax_nodes
        later = {name: f"{fname}() may only call functions defined before it; {name}() comes later"
                 for name in order[index + 1 :]}  # fmt: skip
        later[fname] = f"{fname}() calls itself: recursion is not allowed"
        checker.order = 0  # the deepest derivative nesting of this function, body and gradients
        size = checker.check(body, f"{where}.body", frozenset(params), defs, sizes, later)
        if size > limits.max_syntax_nodes:  # before any of its gradients is parsed
            raise _too_many_nodes(size, limits, where)
        gradient: dict[str, n.Node] | None = None
        gradient_text: dict[str, str] | None = None
        raw_gradient = spec.get("gradient")
        if raw_gradient is not None:
            if not isinstance(raw_gradient, Mapping):
                raise InvalidRequest(
                    f"{where}.gradient must map parameter names to expressions", field=f"{where}.gradient"
                )
            clash = _RESERVED & set(params)
            if clash:
                raise InvalidRequest(
                    f"{fname}() has a custom gradient, so its parameters may not be named "
                    f"{' or '.join(sorted(clash))} (the gradient sees the output as y and the "
                    "upstream gradient as dy)",
                    field=f"{where}.params",
                )
            gradient, gradient_text = {}, {}
            for pname, gtext in raw_gradient.items():
                gwhere = f"{where}.gradient.{pname}"
                if pname not in params:
                    raise InvalidRequest(f"{gwhere}: {pname!r} is not a parameter of {fname}()", field=gwhere)
                if not isinstance(gtext, str):
                    raise InvalidRequest(f"{gwhere} must be a string", field=gwhere)
                sources[gwhere] = gtext
                gradient_text[pname] = gtext
                # Parsing stops where this gradient would take the function past the limit.
                gradient[pname] = parse_expression(gtext, limits, gwhere, limits.max_syntax_nodes - size)
                size += checker.check(
                    gradient[pname], gwhere, frozenset(params) | _RESERVED, defs, sizes, later
                )
                if size > limits.max_syntax_nodes:  # before the next gradient is parsed
                    raise _too_many_nodes(size, limits, where)
        sizes[fname] = size
        if size > limits.max_syntax_nodes:
            raise _too_many_nodes(size, limits, where)
        if checker.order > limits.max_order:
            raise _too_deep(checker.order, limits, where)
        checker.orders[fname] = checker.order
        doc = spec.get("doc") or ""
        defs[fname] = FunctionDef(fname, params, body, body_text, gradient, gradient_text, str(doc))

    tree = parse_expression(expression, limits, "expression")
    checker.order = 0
    count = checker.check(tree, "expression", frozenset(inputs), defs, sizes, {})
    if count > limits.max_syntax_nodes:
        raise _too_many_nodes(count, limits, "expression")
    if checker.order > limits.max_order:
        raise _too_deep(checker.order, limits, "expression")
    return Program(
        tree,
        expression,
        defs,
        tuple(variables),
        tuple(constants),
        count,
        sources,
        checker.order,
        frozenset(checker.forms),
        tuple(sorted(checker.counts)),
    )


def _too_many_nodes(count: int, limits: Limits, where: str) -> LimitExceeded:
    return LimitExceeded(
        f"{where} has {count} syntax nodes with user functions inlined; at most "
        f"{limits.max_syntax_nodes} are allowed (functions calling functions several times "
        "grow exponentially)",
        limit="max_syntax_nodes",
        allowed=limits.max_syntax_nodes,
        source=where,
    )


def _too_deep(order: int, limits: Limits, where: str) -> LimitExceeded:
    return LimitExceeded(
        f"{where} nests derivatives (grad 1, hvp 2) to order {order}; at most {limits.max_order} "
        "are allowed (each order traces the function's graph again, on top of the one before)",
        limit="max_order",
        allowed=limits.max_order,
        source=where,
    )


# Repeated requests repeat their text; checking it again would cost ~1 ms of parsing each time.
# Bounded by count and by the texts' total length: a request's texts may reach megabytes.
# The value kept is the program's ``counts`` (constants used as step counts).
_CHECKED_PROGRAMS = BoundedCache[tuple[Any, ...], tuple[str, ...]](max_entries=1024, max_bytes=16 * 2**20)


def _check_key(
    expression: str,
    variables: Sequence[str],
    constants: Sequence[str],
    functions: Mapping[str, Mapping[str, Any]] | None,
    limits: Limits | None,
) -> tuple[Any, ...]:
    frozen = tuple(
        (
            name,
            tuple(spec.get("params") or ()),
            spec.get("body"),
            None if spec.get("gradient") is None else tuple(dict(spec["gradient"]).items()),
        )
        for name, spec in (functions or {}).items()
    )
    return (expression, tuple(variables), tuple(constants), frozen, limits or Limits())


def unchecked_chars(
    expression: str,
    variables: Sequence[str],
    constants: Sequence[str] = (),
    functions: Mapping[str, Mapping[str, Any]] | None = None,
    limits: Limits | None = None,
) -> int:
    """How many characters ``check_program`` would parse: 0 for a program it has already passed.

    The API uses it to decide, before checking, whether the check runs on the event loop.
    """
    try:
        if _CHECKED_PROGRAMS.get(_check_key(expression, variables, constants, functions, limits)) is not None:
            return 0
    except (TypeError, ValueError):  # a malformed spec: counted as text like any other
        pass
    return _total_chars(expression, functions or {})


def check_program(
    expression: str,
    variables: Sequence[str],
    constants: Sequence[str] = (),
    functions: Mapping[str, Mapping[str, Any]] | None = None,
    limits: Limits | None = None,
) -> tuple[str, ...]:
    """``build_program`` for its errors, remembering programs that passed (errors are not cached).

    Returns the program's ``counts``: the constants used as loop step counts, whose values a job
    must put in its signature.
    """
    key = _check_key(expression, variables, constants, functions, limits)
    try:
        counts = _CHECKED_PROGRAMS.get(key)
        if counts is not None:
            return counts
    except TypeError:  # something unhashable in a malformed spec: check it uncached for its error
        return build_program(expression, variables, constants, functions, limits).counts
    counts = build_program(expression, variables, constants, functions, limits).counts
    # Only programs that passed are kept (an error is raised again each time, cheaply).
    _CHECKED_PROGRAMS.put(key, counts, size=len(repr(key[:4])))
    return counts

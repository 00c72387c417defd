"""Whole-program checks done without TensorFlow: names, calls, static arguments, user functions."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from service.errors import InvalidArgument, InvalidRequest, LimitExceeded, TapeserveError, UnknownName
from service.expr import BUILTINS, build_program
from service.limits import Limits


def problem(exc_type: type[TapeserveError], expression: str, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("variables", ["x"])
    with pytest.raises(exc_type) as info:
        build_program(expression, **kwargs)
    return info.value.to_dict()


def test_the_rosenbrock_program_checks() -> None:
    program = build_program("sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", ["x"])
    assert program.variables == ("x",)
    assert program.node_count > 10


@pytest.mark.parametrize(
    ("expression", "name", "suggestion"),
    [
        ("sun(x)", "sun", "sum"),
        ("x + yy", "yy", "y"),
        ("__import__('os')", "__import__", None),
        ("eval('1')", "eval", None),
        ("exec(x)", "exec", None),
        ("open(x)", "open", None),
        ("globals()", "globals", None),
        ("getattr(x, 'y')", "getattr", None),
    ],
)
def test_unknown_names_are_located_with_suggestions(
    expression: str, name: str, suggestion: str | None
) -> None:
    body = problem(UnknownName, expression, variables=["x", "y"])
    assert body["code"] == "unknown_name"
    assert body["name"] == name
    assert body["column"] == expression.index(name) + 1
    if suggestion:
        assert suggestion in body["suggestions"]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("sum(x, axis=x)", "axis"),
        ("sum(x, keepdims=1)", "True or False"),
        ("reshape(x, x)", "integer literal"),
        ("sum(x, 0, True, 4)", "at most 3 positional"),
        ("sum(x, axes=0)", "no argument 'axes'"),
        ("sum(x, 0, axis=1)", "twice"),
        ("arctan2(x)", "missing argument 'x'"),
        ("concatenate(x)", "non-empty list"),
        ('cast(x, "complex64")', "one of"),
        ('einsum("ij;j", x, x)', "only letters"),
        ('einsum("i")', "at least one operand"),
        ("x + 'text'", "string is only allowed"),
        ("x + None", "None is only allowed inside an index"),
        ("eye(99999999999)", "at most 2147483647"),
        ("norm(x, ord=3)", "None, 1, 2, inf"),
    ],
)
def test_bad_arguments_say_what_is_allowed(expression: str, message: str) -> None:
    body = problem(InvalidArgument, expression)
    assert message in body["detail"]
    assert body["code"] == "invalid_argument" and "line" in body and "snippet" in body


@pytest.mark.parametrize(
    ("variables", "constants", "message"),
    [
        (["sum"], [], "hide the built-in function"),
        (["pi"], [], "hide the constant"),
        (["x"], ["x"], "already used"),
        (["1x"], [], "not a valid identifier"),
        (["lambda"], [], "not a valid identifier"),
        (["__x"], [], "may not start with '__'"),
    ],
)
def test_input_names_are_checked(variables: list[str], constants: list[str], message: str) -> None:
    body = problem(InvalidRequest, "1", variables=variables, constants=constants)
    assert message in body["detail"] and body["field"]


def test_user_functions_and_custom_gradients_check() -> None:
    functions = {
        "custom_relu": {"params": ["x"], "body": "maximum(0.0, x)", "gradient": {"x": "dy * (x > 0)"}},
        "twice": {"params": ["a"], "body": "custom_relu(a) * 2"},
    }
    program = build_program("sum(twice(x))", ["x"], functions=functions)
    assert list(program.functions) == ["custom_relu", "twice"]
    assert program.functions["custom_relu"].gradient is not None


@pytest.mark.parametrize(
    ("functions", "message", "source"),
    [
        ({"f": {"params": ["x"], "body": "f(x)"}}, "calls itself", "functions.f.body"),
        (
            {"f": {"params": ["x"], "body": "g(x)"}, "g": {"params": ["x"], "body": "f(x)"}},
            "comes later",
            "functions.f.body",
        ),
        ({"f": {"params": ["x"], "body": "x + q"}}, "unknown name 'q'", "functions.f.body"),
        (
            {"f": {"params": ["x"], "body": "x", "gradient": {"x": "dy * z"}}},
            "unknown name 'z'",
            "functions.f.gradient.x",
        ),
        ({"f": {"params": ["x"], "body": "sin(x"}}, "expected ')'", "functions.f.body"),
    ],
)
def test_user_function_errors_name_their_source(functions: dict[str, Any], message: str, source: str) -> None:
    with pytest.raises(TapeserveError) as info:
        build_program("f(x)", ["x"], functions=functions)
    body = info.value.to_dict()
    assert message in body["detail"] and body["source"] == source


def test_function_call_arity_is_checked() -> None:
    body = problem(InvalidArgument, "f(x, x)", functions={"f": {"params": ["a"], "body": "a"}})
    assert "takes 1 argument" in body["detail"]


def test_gradient_of_a_non_parameter_is_refused() -> None:
    body = problem(
        InvalidRequest, "f(x)", functions={"f": {"params": ["a"], "body": "a", "gradient": {"b": "dy"}}}
    )
    assert "not a parameter" in body["detail"]


def test_exponential_inlining_is_refused() -> None:
    # Each level calls the previous twice: 2**30 copies of x once inlined, from a 30-line request.
    functions = {"f0": {"params": ["a"], "body": "a * a"}}
    for i in range(1, 31):
        functions[f"f{i}"] = {"params": ["a"], "body": f"f{i - 1}(a) + f{i - 1}(a)"}
    with pytest.raises(LimitExceeded) as info:
        build_program("f30(x)", ["x"], functions=functions)
    assert info.value.to_dict()["limit"] == "max_syntax_nodes"


def test_node_limit_counts_the_expression() -> None:
    with pytest.raises(LimitExceeded):
        build_program(" + ".join(["x"] * 200), ["x"], limits=Limits(max_syntax_nodes=100))


REQUIRED_FUNCTIONS = """
abs sign sqrt square exp expm1 log log1p log2 log10 sin cos tan arcsin arccos arctan arctan2 sinh cosh
tanh arcsinh arccosh arctanh sigmoid relu softplus elu selu gelu swish erf lgamma digamma floor ceil round
sum mean prod max min logsumexp norm var std cumsum cumprod
matmul dot einsum transpose trace det slogdet inv solve cholesky diag eye
reshape concatenate stack expand_dims squeeze tile broadcast_to take gather zeros_like ones_like arange
linspace triu tril one_hot where maximum minimum clip softmax log_softmax cast stop_gradient clip_gradient
""".split()


def test_the_table_has_every_required_function_with_a_doc() -> None:
    assert set(REQUIRED_FUNCTIONS) <= set(BUILTINS)
    for builtin in BUILTINS.values():
        assert builtin.doc.endswith(".") and len(builtin.doc) < 120, builtin.name
        assert callable(builtin.rule) and builtin.signature.startswith(builtin.name + "(")


def test_checking_never_imports_tensorflow() -> None:
    code = (
        "import sys; from service.expr import build_program; "
        "build_program('sum(sin(x) @ x)', ['x']); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- loops and derivatives of user functions: scan, fori, grad, hvp --------------------------------

STEP = {"step": {"params": ["c", "x"], "body": "c + x"}, "body": {"params": ["i", "c"], "body": "c * 2"}}


def test_loops_and_derivatives_check_and_count_their_function_once() -> None:
    functions = {**STEP, "f": {"params": ["x", "w"], "body": "sum(w * x**2)"}}
    program = build_program(
        "sum(scan(step, x, x[:, None])) + sum(fori(1000, body, x))"
        " + sum(grad(f, x, x)) + sum(hvp(f, x, x, x))",
        ["x"],
        functions=functions,
    )
    assert program.forms == {"scan", "fori", "grad", "hvp"}
    assert program.derivative_order == 2
    # A thousand steps are traced once: the node count does not depend on the trip count.
    one = build_program("sum(fori(1, body, x))", ["x"], functions=STEP).node_count
    assert build_program("sum(fori(1000000, body, x))", ["x"], functions=STEP).node_count == one


def test_nested_derivatives_add_their_orders() -> None:
    functions = {
        "f": {"params": ["x"], "body": "sum(x**3)"},
        "g": {"params": ["x"], "body": "sum(grad(f, x))"},
        "h": {"params": ["x"], "body": "sum(hvp(g, x, x))"},
    }
    assert build_program("grad(g, x)", ["x"], functions=functions).derivative_order == 2
    assert build_program("h(x)", ["x"], functions=functions).derivative_order == 3
    body = problem(LimitExceeded, "grad(h, x)", functions=functions, limits=Limits(max_order=3))
    assert body["limit"] == "max_order" and "order 4" in body["detail"]


@pytest.mark.parametrize(
    ("expression", "message", "column"),
    [
        ("scan(nope, x, x)", "unknown function 'nope'", 6),
        ("scan(stepp, x, x)", "did you mean 'step'", 6),
        ("grad(sin, x)", "sin is a built-in function", 6),
        ("grad(x * 2, x)", "argument 1 of grad() must name one of the request's functions", 6),
        ("fori(n, body, x)", "the step count of fori() must be an integer literal", 6),
        ("fori(2.5, body, x)", "the step count of fori() must be an integer literal", 6),
        ("fori(-1, body, x)", "must be at least 0", 6),
        ("scan(step, x)", "scan() needs at least 3 arguments", 1),
        ("grad(body, x)", "grad() calls body() with 1 value(s) of its own, 1 in all", 1),
        ("fori(3, body, x, x)", "and the 1 extra argument(s)", 1),
        ("grad(step, x, x, x)", "takes 2 (c, x)", 1),
        ("scan(step, init=x, xs=x)", "positional arguments only", 12),
    ],
)
def test_misused_loops_and_derivatives_are_located(expression: str, message: str, column: int) -> None:
    with pytest.raises(TapeserveError) as info:
        build_program(expression, ["x", "n"], functions=STEP)
    body = info.value.to_dict()
    assert message in body["detail"], body["detail"]
    assert body["line"] == 1 and body["column"] == column


def test_a_loop_or_derivative_cannot_recurse_or_call_ahead() -> None:
    functions = {"f": {"params": ["x"], "body": "sum(grad(f, x))"}}
    with pytest.raises(InvalidArgument, match="calls itself"):
        build_program("f(x)", ["x"], functions=functions)
    functions = {"f": {"params": ["x"], "body": "sum(grad(g, x))"}, "g": {"params": ["x"], "body": "sum(x)"}}
    with pytest.raises(InvalidArgument, match="comes later"):
        build_program("f(x)", ["x"], functions=functions)


@pytest.mark.parametrize("name", ["scan", "fori", "grad", "hvp"])
def test_the_construct_names_are_reserved(name: str) -> None:
    body = problem(InvalidRequest, "1", variables=[name])
    assert "hide the built-in function" in body["detail"]


def test_constants_used_as_step_counts_are_reported() -> None:
    from service.expr.program import check_program

    functions = {"step": {"params": ["i", "c"], "body": "c * 2"}}
    program = build_program("sum(fori(n, step, x)) + sum(fori(3, step, x)) + k", ["x"], ["n", "k"], functions)
    assert program.counts == ("n",)  # k is a constant but no count
    # the cached check answers the same, the first time and from its cache
    for _ in range(2):
        assert check_program("sum(fori(n, step, x))", ["x"], ["n"], functions) == ("n",)
    assert check_program("sum(fori(2, step, x))", ["x"], ["n"], functions) == ()

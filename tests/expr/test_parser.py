"""The parser: the grammar it accepts, the trees it builds, and precise errors for everything else."""

from __future__ import annotations

import pytest

from service.errors import LimitExceeded, ParseError
from service.expr import nodes as n
from service.expr.parser import parse_expression
from service.limits import Limits

LIMITS = Limits()


def parse(text: str) -> n.Node:
    return parse_expression(text, LIMITS)


def show(node: n.Node | n.Slice | n.Keyword | None) -> str:
    """A compact, fully parenthesised rendering to assert tree shapes against."""
    match node:
        case None:
            return ""
        case n.Num(value=v, is_int=is_int):
            return str(int(v)) if is_int else repr(v)
        case n.Name(id=name):
            return name
        case n.Str(value=v):
            return repr(v)
        case n.Bool(value=v):
            return str(v)
        case n.NoneLit():
            return "None"
        case n.EllipsisLit():
            return "..."
        case n.Seq(items=items):
            return "[" + ", ".join(show(i) for i in items) + "]"
        case n.Unary(op=op, operand=operand):
            return f"({op} {show(operand)})" if op == "not" else f"({op}{show(operand)})"
        case n.Power(base=b, exponent=e):
            return f"({show(b)} ** {show(e)})"
        case n.Chain(ops=ops, operands=operands) | n.Compare(ops=ops, operands=operands):
            parts = [show(operands[0])]
            for op, operand in zip(ops, operands[1:], strict=True):
                parts += [op, show(operand)]
            return "(" + " ".join(parts) + ")"
        case n.BoolOp(op=op, operands=operands):
            return "(" + f" {op} ".join(show(o) for o in operands) + ")"
        case n.IfExp(body=b, test=t, orelse=o):
            return f"({show(b)} if {show(t)} else {show(o)})"
        case n.Call(func=f, args=args, keywords=kws):
            return (
                f"{f}("
                + ", ".join([show(a) for a in args] + [f"{k.name}={show(k.value)}" for k in kws])
                + ")"
            )
        case n.Subscript(value=v, index=index):
            return f"{show(v)}[" + ", ".join(show(i) for i in index) + "]"
        case n.Slice(lower=lo, upper=hi, step=st):
            return f"{show(lo)}:{show(hi)}" + (f":{show(st)}" if st is not None else "")
    raise AssertionError(node)


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("1 + 2 * 3", "(1 + (2 * 3))"),
        ("a - b + c - d", "(a - b + c - d)"),
        ("-x ** 2", "(-(x ** 2))"),
        ("x ** -y", "(x ** (-y))"),
        ("2 ** 3 ** 2", "(2 ** (3 ** 2))"),
        ("a @ b * c", "(a @ b * c)"),
        ("a // b % c / d", "(a // b % c / d)"),
        ("a < b <= c", "(a < b <= c)"),
        ("not a < b and c or d", "(((not (a < b)) and c) or d)"),
        ("a if c else b if d else e", "(a if c else (b if d else e))"),
        ("x[1:]", "x[1:]"),
        ("x[:-1]", "x[:(-1)]"),
        ("x[::2, None, ..., 0]", "x[::2, None, ..., 0]"),
        ("x[1:][0]", "x[1:][0]"),
        ("sum(x, axis=(0, 1), keepdims=True)", "sum(x, axis=[0, 1], keepdims=True)"),
        ("reshape(x, (2,))", "reshape(x, [2])"),
        ("concatenate([a, b], axis=0)", "concatenate([a, b], axis=0)"),
        ('einsum("ij,j->i", A, v)', "einsum('ij,j->i', A, v)"),
        ("1.5e-3 + .5 + 2.", "(0.0015 + 0.5 + 2.0)"),
        ("(x)", "x"),
        ("sum(\n  x # comment\n)", "sum(x)"),
        (
            "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
            "sum(((100 * ((x[1:] - (x[:(-1)] ** 2)) ** 2)) + ((1 - x[:(-1)]) ** 2)))",
        ),
    ],
)
def test_grammar_builds_the_expected_tree(text: str, tree: str) -> None:
    assert show(parse(text)) == tree


def test_long_sums_are_flat_chains_not_deep_trees() -> None:
    text = " + ".join(["x"] * 5000)
    node = parse(text)
    assert isinstance(node, n.Chain) and len(node.operands) == 5000


def test_spans_point_at_the_source() -> None:
    node = parse("1 +\n  sin(x)")
    assert isinstance(node, n.Chain)
    call = node.operands[1]
    assert isinstance(call, n.Call)
    assert (call.span.line, call.span.column, call.span.end_column) == (2, 3, 9)


@pytest.mark.parametrize(
    ("text", "message", "line", "column"),
    [
        ("sum(x", "expected ')' to close '(' from line 1, column 4", 1, 6),
        ("x +* 2", "operand", 1, 4),
        ("x.sum()", "attribute access is not allowed", 1, 2),
        ("x.__class__", "attribute access is not allowed", 1, 2),
        ("lambda: 1", "keyword 'lambda'", 1, 1),
        ("import os", "keyword 'import'", 1, 1),
        ("[i for i in x]", "keyword 'for'", 1, 4),
        ("x = 1", "use '=='", 1, 3),
        ("x & y", "use 'and'", 1, 3),
        ("x; y", "single expression", 1, 2),
        ("{'a': 1}", "dictionaries", 1, 1),
        ("'abc\\'", "strings are one line", 1, 1),
        ("2 x", "is an operator or a comma missing", 1, 3),
        ("f(x)(y)", "only a function name can be called", 1, 5),
        ("(x)(y)", "only a function name can be called", 1, 4),
        ("", "empty", 1, 1),
        ("1 +", "ends too early", 1, 4),
        ("f(a=1, 2)", "positional argument cannot follow", 1, 8),
        ("f(a=1, a=2)", "given twice", 1, 8),
        ("()", "empty parentheses", 1, 1),
        ("x\n  + $", "unexpected character '$'", 2, 5),
    ],
)
def test_errors_say_what_and_where(text: str, message: str, line: int, column: int) -> None:
    with pytest.raises(ParseError) as info:
        parse(text)
    problem = info.value.to_dict()
    assert message in problem["detail"]
    assert (problem["line"], problem["column"]) == (line, column)
    assert problem["code"] == "parse_error"
    # The snippet shows the offending line with a caret under the offending column.
    code_line, caret_line = problem["snippet"].split("\n")
    assert caret_line.index("^") == column - 1
    assert text.splitlines()[line - 1 if text else 0 :][:1] == [code_line] or text == ""


@pytest.mark.parametrize(
    "text",
    [
        "(" * 10_000 + "x" + ")" * 10_000,
        "[" * 500 + "x" + "]" * 500,
        "-" * 10_000 + "x",
        "not " * 5_000 + "x",
        "x" + "**x" * 5_000,
        "x" + "[0]" * 5_000,
        "f(" * 3_000 + "x" + ")" * 3_000,
        "b if c else " * 3_000 + "d",
    ],
)
def test_deep_nesting_is_refused_before_any_stack_is_at_risk(text: str) -> None:
    with pytest.raises(LimitExceeded) as info:
        parse_expression(text, Limits(max_expression_chars=100_000))
    assert info.value.to_dict()["limit"] == "max_nesting_depth"


def test_nesting_up_to_the_limit_parses() -> None:
    depth = LIMITS.max_nesting_depth - 1
    assert show(parse("(" * depth + "x" + ")" * depth)) == "x"


def test_giant_literals_are_refused() -> None:
    with pytest.raises(LimitExceeded) as info:
        parse("9" * 1000)
    assert info.value.to_dict()["limit"] == "max_literal_digits"
    assert parse("1e999999").value == float("inf")  # type: ignore[union-attr]


def test_expression_length_is_limited() -> None:
    with pytest.raises(LimitExceeded) as info:
        parse("x+" * 10_001 + "x")
    assert info.value.to_dict()["limit"] == "max_expression_chars"


# -- the node budget: counted while parsing ----------------------------------------------------------

COUNTED = [
    "x",
    "-x + 2 * y ** 3",
    "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
    "x[:, None, ..., 0] if not a and b < c <= d else [1, 2, (3, 4)]",
    "einsum('ij,jk->ik', a, b) + sum(x, axis=(0, 1), keepdims=True)",
    "x[::2][1] @ y // 3 % 2",
]


@pytest.mark.parametrize("text", COUNTED)
def test_the_parser_counts_exactly_the_nodes_of_the_tree_it_builds(text: str) -> None:
    size = n.tree_size(parse(text))
    assert parse_expression(text, Limits(max_syntax_nodes=size))  # exactly at the budget: accepted
    with pytest.raises(LimitExceeded) as caught:
        parse_expression(text, Limits(max_syntax_nodes=size - 1))
    assert caught.value.extra["limit"] == "max_syntax_nodes"


def test_parsing_stops_at_the_node_that_crosses_the_budget_before_reading_the_rest() -> None:
    # The tail is not even valid text: had it been tokenized, this would be a ParseError at its '$'.
    text = " + ".join(["x"] * 1000) + " $ $ $"
    with pytest.raises(LimitExceeded) as caught:
        parse_expression(text, Limits(max_syntax_nodes=100))
    problem = caught.value.to_dict()
    # The chain's node, then one per 'x': node 101 is the 100th 'x' at column 397, far before the tail.
    assert (problem["line"], problem["column"]) == (1, 397), problem
    assert "parsing stopped" in problem["detail"]


def test_the_budget_argument_narrows_the_limit_and_says_why() -> None:
    with pytest.raises(LimitExceeded) as caught:
        parse_expression("a + b + c + d", Limits(max_syntax_nodes=50), "functions.f.gradient.a", budget=3)
    message = str(caught.value)
    assert "more than 3 syntax nodes" in message and "earlier gradients left" in message
    assert "at most 50" in message

"""The syntax tree of the expression language: small frozen nodes, each with its source span.

Chains of one precedence level (``a - b + c``, ``a and b and c``, ``a < b <= c``) are single n-ary
nodes, so the tree's depth is the text's nesting depth and never the length of a sum.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """1-based line and column of a node's first character, and the column just past its end."""

    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True, slots=True)
class Num:
    value: float
    is_int: bool
    span: Span


@dataclass(frozen=True, slots=True)
class Str:
    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True, slots=True)
class NoneLit:
    """``None``: a new axis in an index, or "no value" for an optional argument."""

    span: Span


@dataclass(frozen=True, slots=True)
class EllipsisLit:
    span: Span


@dataclass(frozen=True, slots=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True, slots=True)
class Seq:
    """``[a, b]`` or ``(a, b)``: a static shape/axis list, a list of tensors, or a tensor literal."""

    items: tuple[Node, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "-", "+", "not"
    operand: Node
    span: Span


@dataclass(frozen=True, slots=True)
class Chain:
    """A left-associative run of one precedence level: operands[0] ops[0] operands[1] ..."""

    ops: tuple[str, ...]  # "+", "-" | "*", "/", "//", "%", "@"
    operands: tuple[Node, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Power:
    base: Node
    exponent: Node
    span: Span


@dataclass(frozen=True, slots=True)
class Compare:
    """``a < b <= c`` means ``(a < b) and (b <= c)``, as in Python."""

    ops: tuple[str, ...]
    operands: tuple[Node, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: str  # "and", "or"
    operands: tuple[Node, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class IfExp:
    """``body if test else orelse``, elementwise (like where)."""

    body: Node
    test: Node
    orelse: Node
    span: Span


@dataclass(frozen=True, slots=True)
class Keyword:
    name: str
    value: Node
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Node, ...]
    keywords: tuple[Keyword, ...]
    span: Span
    func_span: Span


@dataclass(frozen=True, slots=True)
class Slice:
    lower: Node | None
    upper: Node | None
    step: Node | None
    span: Span


@dataclass(frozen=True, slots=True)
class Subscript:
    value: Node
    index: tuple[Node | Slice, ...]
    span: Span


Node = (
    Num
    | Str
    | Bool
    | NoneLit
    | EllipsisLit
    | Name
    | Seq
    | Unary
    | Chain
    | Power
    | Compare
    | BoolOp
    | IfExp
    | Call
    | Subscript
)


def children(node: Node | Slice | Keyword) -> tuple[Node | Slice | Keyword, ...]:
    """The direct sub-nodes of a node, in source order."""
    match node:
        case Seq(items=items):
            return items
        case Unary(operand=operand):
            return (operand,)
        case Chain(operands=ops) | Compare(operands=ops) | BoolOp(operands=ops):
            return ops
        case Power(base=base, exponent=exponent):
            return (base, exponent)
        case IfExp(body=body, test=test, orelse=orelse):
            return (body, test, orelse)
        case Call(args=args, keywords=keywords):
            return (*args, *keywords)
        case Keyword(value=value):
            return (value,)
        case Subscript(value=value, index=index):
            return (value, *index)
        case Slice(lower=lo, upper=hi, step=st):
            return tuple(n for n in (lo, hi, st) if n is not None)
        case _:
            return ()


def tree_size(node: Node | Slice | Keyword) -> int:
    """How many syntax nodes a tree has (the parser counts the same nodes as it builds them)."""
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        stack.extend(children(current))
    return count

"""Text -> syntax tree for the expression language: a hand-written, default-deny tokenizer and parser.

Only the grammar below is accepted; every other character, keyword or construct is a ParseError
with line, column and a caret. No user text ever reaches eval/exec/compile or Python's own parser,
and nesting is counted as it is parsed, so deep input is refused long before any stack is at risk.
Tokens are read on demand and every syntax node is counted as it is built: a text with more nodes
than its budget stops at the node that crosses it, before the rest is even tokenized.

    expr     := disj ['if' disj 'else' expr]
    disj     := conj ('or' conj)*            conj := neg ('and' neg)*
    neg      := 'not' neg | cmp              cmp  := arith (('=='|'!='|'<'|'<='|'>'|'>=') arith)*
    arith    := term (('+'|'-') term)*       term := unary (('*'|'/'|'//'|'%'|'@') unary)*
    unary    := ('-'|'+') unary | power      power := postfix ['**' unary]
    postfix  := atom ('[' index (',' index)* ']')*
    atom     := NUMBER | STRING | NAME ['(' args ')'] | True | False | None | '...'
              | '(' expr ')' | '(' [expr (',' expr)* [',']] ')' | '[' [expr (',' expr)* [',']] ']'
    index    := expr | [expr] ':' [expr] [':' [expr]]
"""

from __future__ import annotations

import bisect
import re
import sys
from dataclasses import dataclass

from service.errors import LimitExceeded, ParseError, SourceLocation
from service.expr.nodes import (
    Bool,
    BoolOp,
    Call,
    Chain,
    Compare,
    EllipsisLit,
    IfExp,
    Keyword,
    Name,
    Node,
    NoneLit,
    Num,
    Power,
    Seq,
    Slice,
    Span,
    Str,
    Subscript,
    Unary,
)
from service.limits import Limits

__all__ = ["parse_expression"]

# Each nesting level costs the parser at most ~8 Python frames (Python-to-Python calls use no C
# stack since 3.11); this head-room keeps a depth of 100 far from RecursionError in any caller.
_MIN_RECURSION_LIMIT = 4000
if sys.getrecursionlimit() < _MIN_RECURSION_LIMIT:
    sys.setrecursionlimit(_MIN_RECURSION_LIMIT)

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n\f]+|\#[^\n]*)
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<string>"[^"\\\n]*"|'[^'\\\n]*')
  | (?P<op>\*\*|//|==|!=|<=|>=|\.\.\.|[-+*/%@<>()\[\],:=.])
    """,
    re.VERBOSE,
)

_KEYWORDS = {"and", "or", "not", "if", "else", "True", "False", "None"}
# Python keywords that are not part of the language get a precise message instead of "unknown name".
_PY_KEYWORDS = {
    "as", "assert", "async", "await", "break", "class", "continue", "def", "del", "elif", "except",
    "finally", "for", "from", "global", "import", "in", "is", "lambda", "nonlocal", "pass", "raise",
    "return", "try", "while", "with", "yield",
}  # fmt: skip
_CHARACTER_HINTS = {
    "&": "use 'and'",
    "|": "use 'or'",
    "~": "use 'not'",
    "!": "use 'not' or '!='",
    "^": "use '**' for powers",
    "{": "dictionaries are not part of the language",
    ";": "an expression is a single expression",
}
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}
# Binary levels from loosest to tightest; each level's run becomes one n-ary node.
_LEVEL = {"or": 1, "and": 2, **dict.fromkeys(_COMPARE, 3), "+": 4, "-": 4}
_LEVEL.update(dict.fromkeys(("*", "/", "//", "%", "@"), 5))
_NOT_LEVEL = 3  # `not` binds looser than comparisons and tighter than `and`, as in Python


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "number" | "name" | "string" | "op" | "end"
    text: str
    start: int
    end: int


class _Parser:
    def __init__(self, text: str, source: str, limits: Limits, budget: int) -> None:
        self.text = text
        self.source = source
        self.limits = limits
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.tokens: list[_Token] = []
        self.scan_pos = 0  # where the tokenizer stopped
        self.scan_depth = 0  # bracket depth of the tokens read so far
        self.pos = 0
        self.depth = 0
        self.budget = budget
        self.nodes = 0

    # -- positions and errors ---------------------------------------------------------------------

    def _line_col(self, offset: int) -> tuple[int, int]:
        row = bisect.bisect_right(self.line_starts, offset) - 1
        return row + 1, offset - self.line_starts[row] + 1

    def _span(self, start: int, end: int) -> Span:
        line, column = self._line_col(start)
        end_line, end_column = self._line_col(max(start, end))
        return Span(line, column, end_line, end_column)

    def _where(self, start: int, end: int | None = None) -> SourceLocation:
        line, column = self._line_col(start)
        end_column = None
        if end is not None and end > start:
            end_line, end_col = self._line_col(end)
            end_column = end_col if end_line == line else None
        return SourceLocation(self.source, line, column, end_column)

    def error(self, message: str, token: _Token | None = None) -> ParseError:
        tok = token or self.peek()
        return ParseError(message, text=self.text, where=self._where(tok.start, tok.end))

    # -- tokens -----------------------------------------------------------------------------------

    def token(self, index: int) -> _Token:
        """The index-th token, reading the text only as far as that token."""
        while len(self.tokens) <= index:
            if self.tokens and self.tokens[-1].kind == "end":
                return self.tokens[-1]
            self.tokens.append(self._next_token())
        return self.tokens[index]

    def _next_token(self) -> _Token:
        text, pos = self.text, self.scan_pos
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                ch = text[pos]
                hint = _CHARACTER_HINTS.get(ch)
                if ch in "\"'":
                    hint = "strings are one line of plain characters, without backslashes"
                message = f"unexpected character {ch!r}" + (f": {hint}" if hint else "")
                raise ParseError(message, text=text, where=self._where(pos, pos + 1))
            pos = m.end()
            kind = m.lastgroup or "ws"
            if kind == "ws":
                continue
            self.scan_pos = pos
            tok = _Token(kind, m.group(), m.start(), m.end())
            if kind == "number" and len(tok.text) > self.limits.max_literal_digits:
                raise LimitExceeded(
                    f"numeric literal of {len(tok.text)} characters is longer than allowed",
                    limit="max_literal_digits",
                    allowed=self.limits.max_literal_digits,
                    text=text,
                    where=self._where(tok.start, tok.end),
                )
            # Bracket depth is checked as tokens are read, before the parser descends.
            if tok.text in ("(", "["):
                self.scan_depth += 1
                if self.scan_depth > self.limits.max_nesting_depth:
                    raise self._too_deep(tok)
            elif tok.text in (")", "]"):
                self.scan_depth = max(0, self.scan_depth - 1)
            return tok
        self.scan_pos = pos
        return _Token("end", "", len(text), len(text))

    def made(self, start: int, end: int) -> None:
        """Count one syntax node (built from text[start:end]); stop parsing when the budget is spent."""
        self.nodes += 1
        if self.nodes > self.budget:
            allowed = self.limits.max_syntax_nodes
            share = "" if self.budget >= allowed else ", what its function's body and earlier gradients left"
            raise LimitExceeded(
                f"{self.source} has more than {self.budget} syntax nodes{share}: parsing stopped at the "
                f"next one; at most {allowed} are allowed in an expression or a function (body and "
                "gradients), with user functions inlined",
                limit="max_syntax_nodes",
                allowed=self.limits.max_syntax_nodes,
                text=self.text,
                where=self._where(start, end),
            )

    def _too_deep(self, tok: _Token) -> LimitExceeded:
        return LimitExceeded(
            f"expression is nested deeper than {self.limits.max_nesting_depth} levels",
            limit="max_nesting_depth",
            allowed=self.limits.max_nesting_depth,
            text=self.text,
            where=self._where(tok.start, tok.end),
        )

    def peek(self) -> _Token:
        return self.token(self.pos)

    def advance(self) -> _Token:
        tok = self.token(self.pos)
        if tok.kind != "end":
            self.pos += 1
        return tok

    def at(self, *texts: str) -> bool:
        tok = self.token(self.pos)
        return tok.kind in ("op", "name") and tok.text in texts

    def expect(self, text: str, opener: _Token | None = None) -> _Token:
        if self.at(text):
            return self.advance()
        found = self.peek()
        if found.kind == "name" and found.text in _PY_KEYWORDS:
            raise self.error(f"the keyword {found.text!r} is not part of the expression language", found)
        what = "end of expression" if found.kind == "end" else repr(found.text)
        message = f"expected {text!r}, found {what}"
        if opener is not None:
            line, column = self._line_col(opener.start)
            message = (
                f"expected {text!r} to close {opener.text!r} from line {line}, column {column}, found {what}"
            )
        raise self.error(message, found)

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > self.limits.max_nesting_depth:
            raise self._too_deep(tok)

    def leave(self) -> None:
        self.depth -= 1

    # -- grammar ----------------------------------------------------------------------------------

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("the expression is empty")
        self.depth = -1  # the whole expression is level 0; each nested one adds a level
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            if tok.text == "=":
                raise self.error("'=' is not allowed here: use '==' to compare", tok)
            if tok.kind in ("name", "number") or tok.text in ("(", "["):
                raise self.error(f"unexpected {tok.text!r}: is an operator or a comma missing?", tok)
            raise self.error(f"unexpected {tok.text!r} after a complete expression", tok)
        return node

    def expr(self) -> Node:
        first = self.peek()
        self.enter(first)
        node = self.binary(1)
        if self.at("if"):
            self.made(self.advance().start, self.peek().end)
            test = self.binary(1)
            self.expect("else")
            orelse = self.expr()
            node = IfExp(node, test, orelse, self._join(node.span, orelse.span))
        self.leave()
        return node

    def binary(self, min_level: int) -> Node:
        if self.at("not") and min_level <= _NOT_LEVEL:
            tok = self.advance()
            self.made(tok.start, tok.end)
            self.enter(tok)
            operand = self.binary(_NOT_LEVEL)
            self.leave()
            left: Node = Unary("not", operand, self._from(tok, operand.span))
        else:
            left = self.unary()
        while True:
            tok = self.peek()
            level = _LEVEL.get(tok.text, 0) if tok.kind in ("op", "name") else 0
            if level < min_level or level == 0:
                return left
            self.made(tok.start, tok.end)
            ops: list[str] = []
            operands: list[Node] = [left]
            while tok.kind in ("op", "name") and _LEVEL.get(tok.text, 0) == level:
                ops.append(self.advance().text)
                operands.append(self.binary(level + 1))
                tok = self.peek()
            span = self._join(operands[0].span, operands[-1].span)
            if level <= 2:
                left = BoolOp(ops[0], tuple(operands), span)
            elif level == 3:
                left = Compare(tuple(ops), tuple(operands), span)
            else:
                left = Chain(tuple(ops), tuple(operands), span)

    def unary(self) -> Node:
        if self.at("-", "+"):
            tok = self.advance()
            self.made(tok.start, tok.end)
            self.enter(tok)
            operand = self.unary()
            self.leave()
            return Unary(tok.text, operand, self._from(tok, operand.span))
        if self.at("not"):
            raise self.error("'not' must be parenthesised here, e.g. 1 + (not c)")
        base = self.postfix()
        if self.at("**"):
            tok = self.advance()
            self.made(tok.start, tok.end)
            self.enter(tok)
            exponent = self.unary()
            self.leave()
            return Power(base, exponent, self._join(base.span, exponent.span))
        return base

    def postfix(self) -> Node:
        node = self.atom()
        entered = 0  # x[0][0]... nests the tree one level per further subscript
        try:
            while True:
                if self.at("["):
                    opener = self.advance()
                    self.made(opener.start, opener.end)
                    if isinstance(node, Subscript):
                        self.enter(opener)
                        entered += 1
                    items = [self.index_item()]
                    while self.at(","):
                        self.advance()
                        if self.at("]"):
                            break
                        items.append(self.index_item())
                    close = self.expect("]", opener)
                    node = Subscript(
                        node, tuple(items), self._join(node.span, self._span(close.start, close.end))
                    )
                else:
                    self._no_attribute_or_call()
                    return node
        finally:
            self.depth -= entered

    def _no_attribute_or_call(self) -> None:
        if self.at("."):
            dot = self.advance()
            attr = self.peek()
            name = attr.text if attr.kind == "name" else ""
            hint = f": write {name}(...) instead of x.{name}(...)" if name else ""
            raise self.error(f"attribute access is not allowed{hint}", dot)
        if self.at("("):
            raise self.error("only a function name can be called, e.g. sum(x)")

    def index_item(self) -> Node | Slice:
        start = self.peek()
        lower = None if self.at(":") else self.expr()
        if not self.at(":"):
            assert lower is not None
            return lower
        colon = self.advance()
        self.made(colon.start, colon.end)
        upper = None if self.at(":", ",", "]") else self.expr()
        step = None
        if self.at(":"):
            self.advance()
            step = None if self.at(",", "]") else self.expr()
        end = self.token(self.pos - 1)
        return Slice(lower, upper, step, self._span(start.start, end.end))

    def atom(self) -> Node:
        tok = self.peek()
        if tok.kind in ("number", "string", "name") or tok.text == "...":
            self.made(tok.start, tok.end)  # the literal, the name, or the call it starts
        if tok.kind == "number":
            self.advance()
            is_int = not any(c in tok.text for c in ".eE")
            return Num(float(tok.text), is_int, self._span(tok.start, tok.end))
        if tok.kind == "string":
            self.advance()
            return Str(tok.text[1:-1], self._span(tok.start, tok.end))
        if tok.kind == "name":
            return self.name_or_call()
        if tok.text == "...":
            self.advance()
            return EllipsisLit(self._span(tok.start, tok.end))
        if tok.text in ("(", "["):
            return self.group()
        if tok.kind == "end":
            raise self.error("the expression ends too early: an operand is missing")
        raise self.error(f"unexpected {tok.text!r}: an operand (number, name or '(') is expected here")

    def name_or_call(self) -> Node:
        tok = self.advance()
        span = self._span(tok.start, tok.end)
        if tok.text in ("True", "False"):
            return Bool(tok.text == "True", span)
        if tok.text == "None":
            return NoneLit(span)
        if tok.text in _KEYWORDS:
            raise self.error(f"unexpected keyword {tok.text!r}", tok)
        if tok.text in _PY_KEYWORDS:
            raise self.error(f"the keyword {tok.text!r} is not part of the expression language", tok)
        if not self.at("("):
            return Name(tok.text, span)
        self.advance()
        opener = self.token(self.pos - 1)
        args: list[Node] = []
        keywords: list[Keyword] = []
        while not self.at(")"):
            name_tok = self.peek()
            if name_tok.kind == "name" and self.token(self.pos + 1).text == "=":
                self.made(name_tok.start, name_tok.end)
                self.advance()
                self.advance()
                value = self.expr()
                if any(k.name == name_tok.text for k in keywords):
                    raise self.error(f"keyword argument {name_tok.text!r} given twice", name_tok)
                keywords.append(Keyword(name_tok.text, value, self._from(name_tok, value.span)))
            else:
                if keywords:
                    raise self.error("a positional argument cannot follow a keyword argument")
                args.append(self.expr())
            if not self.at(","):
                break
            self.advance()
        close = self.expect(")", opener)
        return Call(tok.text, tuple(args), tuple(keywords), self._span(tok.start, close.end), span)

    def group(self) -> Node:
        opener = self.advance()
        closer = ")" if opener.text == "(" else "]"
        items: list[Node] = []
        trailing_comma = False
        while not self.at(closer):
            items.append(self.expr())
            trailing_comma = False
            if not self.at(","):
                break
            self.advance()
            trailing_comma = True
        close = self.expect(closer, opener)
        span = self._span(opener.start, close.end)
        if opener.text == "(" and len(items) == 1 and not trailing_comma:
            return items[0]
        if opener.text == "(" and not items:
            raise self.error("empty parentheses '()' are not an expression", opener)
        self.made(opener.start, close.end)
        return Seq(tuple(items), span)

    # -- spans ------------------------------------------------------------------------------------

    @staticmethod
    def _join(a: Span, b: Span) -> Span:
        return Span(a.line, a.column, b.end_line, b.end_column)

    def _from(self, tok: _Token, end: Span) -> Span:
        line, column = self._line_col(tok.start)
        return Span(line, column, end.end_line, end.end_column)


def parse_expression(
    text: str, limits: Limits, source: str = "expression", budget: int | None = None
) -> Node:
    """Parse one expression into a syntax tree, or raise ParseError / LimitExceeded.

    ``source`` names the piece of the request the text came from (for error messages), e.g.
    ``"expression"`` or ``"functions.custom_relu.body"``. ``budget`` is how many syntax nodes the
    text may have (default ``limits.max_syntax_nodes``); parsing stops at the node that crosses it.
    """
    if len(text) > limits.max_expression_chars:
        raise LimitExceeded(
            f"{source} has {len(text)} characters; at most {limits.max_expression_chars} are allowed",
            limit="max_expression_chars",
            allowed=limits.max_expression_chars,
            source=source,
        )
    limit = limits.max_syntax_nodes if budget is None else max(0, budget)
    return _Parser(text, source, limits, limit).parse()

"""The expression language: text -> syntax tree (parser), checks (program), TF callable (compiler).

Only ``compiler`` imports TensorFlow, and only worker processes import ``compiler``.
"""

from service.expr.functions import BUILTINS, CONSTANTS, Builtin
from service.expr.parser import parse_expression
from service.expr.program import FunctionDef, Program, build_program

__all__ = ["BUILTINS", "CONSTANTS", "Builtin", "FunctionDef", "Program", "build_program", "parse_expression"]

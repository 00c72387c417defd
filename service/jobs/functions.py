"""User functions as jobs carry them: plain dicts, in definition order (part of a program's signature)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["UserFunctionSpec", "job_functions"]


class UserFunctionSpec(Protocol):
    """A wire schema's user function (the API's ``UserFunction``, UM-Bridge's ``FunctionSpec``)."""

    @property
    def params(self) -> Sequence[str]: ...

    @property
    def body(self) -> str: ...

    @property
    def gradient(self) -> Mapping[str, str] | None: ...


def job_functions(specs: Mapping[str, UserFunctionSpec], *, doc: bool = False) -> dict[str, dict[str, Any]]:
    """name -> {"params": [...], "body": str, "gradient": {param: str} | None} (and "doc" if asked)."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        out[name] = {"params": list(spec.params), "body": spec.body, "gradient": spec.gradient}
        if doc:
            out[name]["doc"] = getattr(spec, "doc", None)
    return out

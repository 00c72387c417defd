"""GradBench's gradient-descent solver (particle, saddle) as a fixed-count ``fori`` over a packed state.

The solver's rules: from x, with step size eta (first 1e-5) and a count of accepted steps, stop when
|grad f(x)| <= 1e-5; after 10 accepted steps double eta; else try x' = x - eta grad f(x): stop if
|x' - x| <= 1e-5, accept x' if f(x') < f(x), else halve eta. The service's loops have fixed trip
counts, so the solver runs ``steps`` iterations and a finished state stays as it is (every update
is a ``where`` on the state's "running" flag); the caller checks that flag to know the solver
finished within ``steps``. The state of an n-dimensional problem is one vector:
[x (n), f(x), grad f(x) (n), eta, accepted, running].
"""

from __future__ import annotations

from typing import Any


def argmin(name: str, objective: str, n: int, steps: int, args: list[str]) -> tuple[dict[str, Any], str]:
    """Functions named ``name_*`` minimizing the user function ``objective(x, *args)`` of an n-vector,
    and a template of the call -> final state (format ``start`` and ``args``, e.g. ", p1")."""
    extra = "".join(f", {a}" for a in args)
    params = ["st", *args]
    x, fx, gx = f"st[0:{n}]", f"st[{n}]", f"st[{n + 1}:{2 * n + 1}]"
    eta, accepted, running = f"st[{2 * n + 1}]", f"st[{2 * n + 2}]", f"st[{2 * n + 3}]"
    live = f"({running} > 0.5 and norm({gx}) > 1e-5)"
    doubling = f"({live} and {accepted} == 10)"
    trying = f"({live} and {accepted} != 10 and {eta} * norm({gx}) > 1e-5)"
    functions: dict[str, Any] = {
        f"{name}_update": {
            "params": ["st", "xp", "fp", "gp"],
            # accept, or change eta, or stop; a stopped state stays as it is
            "body": f"concatenate(["
            f"where({trying} and fp < {fx}, xp, {x}),"
            f" reshape(where({trying} and fp < {fx}, fp, {fx}), (1,)),"
            f" where({trying} and fp < {fx}, gp, {gx}),"
            f" reshape(where({doubling}, 2 * {eta}, where({trying} and fp >= {fx}, {eta} / 2, {eta})), (1,)),"
            f" reshape(where({trying} and fp < {fx}, {accepted} + 1,"
            f" where({doubling} or ({trying} and fp >= {fx}), 0.0, {accepted})), (1,)),"
            f" reshape(where({live} and ({doubling} or {trying}), {running}, 0.0), (1,))])",
        },
        f"{name}_try": {
            "params": ["st", "xp", *args],
            "body": f"{name}_update(st, xp, {objective}(xp{extra}), grad({objective}, xp{extra}))",
        },
        f"{name}_step": {
            "params": ["i", *params],
            "body": f"{name}_try(st, {x} - {eta} * {gx}{extra})",
        },
        f"{name}_start": {
            "params": ["x0", *args],
            "body": f"concatenate([x0, reshape({objective}(x0{extra}), (1,)), grad({objective}, x0{extra}),"
            f" [1e-5, 0.0, 1.0]])",
        },
    }
    return functions, f"fori({steps}, {name}_step, {name}_start({{start}}{{args}}){{args}})"

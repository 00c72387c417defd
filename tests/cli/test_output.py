"""The renderer alone, no server: the SDK's result objects as --json (tensors in the API's JSON form,
so a result read from the wire is printed back nearly as it came) and as plain tables without rich."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from service.cli.output import Output
from service.client import Derivatives, Readiness

WIRE: dict[str, Any] = {
    "value": 14.0,
    "gradient": {"x": [2.0, "Infinity"]},  # non-finite numbers travel as strings
    "hessian": {"x": {"x": [[2.0, 0.0], [0.0, 2.0]]}},
    "derivative": {"derivatives": [[2.0, 4.0], [2.0, 2.0]]},  # with order 2: d1, d2
    "dtype": "float64",
    "meta": {"cache": "hit", "compute_ms": 0.5, "total_ms": 1.25, "executor": "numpy"},
}


def plain_output(*, json_mode: bool) -> Output:
    out = Output(json_mode=json_mode)
    out.console = out.err_console = None  # as without the `cli` extra
    return out


def test_derivatives_as_json_are_the_wire_body(capsys: pytest.CaptureFixture[str]) -> None:
    plain_output(json_mode=True).derivatives(Derivatives.from_json(WIRE), "sum(x**2)", "x")
    expected = copy.deepcopy(WIRE)
    # The k-th derivatives are listed at the top; meta says how the server computed, not the round trip.
    expected["derivatives"] = expected.pop("derivative")["derivatives"]
    del expected["meta"]["total_ms"]
    printed = capsys.readouterr().out
    assert json.loads(printed) == expected
    assert list(json.loads(printed)) == ["value", "gradient", "hessian", "derivatives", "dtype", "meta"]


def test_derivatives_as_a_plain_table(capsys: pytest.CaptureFixture[str]) -> None:
    plain_output(json_mode=False).derivatives(Derivatives.from_json(WIRE), "sum(x**2)", "x")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sum(x**2)  (float64, cache hit, numpy, 0.5 ms)"
    assert lines[1].split() == ["what", "variable", "result"]
    assert lines[3].split()[:2] == ["gradient", "x"] and lines[3].endswith("inf]")
    assert lines[4].startswith("hessian") and "x, x" in lines[4]
    assert lines[-1].split()[:3] == ["derivative", "2", "x"]


def test_health_as_json_and_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    readiness = Readiness.from_json({"status": "starting", "pool": {"ready": False, "queue_depth": 0}})
    plain_output(json_mode=True).health("http://h.test", {"status": "ok"}, readiness)
    assert json.loads(capsys.readouterr().out) == {
        "liveness": {"status": "ok"},
        "readiness": {"status": "starting", "pool": {"ready": False, "queue_depth": 0}},
    }
    plain_output(json_mode=False).health("http://h.test", {"status": "ok"}, readiness)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [["url", "http://h.test"], ["alive", "ok"], ["ready", "starting"],
                    ["pool.ready", "False"], ["pool.queue_depth", "0"]]  # fmt: skip

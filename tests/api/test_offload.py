"""Where request work runs: each decision is made from what the work is, before it runs.

A spy records whether each piece of work ran on the event loop (a running loop in its thread) or in
a worker thread; the work itself is the real code. The pool is the API tests' fake: these tests are
about the API process alone.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app, endpoints, fastpath
from service.api.offload import (
    ON_LOOP_BODY_BYTES,
    ON_LOOP_ELEMENTS,
    ON_LOOP_PROGRAM_CHARS,
    RequestWork,
    claimed_elements,
)
from service.api.routes import umbridge as umbridge_route
from service.expr import program
from service.expr.program import check_program, unchecked_chars
from service.limits import Limits
from tests.api.fakes import FakePool


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Spy:
    """Wraps a function; records, per call, whether it ran on the event loop."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.on_loop: list[bool] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.on_loop.append(_on_loop())
        return self.function(*args, **kwargs)


@pytest.fixture
def build_spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    """The gradient endpoint's job builder, watched (the app is built from the patched table)."""
    spy = Spy(endpoints.GRADIENT.build)  # type: ignore[arg-type]
    spied = dataclasses.replace(endpoints.GRADIENT, build=spy)
    table = tuple(spied if e is endpoints.GRADIENT else e for e in endpoints.ENDPOINTS)
    monkeypatch.setattr(endpoints, "ENDPOINTS", table)
    return spy


@pytest.fixture
def client() -> Iterator[TestClient]:
    program._CHECKED_PROGRAMS.clear()  # each test decides about programs it has not sent before
    with TestClient(create_app(Settings(), pool=FakePool()), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def spied_client(build_spy: Spy) -> Iterator[TestClient]:
    program._CHECKED_PROGRAMS.clear()
    with TestClient(create_app(Settings(), pool=FakePool()), raise_server_exceptions=False) as test_client:
        yield test_client


def _long_program(chars: int, salt: str) -> str:
    terms, text = [], ""
    while len(text) < chars:
        terms.append(f"sin(x * {len(terms)}.5)")
        text = " + ".join(terms)
    return f"sum({text}) + {salt}"


def test_the_thresholds_are_about_a_millisecond_of_work_each() -> None:
    assert not RequestWork().costly
    assert not RequestWork(ON_LOOP_BODY_BYTES, ON_LOOP_ELEMENTS, ON_LOOP_PROGRAM_CHARS).costly
    assert RequestWork(body_bytes=ON_LOOP_BODY_BYTES + 1).costly
    assert RequestWork(elements=ON_LOOP_ELEMENTS + 1).costly
    assert RequestWork(program_chars=ON_LOOP_PROGRAM_CHARS + 1).costly


def test_claimed_elements_come_from_shapes_and_a_zero_axis_never_cancels_the_others() -> None:
    assert claimed_elements([[[1.0, 2.0], [3.0, 4.0]], 5.0, []]) == 4 + 1 + 1
    assert claimed_elements([{"dtype": "float64", "shape": [3, 4], "b64": ""}]) == 12
    huge = {"dtype": "float64", "shape": [0, 2**40], "b64": ""}
    assert claimed_elements([huge]) == 2**40  # sent to a thread, where decoding refuses it
    assert claimed_elements([{"shape": "nonsense"}, {"shape": [True, 2]}]) == 0  # refused when decoded


def test_a_program_costs_its_text_until_it_has_been_checked_once() -> None:
    program._CHECKED_PROGRAMS.clear()
    text = _long_program(1_000, "1")
    assert unchecked_chars(text, ["x"], [], None, Limits()) == len(text)
    check_program(text, ["x"], [], None, Limits())
    assert unchecked_chars(text, ["x"], [], None, Limits()) == 0
    functions = {"f": {"params": ["a"], "body": "a * 2", "gradient": {"a": "dy * 2"}}}
    assert unchecked_chars("f(x)", ["x"], [], functions, Limits()) == len("f(x)a * 2dy * 2")


def test_a_long_new_program_is_checked_in_a_thread_and_its_repeat_on_the_loop(
    spied_client: TestClient, build_spy: Spy
) -> None:
    client, spy = spied_client, build_spy
    short = {"expression": "sum(x ** 2)", "variables": {"x": [1.0, 2.0]}}
    long = {"expression": _long_program(2_000, "2"), "variables": {"x": [1.0, 2.0]}}
    for body in (short, long, long):
        response = client.post("/v1/gradient", json=body)
        assert response.status_code == 200, response.text
    assert spy.on_loop == [True, False, True]


def test_many_elements_are_decoded_in_a_thread_whatever_the_body_s_bytes(
    spied_client: TestClient, build_spy: Spy
) -> None:
    client, spy = spied_client, build_spy
    n = ON_LOOP_ELEMENTS + 1
    packed = base64.b64encode(np.zeros(n).tobytes()).decode()  # ~350 KB: under the body threshold
    as_base64 = {"dtype": "float64", "shape": [n], "b64": packed}
    response = client.post("/v1/gradient", json={"expression": "sum(x)", "variables": {"x": as_base64}})
    assert response.status_code == 200, response.text
    assert spy.on_loop == [False]


def test_a_large_body_is_parsed_and_validated_in_a_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(fastpath._validate)
    monkeypatch.setattr(fastpath, "_validate", spy)
    small = {"expression": "sum(x)", "variables": {"x": [0.5] * 10}}
    large = {"expression": "sum(x)", "variables": {"x": [0.5] * 200_000}}  # ~800 KB of JSON
    for body in (small, large):
        assert client.post("/v1/gradient", json=body).status_code == 200
    assert spy.on_loop == [True, False]


def test_an_umbridge_config_is_checked_in_a_thread_once_then_found_in_its_cache(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(umbridge_route._configure)
    monkeypatch.setattr(umbridge_route, "_configure", spy)
    expression = _long_program(2_000, "3")
    config = {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": expression, "size": 1}]}
    small = {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "sum(x)", "size": 1}]}
    for cfg in (small, config, config):
        response = client.post("/umbridge/InputSizes", json={"name": "expression", "config": cfg})
        assert response.status_code == 200, response.text
        assert response.json() == {"inputSizes": [2]}
    assert spy.on_loop == [True, False, True]


def test_costly_work_runs_in_a_thread_nicer_than_the_event_loop() -> None:
    import os
    import threading

    from service.api.offload import WORK_THREAD_NICE, off_loop_if

    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def both() -> tuple[int, int]:
        return await off_loop_if(False, nice_here), await off_loop_if(True, nice_here)

    on_loop, in_thread = asyncio.run(both())
    assert in_thread == on_loop + WORK_THREAD_NICE or in_thread == 19  # the kernel caps nice at 19


def test_the_server_process_shares_the_interpreter_finely_and_freezes_its_start_up_objects() -> None:
    import subprocess
    import sys

    script = (
        "import gc, sys\n"
        "from service.api.offload import LOOP_SWITCH_INTERVAL_S, keep_the_loop_responsive\n"
        "keep_the_loop_responsive()\n"
        "assert sys.getswitchinterval() == LOOP_SWITCH_INTERVAL_S, sys.getswitchinterval()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

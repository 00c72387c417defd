"""TAPESERVE_REALTIME_PRIORITY on a real server: the event loop and the warm worker's main thread in
SCHED_RR (the worker one below), every other thread ordinary; without the privilege, it serves as is."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server

SCHED_OTHER, SCHED_RR = 0, 2


def _policy(pid: int, tid: int) -> tuple[int, int]:
    """(scheduling policy, real-time priority) of one thread, from /proc (fields 41 and 40)."""
    with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[38]), int(fields[37])


def _threads(pid: int) -> list[int]:
    return [int(task) for task in os.listdir(f"/proc/{pid}/task")]


def _may_take_realtime() -> bool:
    """Whether this machine lets us use SCHED_RR (tried in a throwaway thread)."""
    allowed: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return allowed[0]


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling policies")
def test_the_loop_and_the_warm_workers_main_thread_run_round_robin_and_nothing_else_does(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, {"TAPESERVE_REALTIME_PRIORITY": "5"})
    try:
        server.wait_ready()
        answer = httpx.post(
            f"{server.url}/v1/gradient",
            json={"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}, "dtype": "float64"},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["gradient"]["x"] == [2.0, 4.0]
        api = server.process.pid
        worker = httpx.get(f"{server.url}/readyz", timeout=10).json()["pool"]["workers"][0]["pid"]
        others = [_policy(pid, tid) for pid in (api, worker) for tid in _threads(pid) if tid != pid]
        assert others and all(policy == SCHED_OTHER for policy, _ in others), others
        if _may_take_realtime():
            assert _policy(api, api) == (SCHED_RR, 5)
            assert _policy(worker, worker) == (SCHED_RR, 4)
        else:  # no CAP_SYS_NICE here: start-up says why, and the service runs as it is
            assert _policy(api, api)[0] == SCHED_OTHER and _policy(worker, worker)[0] == SCHED_OTHER
            assert "CAP_SYS_NICE" in server.log()
    finally:
        stop_server(server)

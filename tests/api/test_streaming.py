"""Streamed steps (NDJSON): one deadline for the whole stream, one chunk's tensors held at a time,
and a client that goes away stops the work. The in-process app around a fake, TensorFlow-free pool."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app
from service.errors import Timeout
from service.jobs import StepRecord, TrainStepJob, TrainStepResult

PARAMS = 10_000  # one array of the model's "weights" in the fake results


class StepPool:
    """Answers train-step chunks after ``delay_s`` (honouring the pool's deadline as the real pool
    does), with fresh arrays each time, and records which earlier results are still alive."""

    def __init__(self) -> None:
        self.reset(delay_s=0.0)

    def reset(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.cancelled = 0
        self.timeouts: list[float | None] = []
        self.refs: list[weakref.ref[np.ndarray]] = []
        self.alive_at_call: list[list[int]] = []  # per call: indices of earlier results still alive

    @property
    def ready(self) -> bool:
        return True

    @property
    def idle_workers(self) -> int:
        return 1

    async def start(self) -> None:
        return None

    async def close(self, grace_s: float | None = None) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"workers": [], "queue_depth": 0, "in_flight": 0}

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any:
        assert isinstance(job, TrainStepJob)
        self.calls += 1
        self.timeouts.append(timeout_s)
        gc.collect()
        self.alive_at_call.append([i for i, ref in enumerate(self.refs) if ref() is not None])
        try:
            if timeout_s is not None and self.delay_s > timeout_s:
                await asyncio.sleep(timeout_s)
                raise Timeout(f"the computation did not finish within {timeout_s:g} s", timeout_s=timeout_s)
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        weights = [np.full(PARAMS, float(self.calls), dtype=np.float32)]
        state = [np.zeros(PARAMS, dtype=np.float32)]
        self.refs.append(weakref.ref(weights[0]))
        record = StepRecord(1.0 / self.calls, 1.0 / self.calls, 0.0, 1.0, 1.0)
        return TrainStepResult(
            history=[record] * job.steps, weights=weights, optimizer_state=state, cache="hit", compute_ms=1.5
        )


@pytest.fixture(scope="module")
def pool() -> StepPool:
    return StepPool()


@pytest.fixture(scope="module")
def client(pool: StepPool) -> Iterator[TestClient]:
    app = create_app(Settings(request_timeout_s=10.0), pool=pool)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def train(steps: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"input_shape": [3], "seed": 1, "layers": [{"type": "dense", "units": 2}]},
        "x": [[0.1, -0.2, 0.3], [1.0, 0.5, -0.5]],
        "y": [[0.0, 1.0], [1.0, 0.0]],
        "optimizer": {"type": "adam", "learning_rate": 0.05},
        "steps": steps,
        "stream": True,
        "progress_every": 1,
        **extra,
    }


def stream_lines(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", "/v1/model/train-step", json=body) as r:
        assert r.status_code == 200, r.read()
        return [orjson.loads(line) for line in r.iter_lines() if line]


def test_the_deadline_covers_the_whole_stream_not_each_chunk(client: TestClient, pool: StepPool) -> None:
    pool.reset(delay_s=0.3)  # each chunk alone is well within the 1 s deadline
    lines = stream_lines(client, train(50, timeout_s=1.0))
    assert [line["type"] for line in lines[:-1]] == ["progress"] * (len(lines) - 1)
    # Chunks of 0.3 s in 1 s: at most three complete (fewer on a loaded machine, whose scheduler adds
    # to each chunk), and the stream stops there instead of running all 50 (15 s).
    assert len(lines) - 1 <= 3
    problem = lines[-1]["problem"]
    assert lines[-1]["type"] == "error" and problem["code"] == "timeout" and problem["status"] == 504
    assert problem["timeout_s"] == 1.0 and "1 s" in problem["detail"]
    assert pool.calls <= 4
    # Each chunk was given only the time left, never the whole deadline again.
    given = [t for t in pool.timeouts if t is not None]
    assert given[0] <= 1.0 and all(b < a for a, b in zip(given, given[1:], strict=False))
    assert sum(min(t, pool.delay_s) for t in given) <= 1.05


def test_a_stream_within_its_deadline_is_unchanged(client: TestClient, pool: StepPool) -> None:
    pool.reset(delay_s=0.0)
    lines = stream_lines(client, train(5, timeout_s=5.0, progress_every=2))
    assert [line["type"] for line in lines] == ["progress"] * 3 + ["result"]
    assert [line["step"] for line in lines[:-1]] == [2, 4, 5]
    result = lines[-1]
    assert result["steps"] == 5 and len(result["history"]) == 5
    assert [h["loss"] for h in result["history"]] == [1.0, 1.0, 0.5, 0.5, 1.0 / 3]
    assert result["weights"][0][:2] == [3.0, 3.0]  # the last chunk's arrays
    assert result["meta"]["cache"] == "hit" and result["meta"]["compute_ms"] == pytest.approx(4.5)  # summed


def test_the_api_holds_one_chunks_arrays_at_a_time(client: TestClient, pool: StepPool) -> None:
    pool.reset(delay_s=0.0)
    lines = stream_lines(client, train(12))
    assert [line["type"] for line in lines] == ["progress"] * 12 + ["result"]
    assert pool.calls == 12
    # While chunk k runs, only chunk k-1's result (its input) may still be alive in the API process.
    for call, alive in enumerate(pool.alive_at_call):
        assert set(alive) <= {call - 1}, (call, alive)
    gc.collect()
    assert all(ref() is None for ref in pool.refs)


def test_a_client_that_disconnects_stops_the_work(client: TestClient, pool: StepPool) -> None:
    pool.reset(delay_s=0.1)
    app = client.app
    body = orjson.dumps(train(50, timeout_s=9.0))
    sent: list[dict[str, Any]] = []

    async def drive() -> None:
        gone = anyio.Event()
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                gone.set()  # the client leaves after the first progress line

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},  # Starlette would not listen here by itself
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/model/train-step",
            "raw_path": b"/v1/model/train-step",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("testclient", 50000),
            "server": ("testserver", 80),
            "state": dict(client.app_state),
        }
        with anyio.fail_after(5):
            await app(scope, receive, send)  # type: ignore[arg-type]
        await anyio.sleep(0.5)  # time for several more chunks, had the stream gone on

    assert client.portal is not None
    client.portal.call(drive)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert pool.calls == 2 and pool.cancelled == 1  # the chunk in flight was cancelled; no other began

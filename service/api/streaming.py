"""Steps streamed as NDJSON: chunks of a step job, each fed the previous state, under one deadline."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.deps import GradientPool
from service.api.model_job import NDJSON_MEDIA_TYPE, StepJob, StepResult, chunk_sizes, stream_steps
from service.errors import TapeserveError, Timeout

__all__ = ["STREAM_RESPONSE", "expect_result", "stream_step_job"]

STREAM_RESPONSE: dict[str, Any] = {
    NDJSON_MEDIA_TYPE: {
        "schema": {
            "type": "string",
            "description": (
                'With "stream": true and steps > 1: one JSON object per line: {"type": "progress", "step", '
                '"steps", "loss", ...} after each chunk, then {"type": "result", ...the JSON response} or '
                '{"type": "error", "problem": {...}}.'
            ),
        }
    }
}


def expect_result(result: Any, kind: type) -> Any:
    """The worker's result, if it is of the kind the job promises (else it is our bug: a 500)."""
    if not isinstance(result, kind):
        raise TapeserveError(f"the worker returned {type(result).__name__}, not a {kind.__name__}")
    return result


async def stream_step_job(
    job: StepJob,
    *,
    every: int,
    pool: GradientPool,
    timeout_s: float,
    result_type: type,
    render: Any,
) -> StreamingResponse:
    """Chunks of ``every`` steps as NDJSON lines; ``render(results, total_ms)`` makes the result line.

    ``timeout_s`` is the deadline of the whole stream: each chunk's pool job gets only the time
    left, and a stream whose time is used up ends with a timeout error line. The first chunk runs
    before the response starts, so its errors still get a proper status code.
    """
    started = time.perf_counter()
    deadline = started + timeout_s

    async def run(chunk: StepJob) -> StepResult:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise Timeout(f"the steps did not finish within {timeout_s:g} s", timeout_s=timeout_s)
        try:
            result = await pool.run(chunk, timeout_s=left, affinity=chunk.signature())
        except Timeout as error:
            # The pool named this chunk's share of the time; the deadline is the stream's.
            error.detail = f"the steps did not finish within {timeout_s:g} s: {error.detail}"
            error.extra["timeout_s"] = timeout_s
            raise
        checked: StepResult = expect_result(result, result_type)
        return checked

    sizes = chunk_sizes(job.steps, every)
    first_job = job if sizes[0] == job.steps else dataclasses.replace(job, steps=sizes[0])
    first = await run(first_job)

    def render_all(results: list[StepResult]) -> dict[str, Any]:
        out: dict[str, Any] = render(results, (time.perf_counter() - started) * 1000.0)
        return out

    return _StepStream(stream_steps(first, first_job, sizes, run, render_all), media_type=NDJSON_MEDIA_TYPE)


class _StepStream(StreamingResponse):
    """A StreamingResponse that always watches for the client's disconnect while it streams.

    Starlette listens for ``http.disconnect`` (and cancels the stream, so the pending chunk's
    ``pool.run`` and every later chunk) only for ASGI spec versions below 2.4; from 2.4 on it would
    notice only when the next line fails to send, after computing one more chunk. Steps are too
    costly for that, so the stream is always cancelled as soon as the client goes away.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        await super().__call__(scope, receive, send)

"""Prometheus metrics: HTTP requests and latency, jobs and compile times, and the pool's state at scrape time.

Each app has its own ``CollectorRegistry`` (several apps in one test process never collide). Three
sources feed it:

* the request middleware (``service.api.logging``) reports every response: requests and latency by
  method, route template and status;
* ``MeteredPool`` wraps the worker pool and reads every result's ``cache`` and ``compute_ms``: jobs
  by kind and cache outcome, compute time, compile time (the compute time of a cache miss, which is
  dominated by tracing), and failed jobs by error code;
* a collector asks the pool and the batcher at scrape time: queue depth, in-flight jobs, each
  worker's state, RSS, jobs and restarts by cause, and the dynamic batching counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.responses import Response

from service.api.deps import GradientPool, TapeserveRoute
from service.errors import TapeserveError

__all__ = ["MeteredPool", "Metrics", "router"]

# Request latency buckets, seconds: a warm gradient answers in about a millisecond, a cold trace or a
# large Hessian in seconds, the default deadline is 30 s.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Compile (trace) times range from ~20 ms for a small expression to tens of seconds for a large model.
_COMPILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _job_kind(job: Any) -> str:
    """A short label for a job's class: GradientJob -> gradient, StackedGradientJob -> stacked_gradient."""
    cls = type(job)
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = _kind_of(cls.__name__)
    return kind


_KINDS: dict[type, str] = {}


def _kind_of(class_name: str) -> str:
    name = class_name.removesuffix("Job")
    out = []
    for i, char in enumerate(name):
        if char.isupper() and i:
            out.append("_")
        out.append(char.lower())
    return "".join(out) or "job"


class Metrics:
    """The registry of one app and the instruments the middleware and MeteredPool update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tapeserve_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "tapeserve_http_request_duration_seconds",
            "Time from receiving a request to the end of its response, by method, route template and status.",
            ("method", "route", "status"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "tapeserve_jobs",
            "Jobs the workers completed, by kind and compiled-program cache outcome (hit or miss).",
            ("kind", "cache"),
            registry=self.registry,
        )
        self.plan_jobs = Counter(
            "tapeserve_numpy_plan_jobs",
            "Jobs answered by their program's checked numpy plan instead of TensorFlow's runtime, by kind.",
            ("kind",),
            registry=self.registry,
        )
        self.job_errors = Counter(
            "tapeserve_job_errors",
            "Jobs that ended in an error, by kind and problem code.",
            ("kind", "code"),
            registry=self.registry,
        )
        self.compute = Histogram(
            "tapeserve_compute_seconds",
            "Time a worker spent on a job, by kind and cache outcome.",
            ("kind", "cache"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compile = Histogram(
            "tapeserve_compile_seconds",
            "Compute time of jobs whose program was not cached (tracing dominates it), by kind.",
            ("kind",),
            buckets=_COMPILE_BUCKETS,
            registry=self.registry,
        )
        self.rate_limit_store_errors = Counter(
            "tapeserve_rate_limit_store_errors",
            "Rate-limit decisions this process took with its own buckets because the shared store "
            "(TAPESERVE_RATE_LIMIT_STORE) did not answer.",
            registry=self.registry,
        )
        self.refusals_delayed = Histogram(
            "tapeserve_refusals_delayed_seconds",
            "How long the refusal brake held 4xx answers of clients over their refusal allowance.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self._label_cache: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._job_children: dict[tuple[type, str], tuple[Any, Any, Any, Any]] = {}

    def observe_response(self, method: str, route: str, status: int, duration_s: float) -> None:
        """Count one response (the request middleware's observer)."""
        key = (method, route, status)
        children = self._label_cache.get(key)
        if children is None:
            # labels() takes a lock and builds a key tuple; cache the children (route templates are few).
            code = str(status)
            children = (self.requests.labels(method, route, code), self.latency.labels(method, route, code))
            self._label_cache[key] = children
        children[0].inc()
        children[1].observe(duration_s)

    def observe_result(self, job: Any, result: Any) -> None:
        results = result if isinstance(result, list) else [result]
        for item in results:
            cache = getattr(item, "cache", None)
            if cache not in ("hit", "miss"):
                continue
            seconds = float(getattr(item, "compute_ms", 0.0)) / 1000.0
            key = (type(job), cache)
            children = self._job_children.get(key)
            if children is None:  # labels() per job costs a lock and a tuple; job kinds are few
                kind = _job_kind(job)
                compile_child = self.compile.labels(kind) if cache == "miss" else None
                children = (
                    self.jobs.labels(kind, cache),
                    self.compute.labels(kind, cache),
                    compile_child,
                    self.plan_jobs.labels(kind),
                )
                self._job_children[key] = children
            children[0].inc()
            children[1].observe(seconds)
            if children[2] is not None:
                children[2].observe(seconds)
            if getattr(item, "executor", None) == "numpy":
                children[3].inc()

    def observe_error(self, job: Any, error: TapeserveError) -> None:
        self.job_errors.labels(_job_kind(job), error.code).inc()

    def watch(self, pool: GradientPool, batcher: Any) -> None:
        """Report the pool's and the batcher's state at every scrape."""
        self.registry.register(_PoolCollector(pool, batcher))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    def __init__(self, pool: GradientPool, batcher: Any) -> None:
        self.pool = pool
        self.batcher = batcher

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time: the pool may not have started at registration

    def collect(self) -> Iterator[Metric]:
        status = self.pool.status()
        yield GaugeMetricFamily(
            "tapeserve_queue_depth", "Jobs waiting for a worker.", value=status.get("queue_depth", 0)
        )
        yield GaugeMetricFamily(
            "tapeserve_in_flight", "Jobs running on workers.", value=status.get("in_flight", 0)
        )
        yield GaugeMetricFamily(
            "tapeserve_ready", "1 when at least one worker is warm.", value=1 if status.get("ready") else 0
        )
        busy = GaugeMetricFamily(
            "tapeserve_worker_in_flight", "Jobs running on each worker (0 or 1).", labels=("worker",)
        )
        state = GaugeMetricFamily(
            "tapeserve_worker_state",
            "Each worker's state (1 for its current one).",
            labels=["worker", "state"],
        )
        rss = GaugeMetricFamily(
            "tapeserve_worker_rss_bytes", "Resident memory of each worker process.", labels=("worker",)
        )
        jobs = CounterMetricFamily(
            "tapeserve_worker_jobs", "Jobs each worker slot has run.", labels=("worker",)
        )
        restarts = CounterMetricFamily(
            "tapeserve_worker_restarts",
            "Worker processes replaced, by slot and cause (crash, timeout, memory, recycle).",
            labels=("worker", "cause"),
        )
        for worker in status.get("workers", []):
            wid = str(worker.get("id"))
            busy.add_metric([wid], 1 if worker.get("state") == "busy" else 0)
            state.add_metric([wid, str(worker.get("state"))], 1)
            if worker.get("rss_mb") is not None:
                rss.add_metric([wid], float(worker["rss_mb"]) * 1024 * 1024)
            jobs.add_metric([wid], worker.get("jobs", 0))
            for cause, count in (worker.get("restarts_by_cause") or {}).items():
                restarts.add_metric([wid, cause], count)
        yield from (busy, state, rss, jobs, restarts)
        if self.batcher is not None:
            yield CounterMetricFamily(
                "tapeserve_batching_stacked_calls",
                "Vectorized calls that answered several requests at once.",
                value=self.batcher.stacked_calls,
            )
            yield CounterMetricFamily(
                "tapeserve_batching_stacked_requests",
                "Requests answered by stacked calls.",
                value=self.batcher.stacked_requests,
            )


class MeteredPool:
    """The worker pool, counting every job's cache outcome, compute time and error code on the way."""

    def __init__(self, pool: GradientPool, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics

    @property
    def ready(self) -> bool:
        return self._pool.ready

    @property
    def idle_workers(self) -> int:
        return self._pool.idle_workers

    async def start(self) -> None:
        await self._pool.start()

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any:
        try:
            result = await self._pool.run(job, timeout_s=timeout_s, affinity=affinity)
        except TapeserveError as error:
            self._metrics.observe_error(job, error)
            raise
        self._metrics.observe_result(job, result)
        return result

    async def close(self, grace_s: float | None = None) -> None:
        await self._pool.close(grace_s)

    def status(self) -> dict[str, Any]:
        return self._pool.status()


router = APIRouter(route_class=TapeserveRoute, tags=["health"])


@router.get(
    "/metrics",
    operation_id="get_metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics."}},
)
async def get_metrics(request: Request) -> Response:
    """Report the server's metrics in the Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

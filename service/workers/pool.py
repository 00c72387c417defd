"""The supervised worker pool: spawned processes that run jobs one at a time, killed and replaced at will.

Design: the asyncio loop owns all pool state and each worker's pipes: two one-way OS pipes (jobs in,
replies out; a socket pair would wake the child, blocked reading, each time the parent reads a
reply), whose parent ends are asyncio transports (``_Pipe``), so replies are read by the loop
itself, with no thread hop, and writes never block it (a wedged child only makes the transport
buffer). The reply pipe's end (EOF) is how a death is noticed; a short-lived thread then reaps the
process and reports its exit code to the loop. Jobs wait in one bounded FIFO queue; a free worker
takes the head, and among several free workers the one that recently served the same affinity key
(compile-cache signature) wins. A worker that has served its ``max_jobs_per_worker`` is replaced
without a gap: its successor starts while it serves on, and takes over once warm.

Deadlines cost only their owner: a request whose deadline passes gets its Timeout at once, but the
job it started keeps its worker until it finishes (so a cold compile lands in the worker's cache for
the retry) or until it has run the pool's kill budget (``kill_after_s``, by default twice the server's
request timeout); only then is the worker killed. A program whose job crashed a worker, overran the
kill budget or crossed the memory ceiling is quarantined: refused at once for ``quarantine_s``.

What ``run`` raises, besides the handler's own TapeserveError rebuilt in the parent::

    Timeout        504  deadline passed (queue wait included); a running job goes on within the kill budget
    WorkerCrashed  503  the worker died under this job (segfault, abort, OOM kill) or shutdown cut it off
    Overloaded     503  queue full, or the pool is shutting down; ``retry_after`` seconds attached
    Quarantined    422  this program (by its affinity key) recently crashed or overran a worker
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, cast

from service.errors import (
    MemoryLimitExceeded,
    Overloaded,
    Quarantined,
    TapeserveError,
    Timeout,
    WorkerCrashed,
)
from service.workers import transport
from service.workers.child import WorkerSettings, child_environment, read_rss_mb, worker_main
from service.workers.config import PoolConfig

__all__ = ["RESTART_CAUSES", "WorkerPool"]

log = logging.getLogger(__name__)

RESTART_CAUSES = ("crash", "timeout", "memory", "recycle")

# Told to clients in Retry-After: long enough for a queue slot or a respawn, short enough to feel live.
RETRY_AFTER_S = 1
# A stopped worker has this long to exit on its own before it is killed (it only has to leave its loop).
_STOP_GRACE_S = 5.0
# After its pipe closes a child is gone or about to be; past this it is SIGKILLed so the slot recovers.
_EXIT_JOIN_S = 5.0
# A worker that lived this long before crashing was healthy: its crash starts no crash loop.
_HEALTHY_LIFETIME_S = 10.0
# First respawn delay of a crash loop (the first crash respawns at once); doubles per further crash.
_BACKOFF_BASE_S = 0.25
# Backoff ceiling: a broken device is still retried often enough to recover without an operator.
_BACKOFF_MAX_S = 10.0
# close() checks for drained work this often; a shutdown does not need finer timing.
_DRAIN_POLL_S = 0.02
# Quarantined programs remembered at once; the oldest is forgotten first (entries are small ints).
_QUARANTINE_ENTRIES = 4096
# Capacity asked for each worker pipe (Linux caps unprivileged requests at /proc/sys/fs/pipe-max-size,
# 1 MiB by default; where it fails the pipe keeps its 64 KiB).
_PIPE_BYTES = 2**20
# Frames up to this size are written with their length prefix in one piece (a copy, ~10 us at most).
_JOINED_FRAME_BYTES = 256 * 1024

# Worker states, as status() reports them.
STARTING, IDLE, BUSY, STOPPING, BACKOFF, STOPPED = (
    "starting",
    "idle",
    "busy",
    "stopping",
    "backoff",
    "stopped",
)
# Request states. An abandoned request's caller has had its Timeout; its job still runs.
_QUEUED, _RUNNING, _ABANDONED, _DONE = "queued", "running", "abandoned", "done"


@dataclass(eq=False)
class _Request:
    id: int
    frames: transport.Frames | None
    affinity: int | None
    timeout_s: float
    future: asyncio.Future[Any]
    state: str = _QUEUED
    worker: _Worker | None = None
    timer: asyncio.TimerHandle | None = None
    kill_timer: asyncio.TimerHandle | None = None  # the kill budget, from the job's start on a worker


@dataclass(eq=False)
class _Incarnation:
    """One spawned process of a worker slot and the parent's end of its pipe."""

    process: BaseProcess
    pipe: _Pipe | None = None
    spawned_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    jobs: int = 0
    failure: str | None = None  # why it could not start, as the child reported it
    stop_timer: asyncio.TimerHandle | None = None
    retired: str | None = None  # replaced by a warm successor for this cause; its exit restarts nothing
    successor_failed: bool = False  # a successor died starting: recycle this one the plain way


@dataclass(eq=False)
class _Worker:
    """A slot: one device, served by successive processes (incarnations)."""

    id: int
    device: str
    state: str = STARTING
    incarnation: _Incarnation | None = None
    current: _Request | None = None
    jobs: int = 0
    restarts: Counter[str] = field(default_factory=Counter)
    last_exit: dict[str, Any] | None = None
    # Hashes of affinity keys this process served recently: the programs it probably has cached.
    recent: OrderedDict[int, None] = field(default_factory=OrderedDict)
    exit_cause: str | None = None  # set when the pool stops or kills it on purpose
    quick_crashes: int = 0
    last_assigned: float = 0.0
    respawn_timer: asyncio.TimerHandle | None = None
    rss_mb: float | None = None
    # The process that will take over when this one is recycled: started while this one serves.
    successor: _Incarnation | None = None


class _Pipe(asyncio.Protocol):
    """The parent's ends of one worker's two pipes: replies read, jobs written by the event loop.

    Frames carry ``multiprocessing.Connection``'s length prefix, so the child keeps its plain
    blocking ``Connection`` objects. Messages go to ``on_message``; the end of the reply stream to
    ``on_closed``. The loop connects this protocol to the reply pipe and ``writer()`` to the job pipe.
    """

    def __init__(
        self, on_message: Callable[[Any], None], on_closed: Callable[[], None], on_garbage: Callable[[], None]
    ) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._on_garbage = on_garbage
        self._transport: asyncio.WriteTransport | None = None  # the job pipe's
        self._reader: asyncio.BaseTransport | None = None  # the reply pipe's
        self._pending: list[bytes | memoryview] = []  # written before the job pipe was connected
        self._buffer = bytearray()
        self._decoder = transport.Decoder()
        self.closed = False
        self.broken = False  # sent something unreadable: everything after it is ignored

    def connection_made(self, transport_: asyncio.BaseTransport) -> None:
        self._reader = transport_
        if self.closed:
            transport_.close()

    def writer(self) -> asyncio.BaseProtocol:
        """The job pipe's protocol: it hands its transport here; its end is the reply pipe's to report."""
        return _PipeWriter(self)

    def _writer_made(self, transport_: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport_)  # uvloop's is one in kind
        if self.closed:
            self._transport.close()
        elif self._pending:
            self._transport.writelines(self._pending)
        self._pending = []

    def _writer_lost(self) -> None:
        self._transport = None  # the child closed its end or died: its exit comes through the replies
        self._pending = []

    def write(self, frames: transport.Frames) -> None:
        if self.closed:
            return  # the child is gone; its exit is being reported
        data: list[bytes | memoryview] = []
        for frame in frames:
            if frame.nbytes <= _JOINED_FRAME_BYTES:
                # One write: a length prefix written on its own wakes the child for it alone.
                data.append(transport.frame_header(frame.nbytes) + frame)
            else:
                data += (transport.frame_header(frame.nbytes), frame)
        if self._transport is None:
            self._pending += data
        else:
            self._transport.writelines(data)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        buffer = self._buffer
        buffer += data
        start, end = 0, len(buffer)
        try:
            while end - start >= 4:
                size = int.from_bytes(buffer[start : start + 4], "big", signed=True)
                header = 4
                if size == -1:
                    if end - start < 12:
                        break
                    size, header = int.from_bytes(buffer[start + 4 : start + 12], "big"), 12
                if size < 0:
                    raise ValueError(f"bad frame length {size}")
                if end - start < header + size:
                    break
                frame = buffer[start + header : start + header + size]  # a writable copy
                start += header + size
                message = self._decoder.feed(frame)
                if message is not transport.Decoder.INCOMPLETE:
                    self._on_message(message)
        except Exception:
            self.broken = True
            self._buffer = bytearray()
            self._on_garbage()
            return
        del buffer[:start]

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._reader = None
        if self._transport is not None:
            self._transport.close()
        self._transport = None
        self._pending = []
        if not self.closed:
            self.closed = True
            self._on_closed()

    def close(self) -> None:
        """Close our ends after the child's exit has been handled (no ``on_closed`` call follows)."""
        self.closed = True
        for end in (self._transport, self._reader):
            if end is not None:
                end.close()


class _PipeWriter(asyncio.BaseProtocol):
    """The job pipe's protocol: only connects its transport to the ``_Pipe`` that writes on it."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def connection_made(self, transport_: asyncio.BaseTransport) -> None:
        self._pipe._writer_made(transport_)

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe._writer_lost()


class WorkerPool:
    """Runs jobs in supervised, spawned worker processes; use from one asyncio event loop."""

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._ctx = multiprocessing.get_context("spawn")  # never fork: TF and CUDA are not fork-safe
        self._workers = [_Worker(id=i, device=d) for i, d in enumerate(config.devices)]
        self._queue: deque[_Request] = deque()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # no new requests
        self._stopping = False  # no respawns either
        self._closed = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Affinity-key hashes of programs refused until a loop time, and why.
        self._quarantine: OrderedDict[int, tuple[float, str]] = OrderedDict()

    # ---------------------------------------------------------------- public interface

    async def start(self) -> None:
        """Spawn every worker and return at once; ``wait_ready`` waits for the first warm one.

        Workers are spawned from the loop's thread: on Linux PR_SET_PDEATHSIG fires when the spawning
        *thread* exits, so that thread must live as long as the pool.
        """
        if self._loop is not None:
            raise RuntimeError("the pool is already started")
        self._loop = asyncio.get_running_loop()
        for worker in self._workers:
            self._spawn(worker)

    async def wait_ready(self, timeout_s: float) -> bool:
        """True as soon as one worker is warm; False if none is within ``timeout_s``."""
        loop = self._running_loop()
        deadline = loop.time() + timeout_s
        while not self.ready:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._stopping:
                return self.ready
            self._became_ready.clear()
            try:
                await asyncio.wait_for(self._became_ready.wait(), remaining)
            except TimeoutError:
                return self.ready
        return True

    @property
    def idle_workers(self) -> int:
        """Workers that would take a job at once (none while jobs are queued): the batcher's signal."""
        if self._queue:
            return 0
        return sum(1 for worker in self._workers if worker.state == IDLE)

    async def run(self, job: Any, *, timeout_s: float | None = None, affinity: str | None = None) -> Any:
        """The handler's result for ``job``, computed in a worker within the deadline.

        ``timeout_s`` may shorten the configured default, never extend it; queue wait counts.
        ``affinity`` defaults to ``job.signature()`` when the job has one.
        """
        loop = self._running_loop()
        if self._closing:
            raise _overloaded("shutting down")
        if len(self._queue) >= self._config.queue_size and not any(w.state == IDLE for w in self._workers):
            raise _overloaded("queue full")
        default = self._config.default_timeout_s
        timeout = default if timeout_s is None else min(timeout_s, default)
        if timeout <= 0:
            raise Timeout("the request left no time to compute", timeout_s=timeout)
        key = affinity if affinity is not None else _signature_of(job)
        if key is not None:
            self._check_quarantine(hash(key), loop.time())
        request_id = next(self._ids)
        # Pickled here, so an unpicklable job fails in the caller, not in a thread.
        frames = transport.encode(("job", request_id, job))
        request = _Request(
            id=request_id,
            frames=frames,
            affinity=None if key is None else hash(key),
            timeout_s=timeout,
            future=loop.create_future(),
        )
        request.timer = loop.call_at(loop.time() + timeout, self._on_deadline, request)
        self._queue.append(request)
        self._dispatch()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller gave up. A queued job is dropped; a running one finishes within its budget.
            if request.state == _QUEUED:
                self._queue.remove(request)
                self._done(request)
            elif request.state == _RUNNING:
                request.state = _ABANDONED
            raise

    async def close(self, grace_s: float | None = None) -> None:
        """Refuse new jobs, let queued and running ones finish within the grace period, stop every worker."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self._loop is None:
            self._stopping = True
            self._closed.set()
            return
        loop = self._running_loop()
        grace = self._config.shutdown_grace_s if grace_s is None else grace_s
        deadline = loop.time() + grace
        while (self._queue or self._in_flight()) and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)

        self._stopping = True
        while self._queue:
            request = self._queue.popleft()
            self._done(request, error=_overloaded("shutting down"))
        for worker in self._workers:
            if worker.respawn_timer is not None:
                worker.respawn_timer.cancel()
                worker.respawn_timer = None
            if worker.successor is not None:
                _kill_quietly(worker.successor.process)  # never served: nothing to lose
            if worker.current is not None:
                request = worker.current
                worker.current = None
                self._done(request, error=WorkerCrashed("the service shut down before this job finished"))
                self._kill(worker, "shutdown")
            elif worker.state == IDLE:
                self._retire(worker, "shutdown")
            elif worker.state == STARTING:
                self._kill(worker, "shutdown")  # nothing to lose, and it would not read "stop" until warm
            elif worker.incarnation is None:
                worker.state = STOPPED

        # Graceful stops are bounded by their own kill timer; then wait for the readers to see the exits.
        stop_deadline = loop.time() + _STOP_GRACE_S + _EXIT_JOIN_S + 1.0

        def alive() -> bool:
            return any(w.incarnation is not None or w.successor is not None for w in self._workers)

        while alive() and loop.time() < stop_deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        for worker in self._workers:
            if worker.successor is not None:
                _kill_quietly(worker.successor.process)
            if worker.incarnation is not None:
                log.error(
                    "worker %d (pid %s) did not exit; killing it", worker.id, worker.incarnation.process.pid
                )
                _kill_quietly(worker.incarnation.process)
            worker.state = STOPPED
        self._closed.set()

    @property
    def ready(self) -> bool:
        """At least one worker is warm (idle or busy)."""
        return any(w.state in (IDLE, BUSY) for w in self._workers)

    def status(self) -> dict[str, Any]:
        """Per-worker health for /readyz, plus queue depth and jobs in flight."""
        workers = []
        for w in self._workers:
            pid = w.incarnation.process.pid if w.incarnation is not None else None
            rss = read_rss_mb(pid) if pid is not None else None
            workers.append(
                {
                    "id": w.id,
                    "pid": pid,
                    "device": w.device,
                    "state": w.state,
                    "jobs": w.jobs,
                    "restarts": sum(w.restarts[c] for c in RESTART_CAUSES),
                    "restarts_by_cause": {c: w.restarts[c] for c in RESTART_CAUSES},
                    "rss_mb": None if rss is None else round(rss, 1),
                    "last_exit": None if w.last_exit is None else dict(w.last_exit),
                }
            )
        return {
            "ready": self.ready,
            "workers": workers,
            "queue_depth": len(self._queue),
            "in_flight": self._in_flight(),
            "abandoned": sum(
                1 for w in self._workers if w.current is not None and w.current.state == _ABANDONED
            ),
            "quarantined": len(self._quarantine),
        }

    # ---------------------------------------------------------------- quarantine

    def _check_quarantine(self, key: int, now: float) -> None:
        entry = self._quarantine.get(key)
        if entry is None:
            return
        until, why = entry
        if now >= until:
            del self._quarantine[key]
            return
        left = until - now
        raise Quarantined(
            f"this program {why}; it is refused for another {left:.0f} s "
            "(the same request would likely do it again)",
            retry_after=max(1, math.ceil(left)),
            until=time.time() + left,
        )

    def _quarantine_request(self, request: _Request, why: str) -> None:
        if request.affinity is None or self._config.quarantine_s <= 0:
            return
        until = self._running_loop().time() + self._config.quarantine_s
        self._quarantine.pop(request.affinity, None)
        self._quarantine[request.affinity] = (until, why)
        while len(self._quarantine) > _QUARANTINE_ENTRIES:
            self._quarantine.popitem(last=False)
        log.warning(
            "program of job %d quarantined for %g s: it %s", request.id, self._config.quarantine_s, why
        )

    # ---------------------------------------------------------------- dispatch and deadlines

    def _dispatch(self) -> None:
        while self._queue:
            idle = [w for w in self._workers if w.state == IDLE]
            if not idle:
                return
            request = self._queue.popleft()
            if request.affinity is not None:
                # Work-conserving: a free worker with the program cached wins, but nobody waits for one.
                warm = [w for w in idle if request.affinity in w.recent]
                idle = warm or idle
            # Least recently assigned spreads load evenly over otherwise equal workers.
            self._assign(min(idle, key=lambda w: w.last_assigned), request)

    def _assign(self, worker: _Worker, request: _Request) -> None:
        incarnation = worker.incarnation
        assert incarnation is not None and request.frames is not None
        request.state = _RUNNING
        request.worker = worker
        worker.current = request
        worker.state = BUSY
        worker.last_assigned = self._running_loop().time()
        if request.affinity is not None:
            worker.recent[request.affinity] = None
            worker.recent.move_to_end(request.affinity)
            # Track as many keys as the child's program cache holds; older ones are likely evicted there.
            while len(worker.recent) > self._config.cache_size:
                worker.recent.popitem(last=False)
        self._write(incarnation, request.frames)
        request.frames = None  # sent, or the writer thread has them; the arrays are freed once sent
        budget = self._config.kill_budget_s
        request.kill_timer = self._running_loop().call_later(budget, self._on_overrun, request)

    def _on_deadline(self, request: _Request) -> None:
        request.timer = None
        error = Timeout(
            f"the computation did not finish within {request.timeout_s:g} s", timeout_s=request.timeout_s
        )
        if request.state == _QUEUED:
            self._queue.remove(request)
            self._done(request, error=error)
        elif request.state == _RUNNING:
            # The caller is answered now; the job keeps its worker (a cold compile then lands in the
            # cache for the retry) until it ends or overruns the kill budget.
            request.state = _ABANDONED
            budget = self._config.kill_budget_s
            error.extra["continues"] = True
            error.detail += (
                f"; it goes on in its worker for up to {budget:g} s, so a retry may find it cached"
            )
            _settle(request.future, error=error)

    def _on_overrun(self, request: _Request) -> None:
        """The job has run the kill budget: Python cannot interrupt a TF op, so its worker is killed."""
        request.kill_timer = None
        worker = request.worker
        if worker is None or worker.current is not request:
            return
        budget = self._config.kill_budget_s
        log.warning(
            "job %d ran past the %g s kill budget on worker %d; killing it", request.id, budget, worker.id
        )
        worker.current = None
        self._quarantine_request(request, f"ran past the {budget:g} s a job may run")
        self._done(
            request, error=Timeout(f"the computation did not finish within {budget:g} s", timeout_s=budget)
        )
        self._kill(worker, "timeout")

    def _done(self, request: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
        request.state = _DONE
        request.frames = None
        for timer in (request.timer, request.kill_timer):
            if timer is not None:
                timer.cancel()
        request.timer = request.kill_timer = None
        _settle(request.future, result=result, error=error)

    def _in_flight(self) -> int:
        return sum(1 for w in self._workers if w.current is not None)

    # ---------------------------------------------------------------- worker lifecycle (loop thread)

    def _spawn(self, worker: _Worker) -> None:
        worker.respawn_timer = None
        if self._stopping:
            worker.state = STOPPED
            return
        incarnation = self._launch(worker)
        if incarnation is None:  # e.g. out of memory or process slots: retry like a crash loop
            worker.quick_crashes += 1
            worker.state = BACKOFF
            worker.respawn_timer = self._running_loop().call_later(
                _backoff(worker.quick_crashes), self._spawn, worker
            )
            return
        worker.incarnation = incarnation
        worker.state = STARTING
        worker.recent.clear()  # a new process has an empty program cache

    def _launch(self, worker: _Worker) -> _Incarnation | None:
        """Start a process for ``worker``'s slot and attach its pipe (None if it could not start)."""
        config = self._config
        settings = WorkerSettings(
            worker_id=worker.id,
            device=worker.device,
            parent_pid=os.getpid(),
            handler=config.handler,
            warmup=config.warmup,
            limits=config.limits,
            environment=child_environment(
                worker.device,
                intra_op_threads=config.intra_op_threads,
                inter_op_threads=config.inter_op_threads,
                cache_size=config.cache_size,
                numpy_plans=config.numpy_plans,
                gpu_memory_limit_mb=config.gpu_memory_limit_mb,
            ),
            gpu_memory_limit_mb=config.gpu_memory_limit_mb,
            memory_limit_mb=config.memory_limit_mb,
            nice=config.nice,
            realtime_priority=config.realtime_priority,
        )
        jobs_out, jobs_in = self._ctx.Pipe(duplex=False)  # (reader, writer): the child reads jobs
        replies_out, replies_in = self._ctx.Pipe(duplex=False)  # the child writes replies
        process = self._ctx.Process(
            target=worker_main,
            args=(jobs_out, replies_in, settings),
            name=f"tapeserve-worker-{worker.id}",
            daemon=True,
        )
        try:
            process.start()
        except OSError as exc:
            jobs_in.close()
            replies_out.close()
            log.error("could not spawn worker %d: %s", worker.id, exc)
            return None
        finally:
            # The child holds its own copies; ours would hide the child's EOF.
            jobs_out.close()
            replies_in.close()
        incarnation = _Incarnation(process=process)
        incarnation.pipe = _Pipe(
            on_message=lambda message: self._on_message(worker, incarnation, message),
            on_closed=lambda: self._reap(worker, incarnation),
            on_garbage=lambda: self._on_garbage(worker, incarnation),
        )
        # Our own descriptors (duplicates) for the loop; the Connection objects are done with.
        ends = (os.dup(replies_out.fileno()), os.dup(jobs_in.fileno()))
        replies_out.close()
        jobs_in.close()
        task = self._running_loop().create_task(self._connect(worker, incarnation, ends))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return incarnation

    def _recycle(self, worker: _Worker) -> None:
        """Replace an idle worker that has served its jobs, without a gap: its successor starts
        while it keeps serving, and takes over once warm (TF's import and warm-up take seconds, a
        stall for every request if the slot stood empty meanwhile)."""
        incarnation = worker.incarnation
        assert incarnation is not None
        if worker.successor is not None:
            if worker.successor.ready:
                self._swap(worker)
            return  # still starting; this one serves until then
        if incarnation.successor_failed or self._stopping:
            self._retire(worker, "recycle")
            return
        worker.successor = self._launch(worker)
        if worker.successor is None:
            self._retire(worker, "recycle")

    def _swap(self, worker: _Worker) -> None:
        """The warm successor takes over an idle worker slot; the old process is asked to exit."""
        old, new = worker.incarnation, worker.successor
        assert old is not None and new is not None and worker.current is None
        worker.successor = None
        worker.incarnation = new
        worker.state = IDLE
        worker.recent.clear()  # a new process has an empty program cache
        worker.restarts["recycle"] += 1
        old.retired = "recycle"
        self._write(old, transport.encode(("stop",)))
        old.stop_timer = self._running_loop().call_later(_STOP_GRACE_S, _kill_quietly, old.process)

    def _retire(self, worker: _Worker, cause: str) -> None:
        """Ask an idle worker to exit; it is replaced when its exit is seen."""
        incarnation = worker.incarnation
        if incarnation is None:
            return
        worker.exit_cause = worker.exit_cause or cause
        worker.state = STOPPING
        self._write(incarnation, transport.encode(("stop",)))
        incarnation.stop_timer = self._running_loop().call_later(
            _STOP_GRACE_S, _kill_quietly, incarnation.process
        )

    def _kill(self, worker: _Worker, cause: str) -> None:
        incarnation = worker.incarnation
        if incarnation is None:
            return
        worker.exit_cause = worker.exit_cause or cause
        worker.state = STOPPING
        _kill_quietly(incarnation.process)

    def _on_message(self, worker: _Worker, incarnation: _Incarnation, message: tuple[Any, ...]) -> None:
        if incarnation is worker.successor:
            if message[0] == "ready":
                incarnation.ready = True
                if worker.state == IDLE:
                    self._swap(worker)
                    self._dispatch()
            elif message[0] == "failed":
                incarnation.failure = str(message[1])
                log.error("worker %d's successor could not start: %s", worker.id, incarnation.failure)
            return
        if incarnation is not worker.incarnation:
            return
        kind = message[0]
        if kind == "ready":
            incarnation.ready = True
            if worker.state == STARTING:
                worker.state = IDLE
                self._became_ready.set()
                self._dispatch()
        elif kind == "failed":
            incarnation.failure = str(message[1])
            log.error("worker %d could not start: %s", worker.id, incarnation.failure)
        elif kind in ("result", "error"):
            _, request_id, payload, rss_mb = message
            worker.rss_mb = rss_mb
            request = worker.current
            if request is None or request.id != request_id:
                return  # its deadline already passed; the worker is being killed
            worker.current = None
            worker.jobs += 1
            incarnation.jobs += 1
            error = None if kind == "result" else TapeserveError.from_dict(payload)
            self._done(request, result=payload if error is None else None, error=error)
            if worker.state == BUSY:
                worker.state = IDLE
                limit = self._config.memory_limit_mb
                if isinstance(error, MemoryLimitExceeded):
                    # Its allocation failed at the ceiling, so the worker never held that memory: it
                    # serves on (a restart would cost every client seconds). The RSS check below still
                    # replaces it if what the job did allocate stayed resident past the ceiling.
                    self._quarantine_request(request, "needed more memory than a worker may use")
                if limit is not None and rss_mb is not None and rss_mb > limit:
                    # Stop first, then start: a second process now would only add to the memory.
                    log.info("worker %d uses %.0f MB > %d MB; recycling it", worker.id, rss_mb, limit)
                    self._retire(worker, "memory")
                elif incarnation.jobs >= self._config.max_jobs_per_worker:
                    self._recycle(worker)
            self._dispatch()

    def _on_exit(self, worker: _Worker, incarnation: _Incarnation, exitcode: int | None) -> None:
        if incarnation.stop_timer is not None:
            incarnation.stop_timer.cancel()
        if incarnation.pipe is not None:
            incarnation.pipe.close()
        if incarnation is worker.successor:
            worker.successor = None
            if not self._stopping:
                pid = incarnation.process.pid
                log.warning("worker %d's successor (pid %s) died starting", worker.id, pid)
                if worker.incarnation is not None:
                    worker.incarnation.successor_failed = True
                    if worker.state == IDLE:
                        self._recycle(worker)  # the plain way now
            return
        if incarnation is not worker.incarnation:
            if incarnation.retired is not None:
                worker.last_exit = {
                    "cause": incarnation.retired,
                    "exitcode": exitcode,
                    "signal": _signal_name(exitcode),
                    "detail": incarnation.failure,
                    "at": time.time(),
                }
            return
        worker.incarnation = None
        cause = worker.exit_cause or "crash"
        worker.exit_cause = None
        signal_name = _signal_name(exitcode)
        worker.last_exit = {
            "cause": cause,
            "exitcode": exitcode,
            "signal": signal_name,
            "detail": incarnation.failure,
            "at": time.time(),
        }
        request = worker.current
        worker.current = None
        if request is not None:
            how = f"signal {signal_name}" if signal_name else f"exit code {exitcode}"
            if cause == "crash":
                self._quarantine_request(request, f"crashed a worker ({how})")
            self._done(request, error=WorkerCrashed(f"the worker died while running this job ({how})"))
        if cause == "crash":
            log.warning("worker %d (pid %s) died: %s", worker.id, incarnation.process.pid, worker.last_exit)
        if self._stopping:
            worker.state = STOPPED
            return

        delay = 0.0
        if cause == "crash":
            lived = time.monotonic() - incarnation.spawned_at
            healthy = incarnation.ready and lived >= _HEALTHY_LIFETIME_S
            worker.quick_crashes = 1 if healthy else worker.quick_crashes + 1
            delay = _backoff(worker.quick_crashes)
        worker.restarts[cause] += 1
        successor = worker.successor
        if successor is not None:  # one was already starting: it takes the slot now
            worker.successor = None
            worker.incarnation = successor
            worker.recent.clear()
            worker.state = IDLE if successor.ready else STARTING
            self._dispatch()
            return
        if delay > 0:
            worker.state = BACKOFF
            worker.respawn_timer = self._running_loop().call_later(delay, self._spawn, worker)
        else:
            self._spawn(worker)
        self._dispatch()

    # ---------------------------------------------------------------- per-process threads

    async def _connect(self, worker: _Worker, incarnation: _Incarnation, ends: tuple[int, int]) -> None:
        pipe = incarnation.pipe
        assert pipe is not None
        replies, jobs = os.fdopen(ends[0], "rb", buffering=0), os.fdopen(ends[1], "wb", buffering=0)
        for end in (replies, jobs):
            with contextlib.suppress(OSError, AttributeError):
                # A large job or reply crosses in fewer wake-ups (Linux; the default is 64 KiB).
                fcntl.fcntl(end.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        loop = self._running_loop()
        try:
            await loop.connect_read_pipe(lambda: pipe, replies)
            await loop.connect_write_pipe(pipe.writer, jobs)
        except Exception:
            log.exception("worker %d: its pipes could not join the event loop; killing it", worker.id)
            for end in (replies, jobs):
                end.close()
            _kill_quietly(incarnation.process)
            pipe.connection_lost(None)

    def _write(self, incarnation: _Incarnation, frames: transport.Frames) -> None:
        """Queue a message on the worker's pipe; the loop's transport writes it without blocking."""
        if incarnation.pipe is not None:
            incarnation.pipe.write(frames)

    def _on_garbage(self, worker: _Worker, incarnation: _Incarnation) -> None:
        log.exception("worker %d sent an unreadable message; killing it", worker.id)
        _kill_quietly(incarnation.process)  # its pipe then closes, and the exit is reported as usual

    def _reap(self, worker: _Worker, incarnation: _Incarnation) -> None:
        """The pipe has closed: the child exited or is about to. Collect its exit code off the loop."""

        def join() -> None:
            process = incarnation.process
            process.join(_EXIT_JOIN_S)
            if process.exitcode is None:
                _kill_quietly(process)
                process.join()
            self._post(self._on_exit, worker, incarnation, process.exitcode)

        threading.Thread(target=join, name=f"tapeserve-worker-{worker.id}-reaper", daemon=True).start()

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            return False
        return True

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("start() the pool first")
        return self._loop


def _settle(future: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled, or already had its Timeout
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _overloaded(detail: str) -> Overloaded:
    return Overloaded(detail, retry_after=RETRY_AFTER_S)


def _signature_of(job: Any) -> str | None:
    signature = getattr(job, "signature", None)
    if not callable(signature):
        return None
    try:
        key = signature()
    except Exception:
        return None
    return key if isinstance(key, str) else None


def _backoff(quick_crashes: int) -> float:
    if quick_crashes <= 1:
        return 0.0
    return float(min(_BACKOFF_BASE_S * 2 ** (quick_crashes - 2), _BACKOFF_MAX_S))


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return None


def _kill_quietly(process: BaseProcess) -> None:
    try:
        process.kill()
    except (OSError, ValueError, AttributeError):
        pass  # already gone, or closed

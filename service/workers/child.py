"""The worker process: pin its device, import the handler (and TensorFlow) only here, serve one job at a time.

Messages (tuples over ``transport``): parent -> child ("job", id, job) | ("stop",); child -> parent
("ready", pid) | ("failed", why) | ("result", id, result, rss_mb) | ("error", id, problem, rss_mb).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from service.errors import MemoryLimitExceeded, TapeserveError
from service.limits import Limits
from service.workers import transport

__all__ = ["WorkerSettings", "child_environment", "read_rss_mb", "take_nice", "take_realtime", "worker_main"]

log = logging.getLogger(__name__)

# How often the child checks that its parent is still alive; bounds how long an orphan can outlive it.
_PARENT_POLL_S = 0.5
# Linux prctl option: deliver a signal to this process when the thread that spawned it exits.
_PR_SET_PDEATHSIG = 1
# Exit code of a child whose handler or warmup could not be loaded (the parent logs the reason).
EXIT_STARTUP_FAILED = 3
# Exit code of a child that noticed its parent is gone.
EXIT_ORPHANED = 4


@dataclass(frozen=True)
class WorkerSettings:
    """What one child needs: plain data, pickled into the spawned process."""

    worker_id: int
    device: str
    parent_pid: int
    handler: str
    warmup: str | None
    limits: Limits
    environment: dict[str, str]
    gpu_memory_limit_mb: int | None
    memory_limit_mb: int | None = None  # the worker's memory ceiling, held during jobs (None: none)
    nice: int = 0  # taken before any thread starts, so TF's threads have it too (0: inherited as is)
    # SCHED_RR priority the main thread takes once warm, just before it reports ready (0: none).
    realtime_priority: int = 0


def child_environment(
    device: str,
    *,
    intra_op_threads: int,
    inter_op_threads: int,
    cache_size: int,
    gpu_memory_limit_mb: int | None,
    numpy_plans: bool = True,
) -> dict[str, str]:
    """Variables TensorFlow reads at import: they must be set before the handler module is imported."""
    env = {
        "TF_CPP_MIN_LOG_LEVEL": "2",  # keep TF's start-up chatter out of the service log
        "TAPESERVE_CACHE_SIZE": str(cache_size),
        "TAPESERVE_NUMPY_PLANS": "1" if numpy_plans else "0",
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
        env["TF_NUM_INTRAOP_THREADS"] = str(intra_op_threads)
        env["TF_NUM_INTEROP_THREADS"] = str(inter_op_threads)
        env["OMP_NUM_THREADS"] = str(intra_op_threads)
        # oneDNN's CPU allocator retries a failed allocation for seconds (waiting for memory another op
        # might free); TF's plain allocator fails at once, so a job that meets the memory ceiling is
        # answered in milliseconds, not ~30 s. The small programs served here gain nothing from oneDNN.
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    else:
        env["CUDA_VISIBLE_DEVICES"] = device
        if gpu_memory_limit_mb is None:
            # Without it TF grabs nearly all GPU memory, and two workers cannot share a GPU.
            env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return env


_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def read_rss_mb(pid: int | str = "self") -> float | None:
    """Resident set size in MiB from /proc/PID/statm (None where there is no /proc or no process).

    statm is one short line (sizes in pages). A worker reads its own after every job, through a file
    descriptor it keeps open: one pread, a few microseconds.
    """
    try:
        if pid == "self":
            raw = os.pread(_own_statm(), 128, 0)
        else:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                raw = statm.read()
        return int(raw.split()[1]) * _PAGE_MB
    except (OSError, ValueError, IndexError):
        return None


_statm: dict[int, int] = {}  # pid -> an open descriptor of /proc/self/statm (per pid: survives a fork)


def _own_statm() -> int:
    pid = os.getpid()
    fd = _statm.get(pid)
    if fd is None:
        fd = _statm[pid] = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    return fd


def worker_main(jobs: Connection, replies: Connection, settings: WorkerSettings) -> None:
    """Entry point of a spawned worker; never returns normally (os._exit skips TF's slow teardown).

    Reads jobs from ``jobs`` and writes replies to ``replies``: two one-way pipes, so the parent
    reading a reply never wakes this process, blocked reading its next job.
    """
    os.environ.update(settings.environment)
    if settings.nice:
        take_nice(settings.nice)
    # Ctrl-C reaches the whole process group; shutting down is the parent's decision, not ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(settings.parent_pid)

    try:
        handler = _load(settings.handler)
        after_reply = _after_reply_hook(settings.handler)
        if settings.device != "cpu" and settings.gpu_memory_limit_mb is not None:
            _limit_gpu_memory(settings.gpu_memory_limit_mb)
        if settings.warmup is not None:
            warmup = _load_optional(settings.warmup)
            if warmup is not None:
                warmup()
    except BaseException as exc:  # anything, even SystemExit from a handler import, is a failed start
        log.exception("worker %d could not start", settings.worker_id)
        _send_quietly(replies, ("failed", f"{type(exc).__name__}: {exc}"))
        _exit(EXIT_STARTUP_FAILED)
    if settings.memory_limit_mb is not None:
        hold_memory_ceiling(settings.memory_limit_mb)
    if settings.realtime_priority:
        # Only now: TF's import and warm-up ran at the ordinary priority, and its threads (which
        # run graph ops) keep it. The main thread (the pipe, numpy plans, tracing) goes first.
        take_realtime(settings.realtime_priority)

    transport.send(replies, transport.encode(("ready", os.getpid())))
    while True:
        try:
            message = transport.receive(jobs)
        except (EOFError, OSError):
            _exit(EXIT_ORPHANED)  # the parent closed the pipe or died
        if message[0] == "stop":
            _exit(0)
        _, job_id, job = message
        reply = _run_one(handler, job_id, job, settings)
        try:
            transport.send(replies, reply)
        except OSError:
            _exit(EXIT_ORPHANED)
        if after_reply is not None:
            try:
                after_reply()  # deferred work, off the reply's path (the engine builds numpy plans)
            except Exception:
                log.exception("worker %d: after_reply raised", settings.worker_id)


def _run_one(
    handler: Callable[..., Any], job_id: int, job: Any, settings: WorkerSettings
) -> transport.Frames:
    try:
        reply: tuple[Any, ...] = ("result", job_id, handler(job, settings.limits))
    except TapeserveError as exc:
        reply = ("error", job_id, exc.to_dict())
    except MemoryError:
        # An allocation failed at the memory ceiling (hold_memory_ceiling): this job's size, not a bug.
        error = MemoryLimitExceeded(
            f"the computation needed more memory than a worker may use ({settings.memory_limit_mb} MiB)"
        )
        reply = ("error", job_id, error.to_dict())
    except Exception:
        # A bug, not the user's fault: the traceback goes to the log, never to the client.
        log.exception("worker %d: handler raised", settings.worker_id)
        reply = ("error", job_id, TapeserveError("internal error while computing").to_dict())
    try:
        return transport.encode((*reply, read_rss_mb()))
    except Exception:
        log.exception("worker %d: result could not be serialized", settings.worker_id)
        problem = TapeserveError("internal error: result could not be serialized").to_dict()
        return transport.encode(("error", job_id, problem, read_rss_mb()))


def take_nice(nice: int) -> str | None:
    """Give the calling thread, and every thread and process it starts afterwards, this nice value.

    Linux keeps nice per thread, so call it before threads start. Raising it is always allowed;
    lowering it below the current value needs CAP_SYS_NICE (docker: ``cap_add: [SYS_NICE]``). Returns
    why it could not (also logged), or None.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        why = (
            f"could not take nice {nice} ({exc.strerror}); below the current value needs CAP_SYS_NICE, "
            f"so this process runs at {os.getpriority(os.PRIO_PROCESS, 0)}"
        )
        log.warning("%s", why)
        return why
    return None


def take_realtime(priority: int) -> str | None:
    """Put the calling thread in SCHED_RR at ``priority`` (1-99): it then runs as soon as it wakes,
    ahead of every ordinary (SCHED_OTHER) thread on the machine, whatever their nice or cgroup.

    With SCHED_RESET_ON_FORK: threads and processes it starts later begin ordinary, so the API's
    work threads and a new worker's TensorFlow import never run ahead of the event loop. Needs
    CAP_SYS_NICE (docker: ``cap_add: [SYS_NICE]``). Returns why it could not (also logged), or None.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except (OSError, AttributeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        why = f"could not take SCHED_RR priority {priority} ({reason}); it needs CAP_SYS_NICE on Linux"
        log.warning("%s", why)
        return why
    return None


def hold_memory_ceiling(limit_mb: int) -> int | None:
    """Make the kernel hold this process to ``limit_mb`` of resident memory while jobs run.

    Set once the worker is warm (TensorFlow imported, warm-up done), as RLIMIT_DATA: the private
    writable memory it has now, plus the room left under the ceiling (``limit_mb`` minus its resident
    size now). An allocation past it fails at once, inside this process, before the machine feels
    it: TensorFlow's allocator turns that into ResourceExhaustedError and Python into MemoryError,
    which the engine answers as ``memory_limit``. RLIMIT_AS would not do: TensorFlow and CUDA reserve
    far more address space than they use. Returns the limit set, in bytes (None where unsupported).
    """
    data = _status_kib("VmData")
    rss = _status_kib("VmRSS")
    if data is None or rss is None:
        return None
    # At least 64 MiB of room, so a worker that is already near its ceiling can still answer.
    room = max(limit_mb * 1024 - rss, 64 * 1024)
    limit = (data + room) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _load(target: str) -> Callable[..., Any]:
    module_name, _, function = target.partition(":")
    fn = getattr(importlib.import_module(module_name), function)
    if not callable(fn):
        raise TypeError(f"{target} is not callable")
    return fn  # type: ignore[no-any-return]


def _after_reply_hook(handler: str) -> Callable[[], None] | None:
    """The handler module's optional ``after_reply()``, run after each reply is sent."""
    hook = getattr(importlib.import_module(handler.partition(":")[0]), "after_reply", None)
    return hook if callable(hook) else None


def _load_optional(target: str) -> Callable[..., Any] | None:
    """Like ``_load``, but None if the module itself does not exist (yet); its import errors still raise."""
    module_name = target.partition(":")[0]
    try:
        return _load(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            return None
        raise


def _limit_gpu_memory(limit_mb: int) -> None:
    import tensorflow as tf  # the child only; CUDA_VISIBLE_DEVICES is already set

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.set_logical_device_configuration(
            gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mb)]
        )


def _die_with_parent(parent_pid: int) -> None:
    """Two independent guards, so no worker outlives the API process, however it dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the polling thread below still covers it
    if os.getppid() != parent_pid:
        _exit(EXIT_ORPHANED)  # the parent died before prctl took effect

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                _exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _send_quietly(conn: Connection, message: tuple[Any, ...]) -> None:
    try:
        transport.send(conn, transport.encode(message))
    except (OSError, ValueError):
        pass


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)

"""How many workers run where, and the knobs of the pool; device discovery that never imports TensorFlow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service.limits import Limits

__all__ = ["PoolConfig", "resolve_devices", "visible_gpus", "worker_memory_ceiling"]

CPU = "cpu"

# Where the NVIDIA driver lists one directory per GPU (by PCI bus id); absent without the driver.
_NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
# nvidia-smi normally answers in well under a second; a hung driver must not hang start-up.
_NVIDIA_SMI_TIMEOUT_S = 5.0
# A CPU worker runs TF with intra-op threads of its own; two cores per worker leaves room for them
# and for the API process, instead of oversubscribing the machine.
_CORES_PER_CPU_WORKER = 2
# Of the memory the service may use, what the workers share; the rest is the API process's, the
# page cache's and a successor's start-up while a worker is recycled.
_WORKER_SHARE = 0.75
# The API process and its caches, kept out of the workers' share.
_API_RESERVE_MB = 512
# Where cgroup v2 (then v1) states this container's memory limit.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# A GPU id as CUDA_VISIBLE_DEVICES accepts it: an index, or a GPU-/MIG- UUID.
_GPU_ID = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")


@dataclass(frozen=True)
class PoolConfig:
    """The worker pool's settings; ``devices`` has one entry per worker ("cpu" or a GPU id)."""

    devices: tuple[str, ...]
    queue_size: int = 64  # jobs waiting (not yet on a worker) before Overloaded
    default_timeout_s: float = 30.0  # also the ceiling: a request may ask for less, never more
    # Replace a worker after this many jobs; its successor warms up first, which costs ~3 s of CPU (TF's
    # import and warm-up) next to the serving processes. Leaks are bounded by memory_limit_mb directly.
    max_jobs_per_worker: int = 1_000_000
    memory_limit_mb: int | None = None  # RSS ceiling per worker; above it, recycled after its current job
    gpu_memory_limit_mb: int | None = None  # else memory growth on
    intra_op_threads: int = 1  # TF threads for CPU workers
    inter_op_threads: int = 1
    cache_size: int = 256  # compiled programs kept per worker (TAPESERVE_CACHE_SIZE in the child)
    numpy_plans: bool = True  # run small, hot programs as numpy plans (TAPESERVE_NUMPY_PLANS in the child)
    shutdown_grace_s: float = 30.0
    # Nice value each worker takes as it starts, before its threads do (0: inherited as is). Below 0
    # needs CAP_SYS_NICE; without it the worker logs why and serves at its own. (The API process takes
    # Settings.nice itself, in create_app's lifespan.)
    nice: int = 0
    # SCHED_RR priority each worker's main thread takes once warm (0: none; 1-99). Needs CAP_SYS_NICE;
    # without it the worker logs why and serves as it is. (The API takes one above, in its lifespan.)
    realtime_priority: int = 0
    # How long a job may run on a worker before the worker is killed (None: twice default_timeout_s,
    # so a cold compile that outlives the request that started it can finish into the cache for the
    # retry). A request's own deadline only bounds how long its caller waits.
    kill_after_s: float | None = None
    # How long a program that crashed a worker, overran kill_after_s or crossed the memory ceiling
    # is refused (0: never).
    quarantine_s: float = 60.0
    limits: Limits = field(default_factory=Limits)
    handler: str = "service.engine:execute"  # "module:function", called in the child as handler(job, limits)
    # Called once in the child before it reports ready; skipped if its module does not exist.
    warmup: str | None = "service.engine.warmup:warmup"

    @property
    def kill_budget_s(self) -> float:
        return self.kill_after_s if self.kill_after_s is not None else 2 * self.default_timeout_s

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("the pool needs at least one device")
        for device in self.devices:
            if device != CPU and not _GPU_ID.match(device):
                raise ValueError(f"device {device!r} is neither 'cpu' nor a GPU id")
        if self.queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        if self.default_timeout_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("default_timeout_s must be > 0 and shutdown_grace_s >= 0")
        if self.kill_after_s is not None and self.kill_after_s <= 0:
            raise ValueError("kill_after_s must be > 0")
        if self.quarantine_s < 0:
            raise ValueError("quarantine_s must be >= 0")
        if self.max_jobs_per_worker < 1:
            raise ValueError("max_jobs_per_worker must be >= 1")
        if self.memory_limit_mb is not None and self.memory_limit_mb < 1:
            raise ValueError("memory_limit_mb must be >= 1")
        if self.gpu_memory_limit_mb is not None and self.gpu_memory_limit_mb < 1:
            raise ValueError("gpu_memory_limit_mb must be >= 1")
        if not -20 <= self.nice <= 19:
            raise ValueError("nice must be within -20..19")
        if not 0 <= self.realtime_priority <= 99:
            raise ValueError("realtime_priority must be within 0..99")
        if self.intra_op_threads < 1 or self.inter_op_threads < 1 or self.cache_size < 1:
            raise ValueError("thread counts and cache_size must be >= 1")
        for name, target in (("handler", self.handler), ("warmup", self.warmup)):
            if target is not None and not re.match(r"^[\w.]+:\w+$", target):
                raise ValueError(f"{name} must be 'module:function', not {target!r}")


def resolve_devices(
    workers: int | None, devices: str | None, visible_gpus: Sequence[str], cpu_count: int
) -> tuple[str, ...]:
    """One device per worker from TAPESERVE_WORKERS / TAPESERVE_DEVICES.

    - neither: one worker per visible GPU, else one per 2 CPU cores (at least 1);
    - ``devices`` ("cpu", "0,1", "0,0,1,1"): that list; with "cpu" alone the count follows the CPU rule;
    - ``workers`` with a device list (given, or the visible GPUs): round robin over the list.
    GPU ids must be visible; refusing them at start-up beats a worker that crash-loops later.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"TAPESERVE_WORKERS must be >= 1, not {workers}")
    gpus = [g.strip() for g in visible_gpus]
    default_cpu_workers = max(1, cpu_count // _CORES_PER_CPU_WORKER)

    if devices is not None and devices.strip():
        listed = [d.strip().lower() if d.strip().lower() == CPU else d.strip() for d in devices.split(",")]
        if any(not d for d in listed):
            raise ValueError(f"TAPESERVE_DEVICES has an empty entry: {devices!r}")
        for device in listed:
            if device == CPU:
                continue
            if not _GPU_ID.match(device):
                raise ValueError(f"TAPESERVE_DEVICES entry {device!r} is neither 'cpu' nor a GPU id")
            if device not in gpus:
                shown = ", ".join(gpus) or "none"
                raise ValueError(
                    f"GPU {device!r} is not visible (visible: {shown}); set CUDA_VISIBLE_DEVICES if "
                    "detection missed it"
                )
        if listed == [CPU]:
            return (CPU,) * (workers if workers is not None else default_cpu_workers)
    elif gpus:
        listed = gpus
    else:
        return (CPU,) * (workers if workers is not None else default_cpu_workers)

    count = workers if workers is not None else len(listed)
    return tuple(listed[i % len(listed)] for i in range(count))


def visible_gpus() -> list[str]:
    """GPU ids this process may use, found without importing TensorFlow.

    CUDA_VISIBLE_DEVICES wins when set (its entries are what a child's CUDA_VISIBLE_DEVICES must name);
    then the NVIDIA driver's /proc entries; then ``nvidia-smi -L``; else none.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids: list[str] = []
        for entry in env.split(","):
            entry = entry.strip()
            # CUDA ignores everything from the first invalid entry on ("-1" hides every GPU).
            if not _GPU_ID.match(entry):
                break
            ids.append(entry)
        return ids
    try:
        count = sum(1 for _ in _NVIDIA_PROC_GPUS.iterdir())
    except OSError:
        count = 0
    if count:
        return [str(i) for i in range(count)]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, flags=re.MULTILINE)


def worker_memory_ceiling(setting: int | None, workers: int) -> int | None:
    """Each worker's memory ceiling in MiB: the setting, None when it is 0 (off), or when unset a
    share of the memory this service may use (its cgroup's limit, else the machine's) per worker."""
    if setting is not None:
        return setting or None
    total = memory_available_mb()
    if total is None:
        return None
    return max(256, int((total * _WORKER_SHARE - _API_RESERVE_MB) / max(workers, 1)))


def memory_available_mb() -> int | None:
    """The cgroup's memory limit where one is set, else the machine's memory (MiB); None if unknown."""
    machine: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    machine = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    for path in _CGROUP_LIMITS:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            limit = int(raw) // 2**20
            # v1 says "no limit" with a huge number; v2 with "max" (not digits).
            if machine is None or limit < machine:
                return limit
        break
    return machine

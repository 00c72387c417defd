"""Device assignment and pool settings, against fake GPU lists (this machine has no GPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.limits import Limits
from service.workers import PoolConfig, config, resolve_devices, visible_gpus
from service.workers.child import child_environment, take_nice, take_realtime


@pytest.mark.parametrize(
    ("workers", "devices", "gpus", "cpus", "expected"),
    [
        # Defaults: one per visible GPU, else one per two cores, at least one.
        (None, None, [], 2, ("cpu",)),
        (None, None, [], 1, ("cpu",)),
        (None, None, [], 8, ("cpu",) * 4),
        (None, None, ["0", "1"], 8, ("0", "1")),
        # TAPESERVE_WORKERS alone: CPU count, or round robin over the GPUs.
        (3, None, [], 2, ("cpu",) * 3),
        (4, None, ["0", "1"], 8, ("0", "1", "0", "1")),
        (1, None, ["0", "1"], 8, ("0",)),
        # TAPESERVE_DEVICES.
        (None, "cpu", ["0", "1"], 8, ("cpu",) * 4),
        (2, "cpu", ["0"], 8, ("cpu", "cpu")),
        (None, "0,1", ["0", "1"], 8, ("0", "1")),
        (None, "0,0,1,1", ["0", "1"], 8, ("0", "0", "1", "1")),
        (None, " 1 , 0 ", ["0", "1"], 8, ("1", "0")),
        (None, "CPU", [], 4, ("cpu", "cpu")),
        (3, "0,1", ["0", "1"], 8, ("0", "1", "0")),
        (None, "cpu,0", ["0"], 8, ("cpu", "0")),
        (None, "", [], 4, ("cpu", "cpu")),
        (None, "GPU-1234-abcd", ["GPU-1234-abcd"], 4, ("GPU-1234-abcd",)),
    ],
)
def test_resolve_devices(
    workers: int | None, devices: str | None, gpus: list[str], cpus: int, expected: tuple[str, ...]
) -> None:
    assert resolve_devices(workers, devices, gpus, cpus) == expected


@pytest.mark.parametrize(
    ("workers", "devices", "gpus", "message"),
    [
        (0, None, [], "TAPESERVE_WORKERS"),
        (None, "0", [], "not visible"),
        (None, "0,2", ["0", "1"], "not visible"),
        (None, "0,,1", ["0", "1"], "empty entry"),
        (None, "gpu0", ["0"], "neither"),
    ],
)
def test_resolve_devices_refuses_nonsense(
    workers: int | None, devices: str | None, gpus: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_devices(workers, devices, gpus, 4)


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [("0,1", ["0", "1"]), ("2", ["2"]), ("-1", []), ("", []), ("0,-1,1", ["0"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert visible_gpus() == expected


def test_visible_gpus_from_driver_or_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(config, "_NVIDIA_PROC_GPUS", tmp_path / "absent")
    assert visible_gpus() == []
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / bus).mkdir()
    monkeypatch.setattr(config, "_NVIDIA_PROC_GPUS", tmp_path)
    assert visible_gpus() == ["0", "1"]


def test_pool_config_defaults_and_validation() -> None:
    cfg = PoolConfig(devices=("cpu",))
    assert cfg.queue_size == 64 and cfg.default_timeout_s == 30.0 and cfg.limits == Limits()
    assert cfg.handler == "service.engine:execute" and cfg.warmup == "service.engine.warmup:warmup"
    assert cfg.nice == 0 and cfg.max_jobs_per_worker == 1_000_000
    for bad in [
        {"devices": ()},
        {"devices": ("gpu",)},
        {"devices": ("cpu",), "queue_size": -1},
        {"devices": ("cpu",), "default_timeout_s": 0},
        {"devices": ("cpu",), "max_jobs_per_worker": 0},
        {"devices": ("cpu",), "memory_limit_mb": 0},
        {"devices": ("cpu",), "handler": "no_colon"},
        {"devices": ("cpu",), "nice": -21},
        {"devices": ("cpu",), "nice": 20},
    ]:
        with pytest.raises(ValueError):
            PoolConfig(**bad)  # type: ignore[arg-type]


def test_child_environment_pins_the_device_before_tensorflow() -> None:
    cpu = child_environment(
        "cpu", intra_op_threads=2, inter_op_threads=1, cache_size=7, gpu_memory_limit_mb=None
    )
    assert cpu == {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TAPESERVE_CACHE_SIZE": "7",
        "TAPESERVE_NUMPY_PLANS": "1",
        "CUDA_VISIBLE_DEVICES": "-1",
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_NUM_INTEROP_THREADS": "1",
        "OMP_NUM_THREADS": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",  # so that an allocation past the memory ceiling fails at once
    }
    gpu = child_environment(
        "1", intra_op_threads=1, inter_op_threads=1, cache_size=9, gpu_memory_limit_mb=None
    )
    assert gpu["CUDA_VISIBLE_DEVICES"] == "1" and gpu["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    limited = child_environment(
        "0", intra_op_threads=1, inter_op_threads=1, cache_size=9, gpu_memory_limit_mb=512
    )
    # With a limit the child configures a logical device after importing TF; growth would conflict.
    assert "TF_FORCE_GPU_ALLOW_GROWTH" not in limited
    off = child_environment(
        "cpu",
        intra_op_threads=1,
        inter_op_threads=1,
        cache_size=9,
        gpu_memory_limit_mb=None,
        numpy_plans=False,
    )
    assert off["TAPESERVE_NUMPY_PLANS"] == "0"


@pytest.mark.parametrize(
    ("call", "take", "value"),
    [("setpriority", take_nice, -5), ("sched_setscheduler", take_realtime, 5)],
    ids=["nice", "realtime"],
)
def test_a_priority_that_is_not_allowed_is_explained_and_the_worker_goes_on(
    monkeypatch: pytest.MonkeyPatch, call: str, take: Callable[[int], str | None], value: int
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, call, refuse)
    why = take(value)
    assert why is not None and "CAP_SYS_NICE" in why and "Operation not permitted" in why


def test_realtime_priority_is_checked_by_the_pool_config() -> None:
    with pytest.raises(ValueError, match="realtime_priority"):
        PoolConfig(devices=("cpu",), realtime_priority=100)

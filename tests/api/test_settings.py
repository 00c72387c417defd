"""Settings: environment variables, defaults equal to Limits, nonsense refused at start-up."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from service.api.settings import LIMIT_FIELDS, Settings
from service.limits import Limits


def test_every_limit_is_a_setting_with_the_same_default() -> None:
    settings = Settings()
    # every default but the per-input element limit, which follows the memory ceiling (below)
    derived = settings.limits().max_input_elements
    assert settings.limits() == dataclasses.replace(Limits(), max_input_elements=derived)
    assert set(LIMIT_FIELDS) <= set(Settings.model_fields)
    assert {f.name for f in dataclasses.fields(Limits)} == set(LIMIT_FIELDS)


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAPESERVE_PORT", "9001")
    monkeypatch.setenv("TAPESERVE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("TAPESERVE_WORKERS", "3")
    settings = Settings()
    assert settings.port == 9001
    assert settings.workers == 3
    assert settings.limits().max_body_bytes == 2048


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": -1},
        {"port": 70000},
        {"workers": 0},
        {"queue_size": 0},
        {"request_timeout_s": 0},
        {"max_body_bytes": 10},
        {"max_nesting_depth": 151},
        {"max_input_elements": 100, "max_tensor_elements": 10},
        {"max_order": 0},
        {"log_level": "loud"},
        {"devices": "0,,1"},
        {"realtime_priority": 1},  # the workers take one less, and SCHED_RR starts at 1
        {"realtime_priority": 100},
        {"no_such_setting": 1},
    ],
)
def test_nonsense_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)  # type: ignore[arg-type]


def test_the_workers_take_one_realtime_priority_below_the_event_loop() -> None:
    assert Settings(realtime_priority=5).pool_config().realtime_priority == 4
    assert Settings().pool_config().realtime_priority == 0


def test_pool_config_cpu_only() -> None:
    config = Settings(workers=2, devices="cpu", queue_size=7, request_timeout_s=12.5).pool_config()
    assert config.devices == ("cpu", "cpu")
    assert config.queue_size == 7
    assert config.default_timeout_s == 12.5
    assert config.limits == dataclasses.replace(Limits(), max_input_elements=config.limits.max_input_elements)


def test_worker_isolation_defaults_are_on_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.workers import config as pool_config

    monkeypatch.setattr(pool_config, "memory_available_mb", lambda: 8192)
    config = Settings(workers=2, devices="cpu", request_timeout_s=12.5).pool_config()
    # Three quarters of 8 GiB, less the API's 512 MiB, shared by two workers.
    assert config.memory_limit_mb == int((8192 * 0.75 - 512) / 2)
    assert config.kill_budget_s == 25.0 and config.quarantine_s == 60.0
    off = Settings(workers=2, devices="cpu", worker_memory_mb=0, quarantine_s=0).pool_config()
    assert off.memory_limit_mb is None and off.quarantine_s == 0
    explicit = Settings(devices="cpu", worker_memory_mb=900, worker_kill_after_s=7).pool_config()
    assert explicit.memory_limit_mb == 900 and explicit.kill_budget_s == 7
    with pytest.raises(ValidationError, match="at least 256"):
        Settings(worker_memory_mb=100)


def test_pool_config_refuses_invisible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="not visible"):
        Settings(devices="7").pool_config()


def test_input_element_limit_follows_the_worker_memory_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.workers import config as pool_config

    # 8 GiB for two workers: a ceiling of (8192 * 0.75 - 512) / 2 = 2816 MiB, / 128 bytes an element
    monkeypatch.setattr(pool_config, "memory_available_mb", lambda: 8192)
    roomy = Settings(workers=2, devices="cpu", max_tensor_elements=50_000_000)
    assert roomy.limits().max_input_elements == 2816 * 2**20 // 128 == 23_068_672
    # ... capped by the intermediate-tensor limit (an input is a tensor too), 10M by default
    assert Settings(workers=2, devices="cpu").limits().max_input_elements == 10_000_000
    # four workers share the memory: the ceiling and the limit shrink with them
    quarter = Settings(workers=4, devices="cpu", max_tensor_elements=50_000_000)
    assert quarter.limits().max_input_elements == 1408 * 2**20 // 128
    # the smallest ceiling a worker may have (256 MiB) still takes 2**21; no ceiling (0: off) 2M
    assert Settings(workers=1, devices="cpu", worker_memory_mb=256).limits().max_input_elements == 2**21
    assert Settings(workers=1, devices="cpu", worker_memory_mb=0).limits().max_input_elements == 2_000_000
    # set explicitly, it is what it says, whatever the memory
    assert Settings(workers=2, devices="cpu", max_input_elements=1234).limits().max_input_elements == 1234
    # the workers are given the same limit the API checks
    assert Settings(workers=2, devices="cpu").pool_config().limits.max_input_elements == 10_000_000


def test_gradbench_lse_largest_input_passes_by_default() -> None:
    assert Settings().limits().max_input_elements >= 1_280_000

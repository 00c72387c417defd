"""Settings: environment variables, defaults equal to Limits, nonsense refused at start-up."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from service.api.settings import LIMIT_FIELDS, Settings
from service.limits import Limits


def test_every_limit_is_a_setting_with_the_same_default() -> None:
    settings = Settings()
    assert settings.limits() == Limits()
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
        {"no_such_setting": 1},
    ],
)
def test_nonsense_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)  # type: ignore[arg-type]


def test_pool_config_cpu_only() -> None:
    config = Settings(workers=2, devices="cpu", queue_size=7, request_timeout_s=12.5).pool_config()
    assert config.devices == ("cpu", "cpu")
    assert config.queue_size == 7
    assert config.default_timeout_s == 12.5
    assert config.limits == Limits()


def test_pool_config_refuses_invisible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="not visible"):
        Settings(devices="7").pool_config()

"""Access lines written straight to the service's JSON handler: the formatter's line, without a record.

configure_logging changes process-wide loggers, so every test here restores them afterwards.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from service.api import Settings, create_app
from service.api import logging as service_logging
from service.api.logging import ACCESS_LOGGER, configure_logging
from tests.api.fakes import FakePool

GRAD = {"expression": "sum(x**2)", "variables": {"x": [1.0, 2.0]}}
_LOGGERS = ("tapeserve", "uvicorn", "uvicorn.error", ACCESS_LOGGER)


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], io.StringIO]]:
    """``logs(format)``: configure_logging, its lines written to the returned stream.

    Called in the test itself: pytest attaches its capture handlers to non-propagating loggers at
    the start of each phase (so they see records: the record path), and sets sys.stderr again.
    """
    saved = {
        name: (logger.handlers[:], logger.level, logger.propagate, logger.filters[:])
        for name in _LOGGERS
        for logger in [logging.getLogger(name)]
    }
    saved_handler = service_logging._json_handler

    def configure(log_format: str) -> io.StringIO:
        out = io.StringIO()
        monkeypatch.setattr(sys, "stderr", out)
        configure_logging("info", log_format)
        return out

    try:
        yield configure
    finally:
        for name, (handlers, level, propagate, filters) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.level, logger.propagate, logger.filters = (
                handlers,
                level,
                propagate,
                filters,
            )
        service_logging._json_handler = saved_handler


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), pool=FakePool())) as c:
        yield c


def _access_entries(out: io.StringIO) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return [entry for entry in lines if entry.get("logger") == ACCESS_LOGGER]


def _record_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[logging.LogRecord]:
    """The access records that went through the logging machinery (Logger.handle)."""
    calls: list[logging.LogRecord] = []
    handle = service_logging.access_log.handle

    def spy(record: logging.LogRecord) -> None:
        calls.append(record)
        handle(record)

    monkeypatch.setattr(service_logging.access_log, "handle", spy)
    return calls


def test_direct_line_is_the_formatters_line(
    client: TestClient, logs: Callable[[str], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = logs("json")
    records = _record_path_calls(monkeypatch)
    assert client.post("/v1/gradient", json=GRAD, headers={"X-Request-ID": "direct-1"}).status_code == 200
    assert records == []  # written straight to the handler's stream
    # A filter on the access logger (any handler or filter would do) sends lines through the records again.
    service_logging.access_log.addFilter(lambda record: True)
    assert client.post("/v1/gradient", json=GRAD, headers={"X-Request-ID": "record-1"}).status_code == 200
    assert len(records) == 1
    direct, recorded = _access_entries(stderr)
    assert direct["request_id"] == "direct-1" and recorded["request_id"] == "record-1"
    # The same keys in the same order, the same values but for the time and the duration.
    assert list(direct) == list(recorded) == [
        "time", "level", "logger", "message", "request_id", "method", "route", "status", "duration_ms",
    ]  # fmt: skip
    for entry in (direct, recorded):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry.pop("time"))
        duration = entry.pop("duration_ms")
        assert duration > 0 and entry.pop("message") == f"POST /v1/gradient 200 {duration:.1f} ms"
        entry.pop("request_id")
    assert direct == recorded == {
        "level": "info", "logger": ACCESS_LOGGER, "method": "POST", "route": "/v1/gradient", "status": 200,
    }  # fmt: skip


@pytest.mark.parametrize(
    "divert",
    [
        lambda handler: logging.getLogger(ACCESS_LOGGER).addHandler(logging.NullHandler()),
        lambda handler: handler.addFilter(lambda record: True),
        lambda handler: handler.setLevel(logging.WARNING),
        lambda handler: logging.getLogger("tapeserve").addHandler(logging.NullHandler()),
        lambda handler: setattr(logging.getLogger(ACCESS_LOGGER), "propagate", False),
    ],
    ids=["access-handler", "handler-filter", "handler-level", "second-handler", "no-propagation"],
)
def test_any_other_logging_setup_gets_records(
    client: TestClient, logs: Callable[[str], io.StringIO], monkeypatch: pytest.MonkeyPatch, divert: Any
) -> None:
    logs("json")
    records = _record_path_calls(monkeypatch)
    divert(service_logging._json_handler)
    assert client.get("/v1/functions").status_code == 200
    assert len(records) == 1 and records[0].route == "/v1/functions"  # type: ignore[attr-defined]


def test_a_broken_stream_is_reported_as_logging_reports_it(
    client: TestClient, logs: Callable[[str], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError("the log reader went away")

    stderr = logs("json")
    records = _record_path_calls(monkeypatch)
    handler = service_logging._json_handler
    assert handler is not None
    handler.setStream(Broken())
    assert client.post("/v1/gradient", json=GRAD).status_code == 200  # the answer is unaffected
    assert len(records) == 1  # the direct write failed; the record path reported it
    assert "--- Logging error ---" in stderr.getvalue() and "BrokenPipeError" in stderr.getvalue()


def test_text_format_keeps_records(
    client: TestClient, logs: Callable[[str], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = logs("text")
    records = _record_path_calls(monkeypatch)
    assert client.get("/v1/functions").status_code == 200
    assert len(records) == 1
    assert "tapeserve.access: GET /v1/functions 200" in stderr.getvalue()

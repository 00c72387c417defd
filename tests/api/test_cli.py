"""The `tapeserve` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import build_parser
from tests.conftest import ROOT


def test_serve_arguments() -> None:
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--workers", "2"])
    assert (args.command, args.host, args.port, args.workers) == ("serve", "0.0.0.0", 9000, 2)


def test_a_subcommand_is_required() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_invalid_configuration_exits_2_without_starting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "99999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "port" in result.stderr


def test_serve_without_the_server_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in a client-only install: the server's modules are not found (tests/distribution does it for real).
    import importlib.util

    from service import cli

    real_find_spec = importlib.util.find_spec
    absent = {"uvicorn", "tensorflow"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a)
    )
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "[server]'" in err and "pip install '" in err
    assert "uvicorn" in err and "tensorflow" in err

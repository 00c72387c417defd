"""The `tapeserve` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import _build_parser
from tests.conftest import ROOT


def test_serve_arguments() -> None:
    args = _build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--workers", "2"])
    assert (args.command, args.host, args.port, args.workers) == ("serve", "0.0.0.0", 9000, 2)


def test_a_subcommand_is_required() -> None:
    with pytest.raises(SystemExit):
        _build_parser().parse_args([])


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

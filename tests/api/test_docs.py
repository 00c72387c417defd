"""README.md stays true: its settings and limits tables are generated from Settings."""

from __future__ import annotations

import subprocess
import sys

from service.api.settings import Settings
from tests.conftest import ROOT


def test_readme_tables_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/settings_table.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_names_every_setting() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`TAPESERVE_{name.upper()}`" in readme
    assert "make run" in readme and "make test" in readme

"""The real engine in a real worker, driven from a separate process that must never import TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.tolerances import FLOAT32_CLOSED_FORM, approx
from tests.workers.conftest import ROOT


@pytest.mark.slow
def test_gradient_through_the_real_engine_keeps_tensorflow_out_of_the_parent() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.workers.pool_process", "engine"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # TF start-up in the worker is ~5 s here; generous for a loaded CI machine
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ready"] is True
    assert report["value"] == approx(14.0, FLOAT32_CLOSED_FORM)
    assert report["gradient"] == approx([2.0, 4.0, 6.0], FLOAT32_CLOSED_FORM) and report["dtype"] == "float32"
    # Same signature again: the worker's compiled program is reused.
    second = report["second_gradient"]
    assert second == approx([4.0, 8.0, 12.0], FLOAT32_CLOSED_FORM) and report["second_cache"] == "hit"
    assert report["error"]["class"] == "ParseError" and report["error"]["status"] == 400
    assert report["worker"]["jobs"] == 3 and report["worker"]["restarts"] == 0
    assert report["parent_tensorflow"] == []

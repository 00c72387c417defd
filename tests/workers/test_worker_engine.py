"""The real engine in a real worker, driven from a separate process that must never import TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
    assert report["value"] == pytest.approx(14.0)
    assert report["gradient"] == pytest.approx([2.0, 4.0, 6.0]) and report["dtype"] == "float32"
    # Same signature again: the worker's compiled program is reused.
    assert report["second_gradient"] == pytest.approx([4.0, 8.0, 12.0]) and report["second_cache"] == "hit"
    assert report["error"]["class"] == "ParseError" and report["error"]["status"] == 400
    assert report["worker"]["jobs"] == 3 and report["worker"]["restarts"] == 0
    assert report["parent_tensorflow"] == []

"""The worker's warm-up (service/engine/warmup.py) leaves TensorFlow and Keras frozen out of the
garbage collector's reach, so full collections in jobs scan only what jobs created."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc
from service.engine.warmup import warmup
warmup()
print(gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_warmup_freezes_what_imports_and_warm_up_leave() -> None:
    # A process of its own: freezing is for the life of a process.
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    frozen, tracked = (int(n) for n in done.stdout.split())
    assert frozen > 100_000  # TensorFlow and Keras alone are a few 10^5 objects
    assert tracked < frozen / 10

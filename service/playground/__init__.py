"""The playground's static files (page, script, style, vendored uPlot and Swagger UI); no Python logic.

``service.api.routes.playground`` serves them; this package only says where they are.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PLAYGROUND_DIR", "STATIC_SUFFIXES"]

PLAYGROUND_DIR = Path(__file__).resolve().parent
# What the static mount may hand out: the package's own .py files and caches are not web assets.
STATIC_SUFFIXES = frozenset({".html", ".js", ".css", ".txt", ".md"})

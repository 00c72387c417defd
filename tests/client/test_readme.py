"""The client examples of README.md and docs/client.md run as written against a live server."""

from __future__ import annotations

import re

import numpy as np

from tests.conftest import ROOT, LiveServer


def _python_block(text: str, url: str) -> str:
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    return code.group(1).replace("http://127.0.0.1:8000", url)


def test_the_readme_quick_start_runs(ready_server: LiveServer) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    namespace: dict[str, object] = {}
    source = _python_block(readme.split("## Quick start\n", 1)[1], ready_server.url)
    exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 - our own README, not user text
    # Rosenbrock at (1.5, -0.5, 2): the closed forms the README's curl example shows.
    assert namespace["value"] == 1065.0
    np.testing.assert_allclose(namespace["grads"]["x"], [1651.0, -203.0, 350.0])  # type: ignore[index]
    np.testing.assert_allclose(namespace["hessian"], [[2902, -600, 0], [-600, -298, 200], [0, 200, 200]])


def test_the_client_docs_example_runs(ready_server: LiveServer) -> None:
    page = (ROOT / "docs" / "client.md").read_text(encoding="utf-8")
    source = _python_block(page.split("## Client\n", 1)[1], ready_server.url)
    namespace: dict[str, object] = {}
    exec(compile(source, "docs/client.md", "exec"), namespace)  # noqa: S102 - our own docs, not user text
    result = namespace["run"].result  # type: ignore[attr-defined]
    assert result is not None and result.steps == 500 and result.loss < 1e-3

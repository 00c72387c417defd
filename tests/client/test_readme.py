"""README's client quick-start runs as written against a live server."""

from __future__ import annotations

import re

from tests.conftest import ROOT, LiveServer


def test_the_readme_client_example_runs(ready_server: LiveServer) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Client\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000", ready_server.url)
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 - our own README, not user text
    result = namespace["run"].result  # type: ignore[attr-defined]
    assert result is not None and result.steps == 500 and result.loss < 1e-3

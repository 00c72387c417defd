"""Importing the client (and using it) pulls in none of the server: no TensorFlow, FastAPI or service.api."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def test_the_client_imports_nothing_of_the_server() -> None:
    script = textwrap.dedent(
        """
        import sys
        import httpx
        import service.client as ts
        x = ts.Var("x")
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"status": "ok"}))
        with ts.Client("http://t.test", transport=transport) as client:
            client.health()
        str(ts.sum(ts.sin(x) ** 2))
        banned = ("tensorflow", "keras", "fastapi", "starlette", "uvicorn", "pydantic_settings", "orjson")
        leaked = sorted(
            m for m in sys.modules
            if m.split(".")[0] in banned
            or m.startswith(("service.api", "service.engine", "service.expr", "service.workers"))
            or m.startswith("service.models")
        )
        print(",".join(leaked) or "clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_the_cli_client_commands_import_nothing_of_the_server() -> None:
    script = textwrap.dedent(
        """
        import sys
        from service.cli import main
        code = main(["health", "--url", "http://127.0.0.1:9", "--timeout", "0.5"])
        assert code == 3, code
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "fastapi", "uvicorn")
                        or m.startswith(("service.api", "service.engine", "service.workers")))
        print(",".join(leaked) or "clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "clean"

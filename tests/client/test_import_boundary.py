"""Importing the client (and using it) pulls in none of the server: no TensorFlow, FastAPI or service.api."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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


# The client's import rule (service/client/__init__.py): of the server side, only the base modules that
# anyone may import. Every module of the package is listed from the folder, so a new one is checked too.
BASE_MODULES = ("service", "service.errors", "service.limits", "service.tensorcodec")
CLIENT_MODULES = sorted(
    f"service.client.{path.stem}"
    for path in (ROOT / "service" / "client").glob("_*.py")
    if path.stem != "__init__"
)


@pytest.mark.parametrize("module", CLIENT_MODULES)
def test_each_client_module_imports_only_the_base_modules_of_the_server(module: str) -> None:
    script = textwrap.dedent(
        f"""
        import importlib, sys
        importlib.import_module({module!r})
        banned = ("tensorflow", "keras", "fastapi", "starlette", "uvicorn", "pydantic_settings", "orjson")
        leaked = sorted(
            m for m in sys.modules
            if m.split(".")[0] in banned
            or (m.startswith("service") and m not in {BASE_MODULES!r} and not m.startswith("service.client"))
        )
        print(",".join(leaked) or "clean")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_the_sans_io_core_is_among_the_modules_checked() -> None:
    assert {"service.client._core", "service.client._endpoints", "service.client._wire"} <= set(
        CLIENT_MODULES
    )


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

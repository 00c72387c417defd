"""The package as a client-only user gets it: README's install lines, run as written (from a temp
`dist/`), build the wheel and sdist and install the wheel with `[cli]` into a clean venv; its SDK and
`tapeserve` command then talk to a live server, and `tapeserve serve` names the extra it lacks."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, LiveServer

# Ceilings, not expectations: building takes ~5 s and the install ~10 s from pip's cache when idle.
BUILD_CEILING_S = 300
INSTALL_CEILING_S = 600
RUN_CEILING_S = 120

_INSTALL_BLOCK = re.compile(r"<!-- install:start.*?-->\s*```sh\n(.*?)```\s*<!-- install:end -->", re.S)


@dataclass
class InstallLines:
    build: list[str]
    client: list[str]
    server: list[str]


def readme_install_lines() -> InstallLines:
    """The commands of README's install block (comments dropped), split as a shell would."""
    match = _INSTALL_BLOCK.search((ROOT / "README.md").read_text())
    assert match, "README.md has no <!-- install:start --> ... <!-- install:end --> sh block"
    lines = [shlex.split(line, comments=True) for line in match[1].splitlines() if line.strip()]
    assert len(lines) == 3, lines
    build, client, server = lines
    assert build == ["python", "-m", "build"], build
    for line, extra in ((client, "[cli]"), (server, "[server]")):
        assert line[:2] == ["pip", "install"] and len(line) == 3, line
        assert line[2].startswith("dist/") and line[2].endswith(".whl" + extra), line
    return InstallLines(build, client, server)


@dataclass
class ClientVenv:
    python: Path
    tapeserve: Path
    env: dict[str, str]
    dist: Path

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=self.dist.parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_CEILING_S,
        )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientVenv]:
    lines = readme_install_lines()
    work = tmp_path_factory.mktemp("packaging")
    dist = work / "dist"
    # README's `python -m build`, with its output in the temp dist/ rather than the checkout's.
    build = subprocess.run(
        [sys.executable, *lines.build[1:], "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_CEILING_S,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    # A clean venv: not this one's packages, not the checkout on the path.
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_CEILING_S)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # README's client line as written, run next to the temp dist/ (the path in it is relative).
    install = subprocess.run(
        [str(venv / "bin" / "pip"), *lines.client[1:]],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_CEILING_S,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield ClientVenv(venv / "bin" / "python", venv / "bin" / "tapeserve", env, dist)


def test_build_makes_a_wheel_and_an_sdist_named_as_in_the_readme(client_venv: ClientVenv) -> None:
    lines = readme_install_lines()
    built = sorted(p.name for p in client_venv.dist.iterdir())
    wheel = lines.client[2].removeprefix("dist/").removesuffix("[cli]")
    assert wheel == lines.server[2].removeprefix("dist/").removesuffix("[server]")
    assert built == sorted([wheel, wheel.split("-py3")[0] + ".tar.gz"]), built
    with zipfile.ZipFile(client_venv.dist / wheel) as archive:
        names = set(archive.namelist())
    # Code and the playground's files (package data) are in; the tests are not.
    code = {"service/client/__init__.py", "service/cli/__init__.py", "service/cli/__main__.py"}
    assert code | {"service/playground/index.html"} <= names
    assert not any(name.startswith("tests/") for name in names)


def test_the_install_is_client_only(client_venv: ClientVenv) -> None:
    script = textwrap.dedent(
        """
        import json, service
        from importlib.util import find_spec
        print(json.dumps({
            "service": service.__file__,
            "present": [m for m in ("httpx", "pydantic", "numpy", "rich") if find_spec(m)],
            "absent": [m for m in ("fastapi", "uvicorn", "tensorflow", "redis") if not find_spec(m)],
        }))
        """
    )
    result = client_venv.run(client_venv.python, "-c", script)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["service"].startswith(str(client_venv.python.parents[1])), found  # not the checkout
    assert found["present"] == ["httpx", "pydantic", "numpy", "rich"]
    assert found["absent"] == ["fastapi", "uvicorn", "tensorflow", "redis"]


def test_sdk_from_the_wheel_against_a_live_server(client_venv: ClientVenv, ready_server: LiveServer) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        import service.client as ts
        with ts.Client({ready_server.url!r}, timeout=60.0) as client:
            grad = client.gradient("sum(x**2)", x=[1.0, 2.0, 3.0])
            hess = client.hessian("sum(x**3)", x=[1.0, 2.0], dtype="float64")
        print(json.dumps({{"grad": grad["x"].tolist(), "hess": hess["x"]["x"].tolist(),
                          "tf": "tensorflow" in sys.modules}}))
        """
    )
    result = client_venv.run(client_venv.python, "-c", script)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["grad"] == [2.0, 4.0, 6.0]
    assert answer["hess"] == [[6.0, 0.0], [0.0, 12.0]]  # diag(6x)
    assert answer["tf"] is False


def test_cli_from_the_wheel_against_a_live_server(client_venv: ClientVenv, ready_server: LiveServer) -> None:
    url = ["--url", ready_server.url]
    result = client_venv.run(
        client_venv.tapeserve, "grad", "sum(x**2)", "--var", "x=1,2,3", "--hessian", "--json", *url
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["value"] == 14.0 and body["gradient"]["x"] == [2.0, 4.0, 6.0]
    assert body["hessian"]["x"]["x"] == [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    health = client_venv.run(client_venv.tapeserve, "health", *url)
    assert health.returncode == 0, health.stdout + health.stderr
    # An API error is exit 1 with the problem's message, a parse error with its caret.
    bad = client_venv.run(client_venv.tapeserve, "grad", "sum(x**", "--var", "x=1", *url)
    assert bad.returncode == 1 and "^" in bad.stderr, bad.stderr


def test_serve_without_the_server_extra_prints_the_readme_line(client_venv: ClientVenv) -> None:
    result = client_venv.run(client_venv.tapeserve, "serve")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr, result.stderr
    assert "uvicorn" in result.stderr  # names what is missing
    server_line = shlex.join(readme_install_lines().server)
    assert server_line in result.stderr, (server_line, result.stderr)

"""The Dockerfile without a Docker engine: hadolint, and the properties the deployment relies on
(pinned bases, dependency layer before the code, non-root user, health check, exec-form command)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.deploy.support import venv_tool

DOCKERFILE = ROOT / "Dockerfile"

# deploy/ is no package (the image runs the script bare), so it is loaded from its path.
_spec = importlib.util.spec_from_file_location("requirements_script", ROOT / "deploy/docker/requirements.py")
assert _spec is not None and _spec.loader is not None
_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_script)
requirements = _script.requirements


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            current = [(keyword, rest)]
            stages[rest.split(" AS ")[-1].strip()] = current
        else:
            current.append((keyword, rest))
    return stages


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_tool("hadolint")), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_finds_nothing() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_an_unpinned_base(tmp_path: Path) -> None:
    # The control: the linter runs and fails on what it should (latest tag, apt without pins, no user).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD tapeserve serve\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def test_targets_and_pinned_bases() -> None:
    stages = _stages()
    assert {"cpu", "gpu", "runtime", "build-cpu", "build-gpu"} <= set(stages)
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert default, "the base image is an ARG with a default"
    # A patch-level tag: python:3.11.X-slim-<debian>, never a floating 3.11 or latest.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", default[1]), default[1]
    # The last stage is what `docker build .` gives: the GPU image.
    assert list(stages)[-1] == "gpu"


@pytest.mark.parametrize(("target", "extra"), [("build-cpu", "server"), ("build-gpu", "gpu")])
def test_dependencies_are_installed_before_the_code_is_copied(target: str, extra: str) -> None:
    steps = _stages()[target]
    install = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "-r requirements.txt" in rest)
    assert f"requirements.py {extra}" in steps[install][1]
    copy_code = next(i for i, (k, rest) in enumerate(steps) if k == "COPY" and rest.startswith("service/"))
    assert install < copy_code
    # Only pyproject.toml and the script reach the dependency layer (plus the base stage's venv).
    copies_before = [rest for k, rest in _stages()["deps"] if k == "COPY"]
    assert copies_before == ["pyproject.toml deploy/docker/requirements.py ./"]
    assert any(k == "RUN" and "--no-deps ." in rest for k, rest in steps[copy_code:])


def test_runtime_runs_as_non_root_with_health_check_and_exec_command() -> None:
    runtime = dict(_stages()["runtime"])
    user = runtime["USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert "useradd --system --uid " + user.split(":")[0] in runtime["RUN"]
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert runtime["EXPOSE"] == "8000"
    health = runtime["HEALTHCHECK"]
    assert "http://127.0.0.1:8000/healthz" in health and " CMD [" in health
    command = json.loads(runtime["CMD"])  # exec form is a JSON array
    assert command == ["tapeserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
    for flavour, build in (("cpu", "build-cpu"), ("gpu", "build-gpu")):
        assert _stages()[flavour][0] == ("FROM", f"runtime AS {flavour}")
        assert ("COPY", f"--from={build} /opt/venv /opt/venv") in _stages()[flavour]


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything is excluded unless re-included"
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and not rest.startswith("--from"):
            copied.update(part.rstrip("/") for part in rest.split()[:-1])
    assert copied == included, (copied, included)


def test_requirements_expand_the_projects_own_extras() -> None:
    with (ROOT / "pyproject.toml").open("rb") as file:
        pyproject = tomllib.load(file)
    server = requirements(pyproject, "server")
    gpu = requirements(pyproject, "gpu")
    for requirement_list in (server, gpu):
        assert not any(r.startswith("tapeserve") for r in requirement_list), requirement_list
        assert set(pyproject["project"]["dependencies"]) <= set(requirement_list)
        assert set(pyproject["project"]["optional-dependencies"]["api"]) <= set(requirement_list)
    assert any(r.startswith("tensorflow-cpu") for r in server)
    assert any(r.startswith("tensorflow[and-cuda]") for r in gpu)
    assert not any(r.startswith("tensorflow-cpu") for r in gpu)
    with pytest.raises(SystemExit, match="no extra 'nope'"):
        requirements(pyproject, "nope")


def test_requirements_script_runs_bare_as_the_dockerfile_calls_it(tmp_path: Path) -> None:
    # In the image it runs with the base interpreter from the build directory, without the project.
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    script = ROOT / "deploy" / "docker" / "requirements.py"
    result = subprocess.run(
        [sys.executable, "-I", str(script), "gpu"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    with (ROOT / "pyproject.toml").open("rb") as file:
        assert result.stdout.splitlines() == requirements(tomllib.load(file), "gpu")

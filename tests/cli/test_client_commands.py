"""The client commands of `tapeserve` run as subprocesses against a live server: output, --json, error
messages with the caret snippet, and exit codes (0 ok, 1 API error, 2 usage, 3 unreachable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, LiveServer
from tests.tolerances import CONVERGED, assert_close


def tapeserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TAPESERVE_")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )


def test_grad_json_with_hessian(ready_server: LiveServer) -> None:
    done = tapeserve("grad", "sum(x**3)", "--var", "x=1,2,3", "--hessian", "--dtype", "float64", "--json",
                     "--url", ready_server.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["value"] == 36.0 and body["gradient"]["x"] == [3.0, 12.0, 27.0]
    assert body["hessian"]["x"]["x"] == np.diag([6.0, 12.0, 18.0]).tolist()
    assert body["meta"]["executor"] in ("tensorflow", "numpy")


def test_grad_table_reads_the_url_from_the_environment(ready_server: LiveServer) -> None:
    args = ["grad", "sum(x*y)", "--var", "x=[[1,2],[3,4]]", "--var", "y=2", "--order", "2", "--wrt", "y"]
    done = tapeserve(*args, env={"TAPESERVE_URL": ready_server.url})
    assert done.returncode == 0, done.stderr
    assert "value" in done.stdout and "gradient" in done.stdout and "derivative 2" in done.stdout
    assert "10." in done.stdout  # d/dy sum(x*y) = sum(x) = 10


def test_grad_reads_npy_files(ready_server: LiveServer, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([0.5, -1.0]))
    done = tapeserve(
        "grad", "sum(x**2)", "--var", f"x=@{tmp_path / 'x.npy'}", "--json", "--url", ready_server.url
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gradient"]["x"] == [1.0, -2.0]


def test_a_parse_error_prints_the_caret_and_exits_1(ready_server: LiveServer) -> None:
    done = tapeserve("grad", "sum(x +", "--var", "x=1,2", "--url", ready_server.url)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith("tapeserve: parse_error: the expression ends too early")
    assert lines[1:3] == ["sum(x +", "       ^"]


def test_an_error_with_json_prints_the_problem(ready_server: LiveServer) -> None:
    done = tapeserve("grad", "sum(xx)", "--var", "x=1", "--json", "--url", ready_server.url)
    assert done.returncode == 1
    problem = json.loads(done.stderr)
    assert problem["code"] == "unknown_name" and problem["status"] == 400 and "x" in problem["suggestions"]


def test_bad_usage_exits_2() -> None:
    done = tapeserve("grad", "sum(x)", "--var", "x=1,abc", "--url", "http://127.0.0.1:9")
    assert done.returncode == 2 and "--var x" in done.stderr and "not a tensor" in done.stderr
    done = tapeserve("grad", "sum(x)", "--var", "x")
    assert done.returncode == 2 and "NAME=VALUE" in done.stderr
    assert tapeserve("grad").returncode == 2  # argparse: the expression is missing


def test_unreachable_server_exits_3() -> None:
    done = tapeserve("health", "--url", "http://127.0.0.1:9", "--timeout", "1")
    assert done.returncode == 3 and "cannot reach http://127.0.0.1:9" in done.stderr


def test_functions_and_health(ready_server: LiveServer) -> None:
    done = tapeserve("functions", "--json", "--url", ready_server.url)
    assert done.returncode == 0
    names = {f["name"] for f in json.loads(done.stdout)["functions"]}
    assert {"sin", "logsumexp"} <= names
    table = tapeserve("functions", "--category", "linalg", "--url", ready_server.url)
    assert table.returncode == 0 and "cholesky(x)" in table.stdout and "sin(x)" not in table.stdout
    assert tapeserve("functions", "--category", "nope", "--url", ready_server.url).returncode == 2
    health = tapeserve("health", "--json", "--url", ready_server.url)
    assert health.returncode == 0
    assert json.loads(health.stdout)["readiness"]["status"] == "ready"
    assert "ready" in tapeserve("health", "--url", ready_server.url).stdout


@pytest.fixture
def train_files(tmp_path: Path) -> tuple[Path, Path]:
    spec = {
        "model": {"input_shape": [2], "layers": [{"type": "dense", "units": 1}], "seed": 3},
        "optimizer": {"type": "sgd", "learning_rate": 0.1},
        "loss": "mse",
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2))
    np.savez(tmp_path / "data.npz", x=x, y=x @ np.array([[2.0], [-1.0]]) + 0.5)
    return tmp_path / "spec.json", tmp_path / "data.npz"


def test_train_streams_progress_and_saves_weights(
    ready_server: LiveServer, train_files: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, data = train_files
    out = tmp_path / "weights.npz"
    done = tapeserve("train", str(spec), "--data", str(data), "--steps", "200", "--out", str(out), "--json",
                     "--url", ready_server.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 200 and summary["loss"] < 0.01 * summary["first_loss"]
    with np.load(out) as saved:
        assert_close(saved["weight_0"].ravel(), [2.0, -1.0], CONVERGED, "kernel vs the generating one")
        assert_close(saved["weight_1"], [0.5], CONVERGED, "bias vs the generating one")
    # Without --json: the progress bar (rich) on stderr, a summary table on stdout.
    done = tapeserve(
        "train", str(spec), "--data", str(data), "--steps", "20", "--every", "5", "--url", ready_server.url
    )
    assert done.returncode == 0, done.stderr
    assert "20/20" in done.stderr and "loss (last step)" in done.stdout


def test_train_with_a_bad_spec_exits_1_naming_the_field(ready_server: LiveServer, tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(
        json.dumps({"input_shape": [2], "layers": [{"type": "dense", "units": 0}]})
    )
    np.savez(tmp_path / "data.npz", x=np.ones((4, 2)), y=np.ones((4, 1)))
    done = tapeserve(
        "train", str(tmp_path / "spec.json"), "--data", str(tmp_path / "data.npz"), "--url", ready_server.url
    )
    assert done.returncode == 1 and "invalid_request" in done.stderr and "units" in done.stderr
    missing = tapeserve("train", str(tmp_path / "nope.json"), "--data", str(tmp_path / "data.npz"))
    assert missing.returncode == 2 and "cannot read the spec" in missing.stderr


def test_without_rich_the_output_is_plain_text(
    ready_server: LiveServer, train_files: tuple[Path, Path]
) -> None:
    spec, data = train_files
    script = (
        "import sys; sys.modules['rich'] = None; from service.cli import main; "  # rich not installed
        "sys.exit(main(sys.argv[1:]))"
    )
    base = [sys.executable, "-c", script]
    table = subprocess.run([*base, "functions", "--category", "linalg", "--url", ready_server.url],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == "Functions"
    assert "cholesky(x)" in table.stdout and "━" not in table.stdout and "│" not in table.stdout
    args = ["train", str(spec), "--data", str(data), "--steps", "10", "--url", ready_server.url]
    train = subprocess.run([*base, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr
    assert "step 10/10 loss" in train.stderr and "loss (last step)" in train.stdout

"""Models file and generic-model config: loading, every check and its message, without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.api.settings import Settings
from service.errors import InvalidRequest
from service.limits import Limits
from service.umbridge import GENERIC_MODEL, ModelsFileError, load_models_file, model_from_config
from service.umbridge.jobs import hessian_action_job, sens_name
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "models.yaml"


def _write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _model(**overrides: object) -> dict[str, object]:
    model: dict[str, object] = {
        "name": "m",
        "inputs": [{"name": "x", "size": 2}],
        "outputs": [{"expression": "sum(x**2)", "size": 1}],
    }
    model.update(overrides)
    return model


def _load_error(tmp_path: Path, *models: dict[str, object]) -> str:
    path = _write(tmp_path, json.dumps({"models": list(models)}), "models.json")
    with pytest.raises(ModelsFileError) as info:
        load_models_file(path, Limits())
    return str(info.value)


def test_example_file_loads_in_order_without_tensorflow() -> None:
    models = load_models_file(EXAMPLE, Limits())
    assert list(models) == ["arm", "banana", "linear_sine"]
    arm = models["arm"]
    assert arm.input_names == ("angles", "lengths")
    assert arm.input_sizes == (2, 2)
    assert arm.output_sizes == (2, 1)
    assert arm.server_side
    np.testing.assert_array_equal(models["linear_sine"].constants["A"][1], [-1.0, 2.0, -1.0])


def test_the_api_side_of_umbridge_never_imports_tensorflow() -> None:
    code = (
        "import sys, pathlib, service.api.routes.umbridge as r, service.umbridge as u;"
        "from service.limits import Limits;"
        f"u.load_models_file(pathlib.Path({str(EXAMPLE)!r}), Limits());"
        "print(any(m.startswith(('tensorflow', 'keras')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_operation_ids_are_stable() -> None:
    from service.api.openapi import openapi_document

    paths = openapi_document()["paths"]
    ids = {
        path: {m: op["operationId"] for m, op in ops.items()}
        for path, ops in paths.items()
        if "umbridge" in path
    }
    assert ids == {
        "/umbridge/Info": {"get": "umbridge_info"},
        "/umbridge/ModelInfo": {"post": "umbridge_model_info"},
        "/umbridge/InputSizes": {"post": "umbridge_input_sizes"},
        "/umbridge/OutputSizes": {"post": "umbridge_output_sizes"},
        "/umbridge/Evaluate": {"post": "umbridge_evaluate"},
        "/umbridge/Gradient": {"post": "umbridge_gradient"},
        "/umbridge/ApplyJacobian": {"post": "umbridge_apply_jacobian"},
        "/umbridge/ApplyHessian": {"post": "umbridge_apply_hessian"},
    }
    hessian = paths["/umbridge/ApplyHessian"]["post"]
    assert hessian["summary"] == "The Hessian of sens . F_outWrt, block (inWrt1, inWrt2), applied to vec."
    body = hessian["requestBody"]["content"]["application/json"]["schema"]
    assert {"name", "input", "outWrt", "inWrt1", "inWrt2", "sens", "vec"} <= set(body["required"])


def test_json_models_file_and_support_flags(tmp_path: Path) -> None:
    support = {"ApplyHessian": False}
    path = _write(tmp_path, json.dumps({"models": [_model(support=support)]}), "m.json")
    model = load_models_file(path, Limits())["m"]
    assert model.support == {"Evaluate": True, "Gradient": True, "ApplyJacobian": True, "ApplyHessian": False}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"outputs": [{"expression": "sum(x +", "size": 1}]}, "models[0].outputs[0].expression: "),
        ({"outputs": [{"expression": "sum(y)", "size": 1}]}, "unknown name 'y'"),
        ({"outputs": [{"expression": "x", "size": 0}]}, "models[0].outputs[0].size: "),
        ({"outputs": []}, "models[0].outputs: "),
        ({"inputs": [{"name": "x", "size": "2"}]}, "models[0].inputs[0].size: "),
        ({"inputs": [{"name": "sum", "size": 2}]}, "would hide the built-in"),
        ({"inputs": [{"name": "x", "size": 2_000_001}]}, "max_input_elements"),
        ({"constants": {"c": "abc"}}, "models[0].constants.c contains the string 'abc'"),
        ({"name": GENERIC_MODEL}, "the generic model's name"),
        ({"colour": "red"}, "models[0].colour: Extra inputs are not permitted"),
        (
            {
                "functions": {"f": {"params": ["z"], "body": "z +"}},
                "outputs": [{"expression": "f(x)", "size": 1}],
            },
            "models[0].functions.f.body: ",
        ),
    ],
)
def test_models_file_errors_name_the_place(
    tmp_path: Path, overrides: dict[str, object], expected: str
) -> None:
    message = _load_error(tmp_path, _model(**overrides))
    assert message.startswith(f"models file {tmp_path / 'models.json'}: ")
    assert expected in message


def test_parse_error_in_models_file_has_a_caret(tmp_path: Path) -> None:
    message = _load_error(tmp_path, _model(outputs=[{"expression": "sum(x +", "size": 1}]))
    assert "line 1, column" in message
    assert "^" in message.splitlines()[-1]


def test_duplicate_names_and_file_level_errors(tmp_path: Path) -> None:
    assert "'m' is used twice" in _load_error(tmp_path, _model(), _model())
    with pytest.raises(ModelsFileError, match="cannot be read"):
        load_models_file(tmp_path / "missing.yaml", Limits())
    with pytest.raises(ModelsFileError, match="is not valid YAML"):
        load_models_file(_write(tmp_path, "models: [\n  - {name: m"), Limits())
    with pytest.raises(ModelsFileError, match="is not valid JSON"):
        load_models_file(_write(tmp_path, "{", "m.json"), Limits())
    with pytest.raises(ModelsFileError, match="models: Field required"):
        load_models_file(_write(tmp_path, "other: 1\n"), Limits())


def test_yaml_is_data_only(tmp_path: Path) -> None:
    # A YAML tag that would build a Python object is refused by safe_load, not executed.
    path = _write(tmp_path, "models: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ModelsFileError, match="not valid YAML"):
        load_models_file(path, Limits())


def test_settings_refuse_a_broken_models_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path, json.dumps({"models": [_model(outputs=[{"expression": "x +", "size": 1}])]}), "m.json"
    )
    with pytest.raises(ValidationError, match=r"models\[0\]\.outputs\[0\]\.expression"):
        Settings(models=path)
    assert Settings(models=EXAMPLE).models == EXAMPLE
    assert Settings(models="").models is None  # type: ignore[arg-type]  # TAPESERVE_MODELS="" means unset


def test_cli_stops_at_start_up_with_the_message(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "models:\n  - name: m\n    inputs: [{name: x, size: 2}]\n    outputs: [{expression: 'y', size: 1}]\n",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0"],
        cwd=ROOT,
        env={"TAPESERVE_MODELS": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration" in proc.stderr
    assert "models[0].outputs[0].expression: unknown name 'y'" in proc.stderr


def test_generic_config_checks() -> None:
    limits = Limits()
    config = {"inputs": [{"name": "x", "size": 3}], "outputs": [{"expression": "x * 2", "size": 3}]}
    model = model_from_config(config, limits)
    assert (model.input_sizes, model.output_sizes, model.server_side) == ((3,), (3,), False)
    with pytest.raises(InvalidRequest, match="defined by its config"):
        model_from_config({}, limits)
    with pytest.raises(InvalidRequest, match=r"config\.outputs\[0\]\.expression: .*unknown name 'z'"):
        model_from_config({**config, "outputs": [{"expression": "z", "size": 1}]}, limits)
    with pytest.raises(InvalidRequest, match=r"config\.inputs: Field required"):
        model_from_config({"outputs": config["outputs"]}, limits)


def test_generic_config_keeps_function_order() -> None:
    # g calls f, so f must stay first: the cache key may not reorder the functions.
    config = {
        "inputs": [{"name": "x", "size": 1}],
        "outputs": [{"expression": "g(x)", "size": 1}],
        "functions": {"f": {"params": ["a"], "body": "a * 2"}, "g": {"params": ["b"], "body": "f(b) + 1"}},
    }
    assert model_from_config(config, Limits()).output_sizes == (1,)


def test_sens_constant_never_clashes() -> None:
    config = {
        "inputs": [{"name": "sens", "size": 1}, {"name": "x", "size": 2}],
        "outputs": [{"expression": "sens * x + sens_", "size": 2}],
        "constants": {"sens_": 1.0},
    }
    model = model_from_config(config, Limits())
    assert sens_name(model) == "sens__"
    job = hessian_action_job(model, 0, 1, 0, [np.ones(1), np.ones(2)], np.array([1.0, 2.0]), np.array([3.0]))
    assert job.wrt == ("x", "sens")
    np.testing.assert_array_equal(job.tangents["x"], [0.0, 0.0])
    np.testing.assert_array_equal(job.tangents["sens"], [3.0])
    assert set(job.constants) == {"sens_", "sens__"}

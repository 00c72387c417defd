"""The official `umbridge` client against a live tapeserve: values and derivatives against float64
finite differences of independent numpy models, support flags, the protocol's errors and shapes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import umbridge
import yaml

from tests.conftest import ROOT, LiveServer, start_server, stop_server
from tests.tolerances import CLOSED_FORM, FINITE_DIFFERENCE, SECOND_FINITE_DIFFERENCE, assert_close

Vectors = list[np.ndarray]
Model = Callable[[Vectors], Vectors]


# --- independent references: the example models written in numpy ----------------------------------


def arm(p: Vectors) -> Vectors:
    (a0, a1), (l0, l1) = p
    height = l0 * np.sin(a0) + l1 * np.sin(a0 + a1)
    return [np.array([l0 * np.cos(a0) + l1 * np.cos(a0 + a1), height]), np.array([2.0 * 9.81 * height])]


def banana(p: Vectors) -> Vectors:
    t0, t1 = p[0]
    a, b = 2.0, 0.2
    return [np.array([-0.5 * (t0 / a) ** 2 - 0.5 * (a * t1 - b * (t0**2 + a**2)) ** 2])]


A = np.array([[2.0, -1.0, 0.0], [-1.0, 2.0, -1.0], [0.0, -1.0, 2.0]])


def linear_sine(p: Vectors) -> Vectors:
    return [A @ p[0] + np.sin(p[0])]


def two_by_two(p: Vectors) -> Vectors:
    x, y = p
    return [
        np.array([x[0] * y[0] ** 2, np.exp(x[1]) * y[1], x[0] * x[1] * y[0]]),
        np.array([np.sum(x**3 * y)]),
    ]


GENERIC_CONFIG = {
    "inputs": [{"name": "x", "size": 2}, {"name": "y", "size": 2}],
    "outputs": [
        {"expression": "stack([x[0] * y[0]**2, exp(x[1]) * y[1], x[0] * x[1] * y[0]])", "size": 3},
        {"expression": "sum(x**3 * y)", "size": 1},
    ],
}

CASES: dict[str, tuple[Model, Vectors, dict[str, Any]]] = {
    "arm": (arm, [np.array([0.3, 0.5]), np.array([1.0, 2.0])], {}),
    "banana": (banana, [np.array([0.7, -0.4])], {}),
    "linear_sine": (linear_sine, [np.array([0.1, -0.7, 1.3])], {}),
    "expression": (two_by_two, [np.array([0.4, -0.3]), np.array([1.2, 0.6])], GENERIC_CONFIG),
}

H = 1e-5  # central differences in float64: truncation ~h^2, rounding ~1e-16/h


def _shift(p: Vectors, i: int, direction: np.ndarray, h: float) -> Vectors:
    out = [v.copy() for v in p]
    out[i] = out[i] + h * direction
    return out


def fd_jacobian_action(f: Model, p: Vectors, out: int, inp: int, vec: np.ndarray) -> np.ndarray:
    return (f(_shift(p, inp, vec, H))[out] - f(_shift(p, inp, vec, -H))[out]) / (2 * H)


def fd_gradient(f: Model, p: Vectors, out: int, inp: int, sens: np.ndarray, h: float = H) -> np.ndarray:
    basis = np.eye(p[inp].size)
    return np.array(
        [
            (sens @ f(_shift(p, inp, e, h))[out] - sens @ f(_shift(p, inp, e, -h))[out]) / (2 * h)
            for e in basis
        ]
    )


def fd_hessian_action(
    f: Model, p: Vectors, out: int, inp1: int, inp2: int, sens: np.ndarray, vec: np.ndarray
) -> np.ndarray:
    # d/dx_inp2 [grad_inp1 (sens . F)] . vec, both derivatives by central differences.
    h = 1e-4
    plus = fd_gradient(f, _shift(p, inp2, vec, h), out, inp1, sens, h)
    minus = fd_gradient(f, _shift(p, inp2, vec, -h), out, inp1, sens, h)
    return (plus - minus) / (2 * h)


# --- the server --------------------------------------------------------------------------------------

EXTRA_MODELS = [
    {
        "name": "no_hessian",
        "inputs": [{"name": "x", "size": 1}],
        "outputs": [{"expression": "x**2", "size": 1}],
        "support": {"ApplyHessian": False, "ApplyJacobian": False},
    },
    {"name": "wrong_size", "inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "x", "size": 3}]},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("umbridge")
    models = yaml.safe_load((ROOT / "examples" / "models.yaml").read_text())
    models["models"] += EXTRA_MODELS
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    live = start_server(tmp, env={"TAPESERVE_MODELS": str(path), "TAPESERVE_MAX_BODY_BYTES": "200000"})
    try:
        live.wait_ready()
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def url(server: LiveServer) -> str:
    return f"{server.url}/umbridge"


def _model(url: str, name: str) -> umbridge.HTTPModel:
    return umbridge.HTTPModel(url, name)


def _lists(p: Vectors) -> list[list[float]]:
    return [v.tolist() for v in p]


def _post(url: str, path: str, body: Any) -> httpx.Response:
    # As the conformance tests do: a JSON text without a Content-Type header.
    return httpx.post(f"{url}/{path}", content=json.dumps(body), timeout=60.0)


def _assert_error(response: httpx.Response, type_: str, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_, body
    assert fragment in body["error"]["message"]


# --- discovery ---------------------------------------------------------------------------------------


def test_info_lists_the_file_models_then_the_generic_one(url: str) -> None:
    info = httpx.get(f"{url}/Info").json()
    assert info == {
        "protocolVersion": 1.0,
        "models": ["arm", "banana", "linear_sine", "no_hessian", "wrong_size", "expression"],
    }
    assert umbridge.supported_models(url) == info["models"]


def test_support_flags(url: str) -> None:
    arm_model = _model(url, "arm")
    assert arm_model.supports_evaluate() and arm_model.supports_gradient()
    assert arm_model.supports_apply_jacobian() and arm_model.supports_apply_hessian()
    limited = _model(url, "no_hessian")
    assert limited.supports_evaluate() and limited.supports_gradient()
    assert not limited.supports_apply_jacobian() and not limited.supports_apply_hessian()
    assert _model(url, "expression").supports_apply_hessian()
    body = {
        "name": "no_hessian",
        "input": [[1.0]],
        "outWrt": 0,
        "inWrt1": 0,
        "inWrt2": 0,
        "sens": [1.0],
        "vec": [1.0],
    }
    _assert_error(_post(url, "ApplyHessian", body), "UnsupportedFeature", 400, "ApplyHessian")
    _assert_error(_post(url, "ApplyJacobian", {"name": "no_hessian"}), "UnsupportedFeature", 400)


def test_sizes_of_named_models(url: str) -> None:
    model = _model(url, "arm")
    assert model.get_input_sizes() == [2, 2]
    assert model.get_output_sizes() == [2, 1]
    assert _model(url, "linear_sine").get_output_sizes({}) == [3]


def test_generic_model_sizes_follow_its_config(url: str) -> None:
    model = _model(url, "expression")
    assert model.get_input_sizes(GENERIC_CONFIG) == [2, 2]
    assert model.get_output_sizes(GENERIC_CONFIG) == [3, 1]
    other = {"inputs": [{"name": "z", "size": 5}], "outputs": [{"expression": "z[:2]", "size": 2}]}
    assert model.get_input_sizes(other) == [5]
    assert model.get_output_sizes(other) == [2]
    _assert_error(
        _post(url, "InputSizes", {"name": "expression"}), "InvalidInput", 400, "defined by its config"
    )


# --- values and derivatives against finite differences -------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_evaluate(url: str, name: str) -> None:
    reference, point, config = CASES[name]
    output = _model(url, name)(_lists(point), config)
    expected = reference(point)
    assert [len(v) for v in output] == [len(v) for v in expected]
    for i, (got, want) in enumerate(zip(output, expected, strict=True)):
        assert_close(got, want, CLOSED_FORM, f"output {i}")


def _indices(reference: Model, point: Vectors) -> Iterator[tuple[int, int]]:
    for out in range(len(reference(point))):
        for inp in range(len(point)):
            yield out, inp


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_is_j_transpose_sens(url: str, name: str) -> None:
    reference, point, config = CASES[name]
    model = _model(url, name)
    rng = np.random.default_rng(7)
    for out, inp in _indices(reference, point):
        sens = rng.normal(size=reference(point)[out].size)
        got = model.gradient(out, inp, _lists(point), sens.tolist(), config)
        want = fd_gradient(reference, point, out, inp, sens)
        assert_close(got, want, FINITE_DIFFERENCE, f"output {out}, input {inp}")


@pytest.mark.parametrize("name", list(CASES))
def test_apply_jacobian_is_j_vec(url: str, name: str) -> None:
    reference, point, config = CASES[name]
    model = _model(url, name)
    rng = np.random.default_rng(11)
    for out, inp in _indices(reference, point):
        vec = rng.normal(size=point[inp].size)
        got = model.apply_jacobian(out, inp, _lists(point), vec.tolist(), config)
        want = fd_jacobian_action(reference, point, out, inp, vec)
        assert_close(got, want, FINITE_DIFFERENCE, f"output {out}, input {inp}")


@pytest.mark.parametrize("name", list(CASES))
def test_apply_hessian_every_block(url: str, name: str) -> None:
    reference, point, config = CASES[name]
    model = _model(url, name)
    rng = np.random.default_rng(13)
    for out in range(len(reference(point))):
        for inp1 in range(len(point)):
            for inp2 in range(len(point)):
                sens = rng.normal(size=reference(point)[out].size)
                vec = rng.normal(size=point[inp2].size)
                got = model.apply_hessian(out, inp1, inp2, _lists(point), sens.tolist(), vec.tolist(), config)
                assert len(got) == point[inp1].size
                want = fd_hessian_action(reference, point, out, inp1, inp2, sens, vec)
                assert_close(got, want, SECOND_FINITE_DIFFERENCE, f"{out} {inp1} {inp2}")


def test_mixed_hessian_blocks_are_transposes(url: str) -> None:
    # Closed form for the generic model's second output s = sum(x**3 * y): d2s/dx dy = diag(3 x**2).
    x, y = np.array([0.4, -0.3]), np.array([1.2, 0.6])
    model = _model(url, "expression")
    vec = np.array([0.5, -2.0])
    xy = model.apply_hessian(1, 0, 1, [x.tolist(), y.tolist()], [1.0], vec.tolist(), GENERIC_CONFIG)
    yx = model.apply_hessian(1, 1, 0, [x.tolist(), y.tolist()], [1.0], vec.tolist(), GENERIC_CONFIG)
    assert_close(xy, 3 * x**2 * vec, CLOSED_FORM, "d2s/dx dy vec")
    assert_close(yx, 3 * x**2 * vec, CLOSED_FORM, "d2s/dy dx vec")
    xx = model.apply_hessian(1, 0, 0, [x.tolist(), y.tolist()], [2.0], vec.tolist(), GENERIC_CONFIG)
    assert_close(xx, 2.0 * 6 * x * y * vec, CLOSED_FORM, "d2s/dx2 vec")


# --- errors ------------------------------------------------------------------------------------------

POINT = [[0.3, 0.5], [1.0, 2.0]]


def test_unknown_model(url: str) -> None:
    with pytest.raises(Exception, match="not supported by server"):
        _model(url, "nope")
    for path in (
        "ModelInfo",
        "InputSizes",
        "OutputSizes",
        "Evaluate",
        "Gradient",
        "ApplyJacobian",
        "ApplyHessian",
    ):
        _assert_error(_post(url, path, {"name": "nope"}), "ModelNotFound", 400, "arm, banana")


def test_wrong_input_sizes(url: str) -> None:
    model = _model(url, "arm")
    with pytest.raises(
        Exception, match="InvalidInput: input\\[1\\] has 3 numbers; input 1 of model 'arm' has size 2"
    ):
        model([[0.3, 0.5], [1.0, 2.0, 3.0]])
    with pytest.raises(Exception, match="InvalidInput: input has 1 vectors; model 'arm' takes 2"):
        model.gradient(0, 0, [[0.3, 0.5]], [1.0, 1.0])
    with pytest.raises(Exception, match="InvalidInput: sens has 1 numbers; output 0 has size 2"):
        model.gradient(0, 0, POINT, [1.0])
    with pytest.raises(Exception, match="InvalidInput: vec has 3 numbers; input 1 has size 2"):
        model.apply_jacobian(0, 1, POINT, [1.0, 2.0, 3.0])
    with pytest.raises(Exception, match="InvalidInput: vec has 1 numbers; input 0 has size 2"):
        model.apply_hessian(1, 1, 0, POINT, [1.0], [1.0])
    body = {"name": "arm", "input": [[0.0] * 3, [0.0] * 3], "config": {}}
    _assert_error(_post(url, "Evaluate", body), "InvalidInput", 400, "input[0] has 3 numbers")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda m: m.gradient(2, 0, POINT, [1.0]), "outWrt is 2; model 'arm' has 2 outputs (indices 0 to 1)"),
        (lambda m: m.gradient(0, 2, POINT, [1.0, 1.0]), "inWrt is 2; model 'arm' has 2 inputs"),
        (lambda m: m.gradient(0, -1, POINT, [1.0, 1.0]), "inWrt is -1"),
        (lambda m: m.apply_jacobian(5, 0, POINT, [1.0, 1.0]), "outWrt is 5"),
        (lambda m: m.apply_jacobian(0, 3, POINT, [1.0, 1.0]), "inWrt is 3"),
        (lambda m: m.apply_hessian(0, 2, 0, POINT, [1.0, 1.0], [1.0, 1.0]), "inWrt1 is 2"),
        (lambda m: m.apply_hessian(0, 0, 2, POINT, [1.0, 1.0], [1.0, 1.0]), "inWrt2 is 2"),
        (lambda m: m.apply_hessian(2, 0, 0, POINT, [1.0], [1.0, 1.0]), "outWrt is 2"),
    ],
)
def test_wrong_indices(url: str, call: Callable[[umbridge.HTTPModel], Any], fragment: str) -> None:
    with pytest.raises(Exception, match="type InvalidInput") as info:
        call(_model(url, "arm"))
    assert fragment in str(info.value)


def test_malformed_requests_get_protocol_errors(url: str) -> None:
    _assert_error(httpx.post(f"{url}/Evaluate", content=b"{"), "InvalidInput", 400, "not valid JSON")
    _assert_error(httpx.post(f"{url}/Evaluate", content=b"[1]"), "InvalidInput", 400, "JSON object")
    _assert_error(httpx.post(f"{url}/Evaluate", content=b'{"name": 3}'), "InvalidInput", 400, "name must be")
    _assert_error(_post(url, "Evaluate", {"name": "arm"}), "InvalidInput", 400, "input: Field required")
    body = {"name": "arm", "input": POINT, "outWrt": "0", "inWrt": 0, "sens": [1, 1]}
    _assert_error(
        _post(url, "Gradient", body), "InvalidInput", 400, "outWrt: Input should be a valid integer"
    )
    body = {"name": "arm", "input": [[0.3, "x"], [1.0, 2.0]]}
    _assert_error(_post(url, "Evaluate", body), "InvalidInput", 400, "input[0] contains the string 'x'")
    _assert_error(
        _post(url, "Evaluate", {"name": "arm", "input": POINT, "config": {"level": 1}}),
        "InvalidInput",
        400,
        "takes no config",
    )
    # Not JSON: a NaN literal.
    _assert_error(
        httpx.post(f"{url}/Evaluate", content=b'{"name": "arm", "input": [[NaN, 1], [1, 1]]}'),
        "InvalidInput",
        400,
    )


def test_http_level_errors_use_the_protocol_body(url: str) -> None:
    _assert_error(
        httpx.post(f"{url}/TestShMem", content=b"{}"), "UnsupportedFeature", 404, "UM-Bridge endpoints"
    )
    _assert_error(httpx.get(f"{url}/Evaluate"), "UnsupportedFeature", 405)
    big = {"name": "arm", "input": [[0.0] * 20_000, [0.0] * 20_000]}
    _assert_error(_post(url, "Evaluate", big), "InvalidInput", 413, "at most 200000")
    # Outside /umbridge errors stay problem+json.
    assert httpx.get(f"{url[: -len('/umbridge')]}/nope").headers["content-type"] == "application/problem+json"


def test_generic_model_errors_are_the_clients(url: str) -> None:
    model = _model(url, "expression")
    config = {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "x +", "size": 2}]}
    with pytest.raises(Exception, match=r"InvalidInput: config\.outputs\[0\]\.expression: "):
        model([[1.0, 2.0]], config)
    wrong = {"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "sum(x)", "size": 2}]}
    with pytest.raises(Exception, match="InvalidInput: config: an output has 1 elements but declares size 2"):
        model([[1.0, 2.0]], wrong)


def test_a_models_file_model_with_a_wrong_size_is_invalid_output(url: str) -> None:
    body = {"name": "wrong_size", "input": [[1.0, 2.0]]}
    _assert_error(_post(url, "Evaluate", body), "InvalidOutput", 500, "has 2 elements but declares size 3")
    body = {"name": "wrong_size", "input": [[1.0, 2.0]], "outWrt": 0, "inWrt": 0, "vec": [1.0, 1.0]}
    _assert_error(_post(url, "ApplyJacobian", body), "InvalidOutput", 500, "output 0 has 2 elements")


def test_non_finite_outputs_stay_valid_json(url: str) -> None:
    config = {"inputs": [{"name": "x", "size": 3}], "outputs": [{"expression": "log(x)", "size": 3}]}
    response = _post(url, "Evaluate", {"name": "expression", "input": [[1.0, 0.0, -1.0]], "config": config})
    assert orjson.loads(response.content) == {"output": [[0.0, "-Infinity", "NaN"]]}  # strict RFC 8259
    output = _model(url, "expression")([[1.0, 0.0, -1.0]], config)
    values = np.asarray(output[0], dtype=float)  # how a client gets floats back
    assert values[0] == 0.0 and values[1] == -np.inf and np.isnan(values[2])
    # The same strings are accepted as input.
    again = _post(
        url, "Evaluate", {"name": "expression", "input": [["Infinity", 1.0, "NaN"]], "config": config}
    )
    assert again.json() == {"output": [["Infinity", 0.0, "NaN"]]}


def test_conformance_shapes_at_zero(url: str) -> None:
    # What the protocol's conformance suite checks of the first model, with input 0.0 everywhere.
    name = httpx.get(f"{url}/Info").json()["models"][0]
    assert _post(url, "ModelInfo", {"name": name}).json()["support"].keys() == {
        "Evaluate",
        "Gradient",
        "ApplyJacobian",
        "ApplyHessian",
    }
    sizes = _post(url, "InputSizes", {"name": name}).json()
    outs = _post(url, "OutputSizes", {"name": name}).json()
    assert set(sizes) == {"inputSizes"} and set(outs) == {"outputSizes"}
    point = [[0.0] * n for n in sizes["inputSizes"]]
    evaluated = _post(url, "Evaluate", {"name": name, "input": point, "config": {}}).json()
    assert set(evaluated) == {"output"} and [len(v) for v in evaluated["output"]] == outs["outputSizes"]
    common = {"name": name, "input": point, "config": {}, "outWrt": 0}
    zeros_out, zeros_in = [0.0] * outs["outputSizes"][0], [0.0] * sizes["inputSizes"][0]
    for path, extra, size in (
        ("Gradient", {"inWrt": 0, "sens": zeros_out}, sizes["inputSizes"][0]),
        ("ApplyJacobian", {"inWrt": 0, "vec": zeros_in}, outs["outputSizes"][0]),
        (
            "ApplyHessian",
            {"inWrt1": 0, "inWrt2": 0, "sens": zeros_out, "vec": zeros_in},
            sizes["inputSizes"][0],
        ),
    ):
        response = _post(url, path, {**common, **extra})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"output"} and len(body["output"]) == size
        assert all(isinstance(v, float) for v in body["output"])

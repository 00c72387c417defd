"""The committed openapi/openapi.json is what the app generates (run `make openapi` after API changes)."""

from __future__ import annotations

import json

from service.api.openapi import DEFAULT_PATH, render_openapi


def test_committed_openapi_is_current() -> None:
    assert DEFAULT_PATH.exists(), "openapi/openapi.json is missing; run `make openapi`"
    assert DEFAULT_PATH.read_text(encoding="utf-8") == render_openapi(), "stale; run `make openapi`"


def test_operation_ids_are_stable() -> None:
    document = json.loads(render_openapi())
    ids = {
        path: {method: op["operationId"] for method, op in ops.items()}
        for path, ops in document["paths"].items()
    }
    assert ids == {
        "/v1/gradient": {"post": "compute_gradient"},
        "/v1/functions": {"get": "list_functions"},
        "/v1/model/describe": {"post": "describe_model"},
        "/v1/model/gradient": {"post": "model_gradient"},
        "/v1/model/train-step": {"post": "train_step"},
        "/v1/step": {"post": "expression_step"},
        "/healthz": {"get": "check_liveness"},
        "/readyz": {"get": "check_readiness"},
        "/metrics": {"get": "get_metrics"},
        "/umbridge/Info": {"get": "umbridge_info"},
        "/umbridge/ModelInfo": {"post": "umbridge_model_info"},
        "/umbridge/InputSizes": {"post": "umbridge_input_sizes"},
        "/umbridge/OutputSizes": {"post": "umbridge_output_sizes"},
        "/umbridge/Evaluate": {"post": "umbridge_evaluate"},
        "/umbridge/Gradient": {"post": "umbridge_gradient"},
        "/umbridge/ApplyJacobian": {"post": "umbridge_apply_jacobian"},
        "/umbridge/ApplyHessian": {"post": "umbridge_apply_hessian"},
    }
    schemas = document["components"]["schemas"]
    assert {
        "Tensor",
        "NestedNumbers",
        "Base64Tensor",
        "GradientRequest",
        "GradientResponse",
        "Problem",
    } <= set(schemas)

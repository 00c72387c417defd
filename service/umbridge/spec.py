"""UM-Bridge models as tapeserve programs: the models file, the generic model's config, and their checks.

A model maps a list of input vectors to a list of output vectors. Here each input is a named
variable of a declared size, each output an expression of the inputs, constants and user functions
with a declared size (its value, of any shape, is read in row-major order). Everything is checked
without TensorFlow: names, every piece of text (``build_program``), constants, sizes and limits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from service.boundedcache import BoundedCache
from service.errors import InvalidRequest, TapeserveError
from service.expr import build_program
from service.jobs import job_functions
from service.limits import Limits
from service.tensorcodec import decode_tensor

__all__ = [
    "FEATURES",
    "config_work",
    "GENERIC_MODEL",
    "ModelsFileError",
    "UMModel",
    "describe_error",
    "load_models_file",
    "model_from_config",
]

# The name of the model whose definition travels in each request's `config`.
GENERIC_MODEL = "expression"
# The protocol's optional endpoints, in the order ModelInfo lists them.
FEATURES = ("Evaluate", "Gradient", "ApplyJacobian", "ApplyHessian")
# UM-Bridge is a protocol of doubles: every computation runs in float64.
DTYPE = "float64"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """One model input: a vector variable of the expressions."""

    name: StrictStr = Field(description="The variable's name in the output expressions.")
    size: StrictInt = Field(ge=1, description="Length of the vector.")


class OutputSpec(_Strict):
    """One model output: an expression whose value has `size` elements (read in row-major order)."""

    expression: StrictStr = Field(min_length=1, description="The output's expression.")
    size: StrictInt = Field(ge=1, description="Number of elements of its value.")


class FunctionSpec(_Strict):
    """A user function, as in POST /v1/gradient."""

    params: list[StrictStr] = Field(default_factory=list)
    body: StrictStr
    gradient: dict[str, StrictStr] | None = None
    doc: StrictStr = ""


class ModelDefinition(_Strict):
    """What the generic model's `config` carries, and the body of every model in the models file."""

    inputs: list[InputSpec] = Field(min_length=1, description="Input vectors, in protocol order.")
    outputs: list[OutputSpec] = Field(min_length=1, description="Output vectors, in protocol order.")
    constants: dict[str, Any] = Field(default_factory=dict, description="Tensors, not differentiated.")
    functions: dict[str, FunctionSpec] = Field(default_factory=dict, description="User functions.")


class Support(_Strict):
    """Which optional endpoints a named model offers (all by default)."""

    Evaluate: StrictBool = True
    Gradient: StrictBool = True
    ApplyJacobian: StrictBool = True
    ApplyHessian: StrictBool = True


class NamedModel(ModelDefinition):
    """A model of the models file."""

    name: StrictStr = Field(min_length=1, max_length=200)
    doc: StrictStr = ""
    support: Support = Field(default_factory=Support)


class ModelsFile(_Strict):
    models: list[NamedModel] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class UMModel:
    """A checked model: what the protocol endpoints and the job builders need, as plain data."""

    name: str
    input_names: tuple[str, ...]
    input_sizes: tuple[int, ...]
    output_expressions: tuple[str, ...]
    output_sizes: tuple[int, ...]
    constants: Mapping[str, np.ndarray]
    # name -> {"params", "body", "gradient"}, as GradientJob.functions
    functions: Mapping[str, Mapping[str, Any]]
    support: Mapping[str, bool] = field(default_factory=lambda: dict.fromkeys(FEATURES, True))
    # True when the server's operator wrote the model (the models file): its faults are the server's.
    server_side: bool = True
    doc: str = ""


class ModelsFileError(ValueError):
    """The models file cannot be served; the message says where and what is wrong."""


def describe_error(error: TapeserveError) -> str:
    """A TapeserveError as one message: its detail, plus the caret snippet of text errors."""
    snippet = error.extra.get("snippet")
    return f"{error.detail}\n{snippet}" if isinstance(snippet, str) else error.detail


def _validation_message(error: ValidationError, prefix: str) -> str:
    parts = []
    for item in error.errors()[:5]:
        path = prefix
        for part in item.get("loc", ()):
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        parts.append(f"{path or 'body'}: {item.get('msg', '')}")
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _check(
    definition: ModelDefinition, name: str, limits: Limits, where: str, *, server_side: bool
) -> UMModel:
    """The checked model, or InvalidRequest whose message starts with the offending path."""
    input_names = [item.name for item in definition.inputs]
    for index, item in enumerate(definition.inputs):
        if item.size > limits.max_input_elements:
            raise InvalidRequest(
                f"{where}inputs[{index}].size is {item.size}; at most {limits.max_input_elements} "
                "elements are allowed per input (max_input_elements)"
            )
    total = sum(item.size for item in definition.outputs)
    if total > limits.max_tensor_elements:
        raise InvalidRequest(
            f"{where}outputs have {total} elements in all; at most {limits.max_tensor_elements} are "
            "allowed (max_tensor_elements)"
        )
    # ApplyHessian adds one constant (the sensitivities), so one input slot stays free for it.
    if len(input_names) + len(definition.constants) + 1 > limits.max_inputs:
        raise InvalidRequest(
            f"{where}inputs and constants number {len(input_names) + len(definition.constants)}; "
            f"at most {limits.max_inputs - 1} are allowed (max_inputs, less one kept for ApplyHessian)"
        )
    functions = job_functions(definition.functions, doc=True)
    for index, output in enumerate(definition.outputs):
        try:
            build_program(output.expression, input_names, list(definition.constants), functions, limits)
        except TapeserveError as error:
            located = f"{where}outputs[{index}].expression"
            source = error.extra.get("source")
            if isinstance(source, str) and source.startswith("functions."):
                located = f"{where}{source}"
            elif error.extra.get("field") and not source:
                located = f"{where}{error.extra['field']}"
            raise InvalidRequest(f"{located}: {describe_error(error)}") from None
    constants = {}
    for cname, value in definition.constants.items():
        try:
            constants[cname] = decode_tensor(
                value, DTYPE, field=f"{where}constants.{cname}", max_elements=limits.max_input_elements
            )
        except TapeserveError as error:
            raise InvalidRequest(describe_error(error)) from None
    return UMModel(
        name=name,
        input_names=tuple(input_names),
        input_sizes=tuple(item.size for item in definition.inputs),
        output_expressions=tuple(item.expression for item in definition.outputs),
        output_sizes=tuple(item.size for item in definition.outputs),
        constants=constants,
        functions=functions,
        server_side=server_side,
    )


def _parse_text(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelsFileError(f"models file {path} is not valid JSON: {error}") from None
    import yaml  # only a YAML models file needs PyYAML

    try:
        # safe_load builds only plain data (no Python objects): the file is text, never code.
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ModelsFileError(f"models file {path} is not valid YAML: {error}") from None


def load_models_file(path: Path, limits: Limits) -> dict[str, UMModel]:
    """Every model of a YAML (or .json) models file, checked, by name in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ModelsFileError(f"models file {path} cannot be read: {error.strerror or error}") from None
    data = _parse_text(path, text)
    try:
        parsed = ModelsFile.model_validate(data)
    except ValidationError as error:
        raise ModelsFileError(f"models file {path}: {_validation_message(error, '')}") from None
    models: dict[str, UMModel] = {}
    for index, spec in enumerate(parsed.models):
        where = f"models[{index}]"
        if spec.name == GENERIC_MODEL:
            raise ModelsFileError(
                f"models file {path}: {where}.name {GENERIC_MODEL!r} is the generic model's name; "
                "choose another"
            )
        if spec.name in models:
            raise ModelsFileError(f"models file {path}: {where}.name {spec.name!r} is used twice")
        try:
            model = _check(spec, spec.name, limits, f"{where}.", server_side=True)
        except InvalidRequest as error:
            raise ModelsFileError(f"models file {path}: {error.detail}") from None
        models[spec.name] = UMModel(
            **{slot: getattr(model, slot) for slot in UMModel.__slots__ if slot not in ("support", "doc")},
            support=spec.support.model_dump(),
            doc=spec.doc,
        )
    return models


# Clients repeat the same config on every call; checking it again would cost ~1 ms of parsing each time.
# Bounded by count and by the configs' total length: a config may reach the body limit (megabytes).
_CHECKED_CONFIGS = BoundedCache[tuple[bytes, Limits], UMModel](max_entries=256, max_bytes=16 * 2**20)


def _config_key(config: Any) -> bytes:
    """The config as compact JSON, key order kept (orjson: ~1 GB/s, so a cache hit stays cheap)."""
    try:
        return orjson.dumps(config)
    except orjson.JSONEncodeError:  # integers beyond 64 bits: the standard library writes them
        return json.dumps(config, allow_nan=False, separators=(",", ":")).encode()


def config_work(config: Any, limits: Limits) -> int:
    """How many characters of config a request's check would read: 0 when the config is cached.

    The API uses it to decide, before checking, whether the check runs on the event loop.
    """
    if not isinstance(config, Mapping) or not config:
        return 0
    key = _config_key(config)
    return 0 if (key, limits) in _CHECKED_CONFIGS else len(key)


def model_from_config(config: Any, limits: Limits) -> UMModel:
    """The generic model defined by a request's ``config`` (InvalidRequest naming the config path)."""
    if not isinstance(config, Mapping) or not config:
        raise InvalidRequest(
            f"model {GENERIC_MODEL!r} is defined by its config: "
            '{"inputs": [{"name": "x", "size": 2}], "outputs": [{"expression": "...", "size": 1}], '
            '"constants": {...}, "functions": {...}}'
        )
    # Key order is kept: a function may call only those defined before it.
    key = _config_key(config)
    cached = _CHECKED_CONFIGS.get((key, limits))
    if cached is not None:
        return cached
    try:
        definition = ModelDefinition.model_validate_json(key)
    except ValidationError as error:
        raise InvalidRequest(_validation_message(error, "config")) from None
    model = _check(definition, GENERIC_MODEL, limits, "config.", server_side=False)
    # A checked model holds its config's texts once more: twice the key's length bounds both.
    _CHECKED_CONFIGS.put((key, limits), model, size=2 * len(key))
    return model

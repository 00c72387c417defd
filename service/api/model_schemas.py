"""Wire schemas of the model and step endpoints: the model spec (a discriminated union of layers),
losses, optimizers, clipping, objectives, and the requests and responses that use them.

Defaults equal ``service.models.layout.LAYER_DEFAULTS`` and ``OPTIMIZER_DEFAULTS`` (a test checks),
so a dumped spec is complete plain data the worker builds without guessing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.schemas import Tensor, UserFunction, WireFloat
from service.limits import MIN_TIMEOUT_S

__all__ = [
    "Clip",
    "DescribeRequest",
    "DescribeResponse",
    "ExpressionStepRequest",
    "ExpressionStepResponse",
    "LayerSpec",
    "LossSpec",
    "ModelGradientRequest",
    "ModelGradientResponse",
    "ModelSpec",
    "OptimizerSpec",
    "TrainStepRequest",
    "TrainStepResponse",
]

Activation = Literal[
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "sigmoid",
    "hard_sigmoid", "tanh", "softmax", "log_softmax", "softplus", "softsign", "exponential",
]  # fmt: skip
Initializer = Literal[
    "zeros", "ones", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
    "lecun_normal", "uniform", "normal", "truncated_normal", "orthogonal",
]  # fmt: skip
Padding = Literal["valid", "same"]
PositiveInt = Annotated[int, Field(ge=1)]
Size2 = PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]

_STRICT = ConfigDict(extra="forbid", strict=True)


class Regularizer(BaseModel):
    """L1 and/or L2 penalty on a weight (or a layer's output): l1 * sum|w| + l2 * sum w^2."""

    model_config = _STRICT

    l1: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)


class _DenseLike(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    activation: Activation = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer = "glorot_uniform"
    bias_initializer: Initializer = "zeros"
    kernel_regularizer: Regularizer | None = None
    bias_regularizer: Regularizer | None = None
    activity_regularizer: Regularizer | None = None


class Dense(_DenseLike):
    type: Literal["dense"]
    units: PositiveInt


class Conv1D(_DenseLike):
    type: Literal["conv1d"]
    filters: PositiveInt
    kernel_size: PositiveInt
    strides: PositiveInt = 1
    padding: Padding = "valid"


class Conv2D(_DenseLike):
    type: Literal["conv2d"]
    filters: PositiveInt
    kernel_size: Size2
    strides: Size2 = 1
    padding: Padding = "valid"


class _Pool2D(BaseModel):
    model_config = _STRICT

    pool_size: Size2 = 2
    strides: Size2 | None = Field(None, description="Default: pool_size.")
    padding: Padding = "valid"


class MaxPool2D(_Pool2D):
    type: Literal["max_pool2d"]


class AvgPool2D(_Pool2D):
    type: Literal["avg_pool2d"]


class Flatten(BaseModel):
    model_config = _STRICT
    type: Literal["flatten"]


class Dropout(BaseModel):
    """Active in training steps only; its mask depends on (seed, iteration), so steps are repeatable."""

    model_config = _STRICT
    type: Literal["dropout"]
    rate: float = Field(0.5, ge=0, lt=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Default: derived from the model seed.")


class BatchNorm(BaseModel):
    """Over the last axis; moving_mean and moving_variance are non-trainable, updated by training steps."""

    model_config = _STRICT
    type: Literal["batch_norm"]
    momentum: float = Field(0.99, ge=0, le=1)
    epsilon: float = Field(1e-3, gt=0)


class LayerNorm(BaseModel):
    model_config = _STRICT
    type: Literal["layer_norm"]
    epsilon: float = Field(1e-3, gt=0)


class Embedding(BaseModel):
    """First layer only: x holds integer token ids in [0, input_dim)."""

    model_config = _STRICT
    type: Literal["embedding"]
    input_dim: PositiveInt
    output_dim: PositiveInt
    embeddings_initializer: Initializer = "uniform"
    embeddings_regularizer: Regularizer | None = None


class _Recurrent(_DenseLike):
    activation: Activation = "tanh"
    recurrent_initializer: Initializer = "orthogonal"
    recurrent_regularizer: Regularizer | None = None
    return_sequences: bool = False
    units: PositiveInt


class SimpleRNN(_Recurrent):
    type: Literal["simple_rnn"]


class LSTM(_Recurrent):
    type: Literal["lstm"]


class GRU(_Recurrent):
    type: Literal["gru"]


LayerSpec = Annotated[
    Dense | Conv1D | Conv2D | MaxPool2D | AvgPool2D | Flatten | Dropout | BatchNorm | LayerNorm | Embedding
    | SimpleRNN | LSTM | GRU,
    Field(discriminator="type"),
]  # fmt: skip


class ModelSpec(BaseModel):
    """A sequential model: input shape per example (no batch axis) and layers; Keras builds it in a worker."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "input_shape": [32],
                    "layers": [
                        {
                            "type": "dense",
                            "units": 64,
                            "activation": "relu",
                            "kernel_regularizer": {"l2": 0.01},
                        },
                        {"type": "dense", "units": 1},
                    ],
                }
            ]
        },
    )

    input_shape: list[PositiveInt] = Field(min_length=1, max_length=8)
    layers: list[LayerSpec] = Field(min_length=1)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the initializers of absent weights.")


class LossSpec(BaseModel):
    model_config = _STRICT

    type: Literal[
        "mse",
        "mae",
        "huber",
        "binary_crossentropy",
        "categorical_crossentropy",
        "sparse_categorical_crossentropy",
    ] = "mse"
    from_logits: bool = Field(False, description="Cross-entropies: the model outputs logits.")
    delta: float = Field(1.0, gt=0, description="Huber's delta.")


def _loss_from_text(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


class _Optimizer(BaseModel):
    model_config = _STRICT


class SGD(_Optimizer):
    type: Literal["sgd"]
    learning_rate: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False


class Adam(_Optimizer):
    type: Literal["adam"]
    learning_rate: float = Field(0.001, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0)
    amsgrad: bool = False


class AdamW(Adam):
    type: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: float = Field(0.004, ge=0)


class RMSprop(_Optimizer):
    type: Literal["rmsprop"]
    learning_rate: float = Field(0.001, gt=0)
    rho: float = Field(0.9, ge=0, lt=1)
    momentum: float = Field(0.0, ge=0, le=1)
    epsilon: float = Field(1e-7, gt=0)
    centered: bool = False


class Adagrad(_Optimizer):
    type: Literal["adagrad"]
    learning_rate: float = Field(0.001, gt=0)
    initial_accumulator_value: float = Field(0.1, ge=0)
    epsilon: float = Field(1e-7, gt=0)


OptimizerSpec = Annotated[SGD | Adam | AdamW | RMSprop | Adagrad, Field(discriminator="type")]


class Clip(BaseModel):
    """Exactly one of: value (each element), norm (each tensor's L2 norm), global_norm (all tensors)."""

    model_config = _STRICT

    value: float | None = Field(None, gt=0)
    norm: float | None = Field(None, gt=0)
    global_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Clip:
        given = [k for k in ("value", "norm", "global_norm") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of value, norm, global_norm (got {', '.join(given) or 'none'})"
            )
        return self


class Supervised(BaseModel):
    """loss(y, model(x, training=True)) + the model's regularization losses."""

    model_config = _STRICT
    type: Literal["supervised"]


class AdversarialObjective(BaseModel):
    """(1 - ratio) * loss(x) + ratio * loss(x_adv), x_adv = x + epsilon * sign(grad_x loss) (FGSM)."""

    model_config = _STRICT
    type: Literal["adversarial"]
    epsilon: float = Field(gt=0)
    ratio: float = Field(0.5, ge=0, le=1, description="Weight of the adversarial examples' loss.")


class Reinforce(BaseModel):
    """-mean(log pi(a|s) * (G - b)) - entropy_coefficient * mean entropy; x = states, output = logits."""

    model_config = _STRICT
    type: Literal["reinforce"]
    actions: list[Annotated[int, Field(ge=0)]] = Field(description="The action taken in each state.")
    returns: Tensor = Field(description="The return G of each state (a vector of the batch size).")
    baseline: float | Literal["mean"] | None = Field(None, description='A number, or "mean" of the returns.')
    entropy_coefficient: float = Field(0.0, ge=0)
    from_logits: bool = Field(True, description="false: the model outputs probabilities (e.g. softmax).")


Objective = Annotated[Supervised | AdversarialObjective | Reinforce, Field(discriminator="type")]


class Adversarial(BaseModel):
    """FGSM (one signed-gradient step of epsilon) or PGD (steps of step_size, projected to the eps-ball)."""

    model_config = _STRICT

    method: Literal["fgsm", "pgd"] = "fgsm"
    epsilon: float = Field(gt=0)
    steps: int = Field(10, ge=1, le=1000, description="PGD only.")
    step_size: float | None = Field(None, gt=0, description="PGD only; default epsilon / 4.")
    clip_min: float | None = Field(None, description="Keep x_adv within the input domain.")
    clip_max: float | None = None


class _ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelSpec
    weights: list[Tensor] | None = Field(
        None, description="In get_weights() order (see /v1/model/describe); absent: seeded initial weights."
    )
    x: Tensor = Field(description="Inputs with a leading batch axis: shape [batch, *input_shape].")
    y: Tensor | None = Field(None, description="Targets with a leading batch axis.")
    loss: Annotated[LossSpec, Field(description='A loss, or its name as text, e.g. "mse".')] = Field(
        default_factory=LossSpec
    )
    dtype: Literal["float32", "float64"] = "float32"
    encoding: Literal["json", "base64"] = "json"
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S)

    @model_validator(mode="before")
    @classmethod
    def _loss_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("loss"), str):
            data = {**data, "loss": _loss_from_text(data["loss"])}
        return data


Wrt = Literal["weights", "inputs"]


def _default_wrt() -> list[Wrt]:
    return ["weights"]


class ModelGradientRequest(_ModelRequest):
    """Loss and gradients of a model on a batch, with respect to its weights and/or its inputs."""

    wrt: list[Wrt] = Field(default_factory=_default_wrt, description="Differentiate w.r.t. these.")
    tangents: list[Tensor] | None = Field(
        None, description="Hessian-vector product w.r.t. the weights: one tensor per weight (field `hvp`)."
    )
    saliency: bool = Field(False, description="Per-example gradient of each example's loss w.r.t. its input.")
    adversarial: Adversarial | None = None
    training: bool = Field(False, description="Call the model in training mode (dropout, batch statistics).")


class TrainStepRequest(_ModelRequest):
    """One or more clipped optimizer steps of a model on one batch."""

    optimizer: OptimizerSpec
    optimizer_state: list[Tensor] | None = Field(
        None, description="As returned by the previous call (iteration first, then the slots); absent: fresh."
    )
    clip: Clip | None = None
    objective: Objective = Field(default_factory=lambda: Supervised(type="supervised"))
    steps: int = Field(1, ge=1)
    stream: bool = Field(False, description="With steps > 1: answer NDJSON progress lines, the result last.")
    progress_every: int = Field(
        1, ge=1, description="Streaming: one progress line (one pool job) per n steps."
    )
    return_gradients: bool = Field(
        False, description="Also return the last step's gradients (before clipping)."
    )


class ExpressionStepRequest(BaseModel):
    """One or more clipped optimizer steps minimizing a scalar expression over its variables."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "expression": "sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)",
                    "variables": {"x": [-1.0, 1.0]},
                    "optimizer": {"type": "adam", "learning_rate": 0.05},
                    "steps": 100,
                }
            ]
        },
    )

    expression: str = Field(min_length=1)
    variables: dict[str, Tensor] = Field(min_length=1, description="Optimized.")
    constants: dict[str, Tensor] = Field(default_factory=dict)
    functions: dict[str, UserFunction] = Field(default_factory=dict)
    optimizer: OptimizerSpec
    optimizer_state: list[Tensor] | None = None
    clip: Clip | None = None
    steps: int = Field(1, ge=1)
    stream: bool = False
    progress_every: int = Field(1, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    encoding: Literal["json", "base64"] = "json"
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S)


class DescribeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelSpec
    optimizer: OptimizerSpec | None = Field(None, description="Also describe this optimizer's state layout.")


class WeightDescription(BaseModel):
    name: str
    shape: list[int]
    trainable: bool


class DescribeResponse(BaseModel):
    """A spec's weights in get_weights() order, its parameter count and output shape (no worker involved)."""

    weights: list[WeightDescription]
    param_count: int
    trainable_count: int
    output_shape: list[int]
    layer_output_shapes: list[list[int]]
    optimizer_state: list[WeightDescription] | None = None


class StepHistory(BaseModel):
    loss: WireFloat
    data_loss: WireFloat
    regularization_loss: WireFloat
    gradient_norm: WireFloat
    clipped_gradient_norm: WireFloat


class ModelGradientResponse(BaseModel):
    loss: WireFloat
    data_loss: WireFloat
    regularization_loss: WireFloat
    weight_gradients: list[Tensor] | None = None
    input_gradients: Tensor | None = None
    saliency: Tensor | None = None
    hvp: list[Tensor] | None = None
    x_adv: Tensor | None = None
    adversarial_loss: WireFloat | None = None
    weights: list[Tensor] | None = Field(None, description="The seeded initial weights, when none were sent.")
    meta: dict[str, Any]


class TrainStepResponse(BaseModel):
    """The last step's loss and norms (before its update), the new weights and optimizer state."""

    loss: WireFloat
    data_loss: WireFloat
    regularization_loss: WireFloat
    gradient_norm: WireFloat
    clipped_gradient_norm: WireFloat
    weights: list[Tensor]
    optimizer_state: list[Tensor]
    gradients: list[Tensor] | None = None
    history: list[StepHistory] | None = Field(None, description="One entry per step when steps > 1.")
    steps: int
    meta: dict[str, Any]


class ExpressionStepResponse(BaseModel):
    """value = the expression before the last step; variables after it."""

    value: WireFloat
    gradient_norm: WireFloat
    clipped_gradient_norm: WireFloat
    variables: dict[str, Tensor]
    optimizer_state: list[Tensor]
    history: list[StepHistory] | None = None
    steps: int
    meta: dict[str, Any]

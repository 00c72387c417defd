"""lstm: the loss of an l-layer LSTM predicting each next character of a c-character text, and its
gradient with respect to the main and extra parameters (flattened, main first).

Each character is a step of one ``scan`` whose carry is the layers' hidden and cell states
(2l x b); the layers of a step are unrolled (l is small) as a chain of functions, each layer's
new state passed on as an argument. The scan's stacked carries hold every step's top hidden state,
from which the predictions and the loss are computed at once after the loop. GradBench's
logsumexp adds 2 to the sum of exponentials; so does this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.gradbench import DTYPE, Evaluate
from service.client import Client


def functions(layers: int, b: int) -> dict[str, dict[str, Any]]:
    def gate(k: int) -> str:  # columns of one gate in a weight or bias row
        return f"{k * b}:{(k + 1) * b}"

    fns: dict[str, dict[str, Any]] = {
        # one layer's new (hidden, cell) from its input, its state and its weight and bias rows
        "new_cell": {
            "params": ["inp", "h", "c", "W", "B"],
            "body": f"c * sigmoid(inp * W[{gate(0)}] + B[{gate(0)}])"
            f" + sigmoid(h * W[{gate(1)}] + B[{gate(1)}]) * tanh(h * W[{gate(3)}] + B[{gate(3)}])",
        },
        "layer_out": {
            "params": ["inp", "W", "B", "c"],
            "body": f"stack([sigmoid(inp * W[{gate(2)}] + B[{gate(2)}]) * tanh(c), c])",
        },
        "layer": {
            "params": ["inp", "h", "c", "W", "B"],
            "body": "layer_out(inp, W, B, new_cell(inp, h, c, W, B))",
        },
    }

    def rows(i: int) -> str:  # layer i's hidden and cell state, weight and bias rows
        return f"S[{2 * i}], S[{2 * i + 1}], main[{2 * i}], main[{2 * i + 1}]"

    # up_i: layers i.. of a step given layer i's input; defined from the top layer down, as a
    # function may only call the ones before it
    top = layers - 1
    fns[f"up{top}"] = {
        "params": ["S", "inp", "main"],
        "body": f"layer(inp, {rows(top)})",
    }
    for i in range(top - 1, -1, -1):
        fns[f"then{i}"] = {
            "params": ["S", "main", "L"],
            "body": f"concatenate([L, up{i + 1}(S, L[0], main)])",
        }
        fns[f"up{i}"] = {
            "params": ["S", "inp", "main"],
            "body": f"then{i}(S, main, layer(inp, {rows(i)}))",
        }
    fns["step"] = {"params": ["S", "x", "main", "extra"], "body": "up0(S, x * extra[0], main)"}
    fns["loss"] = {
        "params": ["y", "gold", "count"],
        "body": "-sum(gold * (y - log(sum(exp(y), axis=1, keepdims=True) + 2))) / count",
    }
    return fns


def expression(layers: int, c: int, b: int) -> str:
    if c < 2:
        raise ValueError("lstm needs at least two characters")
    # every step's top hidden state -> the predictions, scored against the next characters
    top = 2 * (layers - 1)
    return (
        f"loss(scan(step, state, sequence[:-1], main, extra)[:, {top}, :] * extra[1] + extra[2],"
        f" sequence[1:], {(c - 1) * b})"
    )


def _call(client: Client, input: Mapping[str, Any], derivatives: tuple[str, ...]) -> Any:
    main = np.asarray(input["main_params"], dtype=np.float64)
    extra = np.asarray(input["extra_params"], dtype=np.float64)
    state = np.asarray(input["state"], dtype=np.float64)
    sequence = np.asarray(input["sequence"], dtype=np.float64)
    layers, b, c = main.shape[0] // 2, main.shape[1] // 4, sequence.shape[0]
    return client.compute(
        expression(layers, c, b),
        {"main": main, "extra": extra},
        constants={"state": state, "sequence": sequence},
        functions=functions(layers, b),
        derivatives=derivatives,
        dtype=DTYPE,
    )


def objective(client: Client, input: Mapping[str, Any]) -> float:
    return float(_call(client, input, ()).value)


def jacobian(client: Client, input: Mapping[str, Any]) -> list[float]:
    gradient = _call(client, input, ("gradient",)).gradient
    out: list[float] = np.concatenate([gradient["main"].ravel(), gradient["extra"].ravel()]).tolist()
    return out


FUNCTIONS: Mapping[str, Evaluate] = {"objective": objective, "jacobian": jacobian}

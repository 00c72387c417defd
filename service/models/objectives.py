"""Training objectives: what a train step minimizes (supervised, adversarial, REINFORCE), TF side.

Each objective is a function (x, y, actions, returns) -> (data loss, regularization loss) traced
into the step; ``regularization_loss`` is the model's own penalties (L1/L2, activity), which model
gradients add to the data loss too. Imported only in worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

__all__ = ["Objective", "objective_loss", "regularization_loss"]

Objective = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


def regularization_loss(model: Any, dtype: Any) -> Any:
    """The sum of the model's regularization losses (zero without any), in ``dtype``."""
    losses = model.losses
    if not losses:
        return tf.zeros([], dtype)
    return tf.add_n([tf.cast(v, dtype) for v in losses])


def objective_loss(objective: Mapping[str, Any], model: Any, loss_fn: Any, tf_dtype: Any) -> Objective:
    """(x, y, actions, returns) -> (data_loss, regularization_loss) for a train step's objective."""
    kind = objective["type"]

    if kind == "supervised":

        def supervised(x: Any, y: Any, actions: Any, returns: Any) -> tuple[Any, Any]:
            data = tf.cast(loss_fn(y, model(x, training=True)), tf_dtype)
            return data, regularization_loss(model, tf_dtype)

        return supervised

    if kind == "adversarial":
        eps = float(objective["epsilon"])
        ratio = float(objective["ratio"])

        def adversarial(x: Any, y: Any, actions: Any, returns: Any) -> tuple[Any, Any]:
            # The attack sees the model in inference mode; its gradient is w.r.t. the inputs, not the weights.
            with tf.GradientTape() as attack:
                attack.watch(x)
                attack_loss = loss_fn(y, model(x, training=False))
            x_adv = tf.stop_gradient(x + eps * tf.sign(attack.gradient(attack_loss, x)))
            clean = tf.cast(loss_fn(y, model(x, training=True)), tf_dtype)
            reg = regularization_loss(model, tf_dtype)
            adv = tf.cast(loss_fn(y, model(x_adv, training=True)), tf_dtype)
            return (1.0 - ratio) * clean + ratio * adv, reg

        return adversarial

    beta = float(objective["entropy_coefficient"])
    baseline = objective["baseline"]
    from_logits = bool(objective["from_logits"])

    def reinforce(x: Any, y: Any, actions: Any, returns: Any) -> tuple[Any, Any]:
        out = tf.cast(model(x, training=True), tf_dtype)
        logp = (
            tf.nn.log_softmax(out) if from_logits else tf.math.log(tf.maximum(out, tf.cast(1e-12, tf_dtype)))
        )
        chosen = tf.gather(logp, tf.cast(actions, tf.int32), axis=1, batch_dims=1)
        if baseline == "mean":
            b = tf.reduce_mean(returns)
        else:
            b = tf.cast(float(baseline or 0.0), tf_dtype)
        advantage = tf.stop_gradient(returns - b)
        entropy = -tf.reduce_sum(tf.exp(logp) * logp, axis=-1)
        data = -tf.reduce_mean(chosen * advantage) - beta * tf.reduce_mean(entropy)
        return data, regularization_loss(model, tf_dtype)

    return reinforce

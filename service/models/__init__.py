"""Model specs, built into Keras models in code; losses, optimizers, clipping and training objectives.

``layout`` is TF-free (the API uses it to check specs and describe weights before any worker is
involved); ``keras_build`` (layers, losses, optimizers, clipping) and ``objectives`` (what a train
step minimizes) import TensorFlow and run only in worker processes.
"""

from service.models.layout import (
    ACTIVATIONS,
    INITIALIZERS,
    LAYER_TYPES,
    ModelLayout,
    WeightInfo,
    model_layout,
    optimizer_state_layout,
)

__all__ = [
    "ACTIVATIONS",
    "INITIALIZERS",
    "LAYER_TYPES",
    "ModelLayout",
    "WeightInfo",
    "model_layout",
    "optimizer_state_layout",
]

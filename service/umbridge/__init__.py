"""UM-Bridge (protocol 1.0) for tapeserve, without TensorFlow: models, their jobs, the wire format.

``spec`` loads and checks models (the models file and the generic model's config), ``jobs`` turns
the protocol's four computations into GradientJobs, ``protocol`` holds the wire schemas and errors.
The HTTP endpoints are in ``service.api.routes.umbridge``.
"""

from service.umbridge.protocol import PROTOCOL_VERSION, UMBridgeError, from_tapeserve_error
from service.umbridge.spec import (
    FEATURES,
    GENERIC_MODEL,
    ModelsFileError,
    UMModel,
    load_models_file,
    model_from_config,
)

__all__ = [
    "FEATURES",
    "GENERIC_MODEL",
    "PROTOCOL_VERSION",
    "ModelsFileError",
    "UMBridgeError",
    "UMModel",
    "from_tapeserve_error",
    "load_models_file",
    "model_from_config",
]

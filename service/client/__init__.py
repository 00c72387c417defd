"""The tapeserve client: exact derivatives from a tapeserve server, numpy arrays in and out.

    import numpy as np
    import service.client as ts

    with ts.Client("http://127.0.0.1:8000") as client:
        client.gradient("sum(x**2)", x=np.array([1.0, 2.0]))        # {"x": array([2., 4.])}
        x = ts.Var("x")
        client.hessian((100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(), x=[1.5, -0.5, 2.0])

``AsyncClient`` has the same methods, awaited. Needs only httpx, pydantic and numpy. The language's
built-ins (``ts.sin``, ``ts.sum``...) build expressions, as ``Var`` does.

Inside, as in httpx: small private modules behind this ``__all__``. A sans-IO core builds each
call and reads each answer; ``Client`` and ``AsyncClient`` only send and wait::

    _builder, _functions   Var, Expr and the built-ins: Python operators -> expression text
    _wire                  numpy <-> wire tensors (service.tensorcodec), request bodies as bytes
    _requests, _models     Call (method, path, body, parser) for the gradient / model and step endpoints
    _results               answers -> result objects (Derivatives, Functions, Readiness, pickers)
    _endpoints             one method per client method: its signature, docstring and Call
    _core                  configuration, the HTTP request of a Call, answer -> result or exception,
                           NDJSON lines
    _exceptions, _retry    the exception tree (one map from problem code / status to class); Retry
    _client                Client and AsyncClient: send, wait, retry

The import rule: the client imports from the server side only the base modules that anyone may
import, ``service.tensorcodec`` (the one definition of the wire format) and what it stands on,
``service.errors`` and ``service.limits``; never the API, engine, workers, expression compiler,
models, FastAPI or TensorFlow (tests/client/test_import_boundary.py checks it).
"""

from service.client import _functions
from service.client._builder import Expr, Var, call
from service.client._client import AsyncClient, AsyncTrainingRun, Client, TrainingRun
from service.client._exceptions import (
    APIError,
    ConnectError,
    DecodingError,
    DTypeError,
    EvaluationError,
    Forbidden,
    InvalidArgument,
    InvalidRequest,
    LimitExceeded,
    MemoryLimitExceeded,
    MethodNotAllowed,
    NotDifferentiable,
    NotFound,
    Overloaded,
    ParseError,
    PayloadTooLarge,
    Quarantined,
    RateLimited,
    RequestTimeout,
    ServerError,
    ShapeError,
    TapeserveError,
    Timeout,
    TransportError,
    Unauthorized,
    UnknownName,
    UnsupportedMediaType,
    UnsupportedOperation,
    WorkerCrashed,
)
from service.client._functions import *  # noqa: F403  (the built-ins, numpy-named: _functions.__all__)
from service.client._models import (
    ModelDescription,
    ModelGradient,
    StepHistory,
    StepResult,
    TrainProgress,
    TrainResult,
    WeightInfo,
)
from service.client._results import ConstantInfo, Derivatives, FunctionInfo, Functions, Meta, Readiness
from service.client._retry import Retry

__all__ = [
    "WeightInfo",
    "TrainResult",
    "TrainProgress",
    "StepResult",
    "StepHistory",
    "ModelGradient",
    "ModelDescription",
    "TrainingRun",
    "AsyncTrainingRun",
    "APIError",
    "AsyncClient",
    "Client",
    "ConnectError",
    "ConstantInfo",
    "DTypeError",
    "DecodingError",
    "Derivatives",
    "EvaluationError",
    "Expr",
    "Forbidden",
    "FunctionInfo",
    "Functions",
    "InvalidArgument",
    "InvalidRequest",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "Meta",
    "MethodNotAllowed",
    "NotDifferentiable",
    "NotFound",
    "Overloaded",
    "ParseError",
    "PayloadTooLarge",
    "Quarantined",
    "RateLimited",
    "Readiness",
    "RequestTimeout",
    "Retry",
    "ServerError",
    "ShapeError",
    "TapeserveError",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "UnknownName",
    "UnsupportedMediaType",
    "UnsupportedOperation",
    "Var",
    "WorkerCrashed",
    "call",
]
__all__ += _functions.__all__  # the built-ins

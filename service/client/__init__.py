"""A typed Python client of adapter-service: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

    from service.client import Client, NotFound

    with Client("http://127.0.0.1:8000") as client:
        result = client.predict("sst2", "a gripping, beautifully shot film")
        print(result.predictions[0].label)

Importable on its own: it needs httpx and pydantic, never torch, transformers or the server's modules, so
a process that only calls the service stays small and starts fast.

Modules: `models` (typed answers), `errors` (one exception per status, message = the server's detail),
`retry` (when and how long to wait), `calls` (request building and answer reading, shared), `sync` and
`aio` (the two clients: only sending and sleeping differ).
"""

from service.client.aio import AsyncClient
from service.client.calls import DEFAULT_URL
from service.client.errors import (
    AdapterServiceError,
    ApiError,
    BadResponse,
    Conflict,
    ConnectionFailed,
    Forbidden,
    Invalid,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from service.client.models import (
    Activation,
    ClassificationPrediction,
    Embeddings,
    Entity,
    MultilabelPrediction,
    OtherPrediction,
    Prediction,
    PredictResult,
    QAPrediction,
    Readiness,
    RegressionPrediction,
    TaskDetail,
    TaskSummary,
    TokenClassificationPrediction,
    UploadResult,
    VersionDetail,
)
from service.client.retry import RetryPolicy
from service.client.sync import Client

__all__ = [
    "DEFAULT_URL", "Activation", "AdapterServiceError", "ApiError", "AsyncClient", "BadResponse",
    "ClassificationPrediction", "Client", "Conflict", "ConnectionFailed", "Embeddings", "Entity", "Forbidden",
    "Invalid", "MultilabelPrediction", "NotFound", "OtherPrediction", "PredictResult", "Prediction",
    "QAPrediction", "Readiness", "RegressionPrediction", "RetryPolicy", "TaskDetail", "TaskSummary",
    "TokenClassificationPrediction", "TooLarge", "Unauthorized", "Unavailable", "UploadResult", "VersionDetail",
]

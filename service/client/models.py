"""The typed answers of the service: one prediction model per head type, and the management bodies.

These mirror the JSON the server writes (`service/kinds/*.py` for predictions, `service/api/routes_*.py`
for the rest) without importing the server: the client must stay importable with httpx and pydantic alone.
Unknown fields are ignored, so a newer server that adds fields does not break an older client.

`POST /predict/{task}` does not say which head type answered, so each prediction is recognised by its
shape (`entities` -> token classification, `answer` -> QA, `label` -> classification, `labels` ->
multi-label, `value` -> regression); a head type registered at run time on the server, which this client
cannot know, arrives as `OtherPrediction` with its fields kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

__all__ = [
    "Activation", "ClassificationPrediction", "Embeddings", "Entity", "MultilabelPrediction", "OtherPrediction",
    "Prediction", "PredictResult", "QAPrediction", "Readiness", "RegressionPrediction", "TaskDetail",
    "TaskSummary", "TokenClassificationPrediction", "UploadResult", "VersionDetail",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Prediction(_Body):
    """Every prediction also has `truncated`: true when the input was longer than the model accepts and was
    cut (declared last in each model, so that dumps list it last, as the server does)."""

    head_type: ClassVar[str]


class ClassificationPrediction(_Prediction):
    head_type: ClassVar[str] = "classification"
    label: str
    score: float
    scores: dict[str, float]
    truncated: bool = False


class MultilabelPrediction(_Prediction):
    head_type: ClassVar[str] = "multilabel"
    labels: list[str]
    scores: dict[str, float]
    truncated: bool = False


class RegressionPrediction(_Prediction):
    head_type: ClassVar[str] = "regression"
    value: float
    truncated: bool = False


class Entity(_Body):
    """One entity span: `text == input[start:end]` (character offsets into the input text)."""

    entity: str
    text: str
    start: int
    end: int
    score: float


class TokenClassificationPrediction(_Prediction):
    head_type: ClassVar[str] = "token-classification"
    entities: list[Entity]
    truncated: bool = False


class QAPrediction(_Prediction):
    """An extractive answer: `answer == context[start:end]`; an empty answer when none was found."""

    head_type: ClassVar[str] = "qa"
    answer: str
    start: int
    end: int
    score: float
    truncated: bool = False


class OtherPrediction(_Prediction):
    """A prediction of a head type this client does not know (registered on the server at run time): every
    field is kept (`model_extra`, or `model_dump()`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    head_type: ClassVar[str] = "other"
    truncated: bool = False


_SHAPES: list[tuple[str, type[_Prediction]]] = [
    ("entities", TokenClassificationPrediction), ("answer", QAPrediction), ("label", ClassificationPrediction),
    ("labels", MultilabelPrediction), ("value", RegressionPrediction),
]


def _shape_of(value: Any) -> str:
    if isinstance(value, _Prediction):
        return value.head_type
    if isinstance(value, dict):
        for key, cls in _SHAPES:
            if key in value:
                return cls.head_type
    return OtherPrediction.head_type


Prediction = Annotated[
    (Annotated[ClassificationPrediction, Tag(ClassificationPrediction.head_type)]
     | Annotated[MultilabelPrediction, Tag(MultilabelPrediction.head_type)]
     | Annotated[RegressionPrediction, Tag(RegressionPrediction.head_type)]
     | Annotated[TokenClassificationPrediction, Tag(TokenClassificationPrediction.head_type)]
     | Annotated[QAPrediction, Tag(QAPrediction.head_type)]
     | Annotated[OtherPrediction, Tag(OtherPrediction.head_type)]),
    Discriminator(_shape_of),
]
"""One prediction, typed by its head type (see the module docstring)."""


class PredictResult(_Body):
    """The answer of `POST /predict/{task}`: one prediction per input, in input order."""

    task: str
    version: int = Field(description="the task version that served every input of this request")
    predictions: list[Prediction]


class Embeddings(_Body):
    backbone: str
    embeddings: list[list[float]] = Field(description="L2-normalised mean-pooled backbone embeddings")


class UploadResult(_Body):
    task: str
    version: int
    sha256: str
    active: bool
    head_type: str
    labels: list[str]
    size_bytes: int


class TaskSummary(_Body):
    """A task as `GET /adapters` lists it."""

    task: str
    active_version: int
    versions: list[int]
    head_type: str
    labels: list[str]
    size_bytes: int
    resident: bool


class VersionDetail(_Body):
    version: int
    active: bool
    resident: bool
    sha256: str
    size_bytes: int
    stored_at: datetime
    manifest: dict[str, Any]


class TaskDetail(_Body):
    """A task as `GET /adapters/{task}` describes it, with every version's manifest."""

    task: str
    active_version: int
    head_type: str
    labels: list[str]
    versions: list[VersionDetail]


class Activation(_Body):
    task: str
    active_version: int
    sha256: str


class Readiness(_Body):
    """`GET /readyz`: `ready` is whether it answered 200; `checks` says which part is not ok. Other fields
    of the body (backbone, device, precision, ...) are kept (`model_extra`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    ready: bool
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
    detail: str | None = None

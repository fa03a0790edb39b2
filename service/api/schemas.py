"""Request and response bodies of the HTTP API (with the examples shown at /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.errors import InputTooLarge, InvalidInput
from service.kinds import TaskKind


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx): one sentence saying what is wrong."""

    detail: str = Field(examples=["unknown task 'sentimnet'"])


# The body shapes predict takes: exactly these fields, all present (one input, or lists of inputs).
INPUT_SHAPES: tuple[tuple[str, ...], ...] = (
    ("text",), ("text", "text_pair"), ("texts",), ("texts", "text_pairs"),
    ("question", "context"), ("questions", "contexts"),
)


def _input_field_schema(name: str) -> dict[str, Any]:
    text: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": r"\S"}
    return {"type": "array", "items": text, "minItems": 1} if name.endswith("s") else text


def _one_input_shape(schema: dict[str, Any]) -> None:
    """Publish the body as what it is: one of `INPUT_SHAPES`, each an object with exactly its fields."""
    schema.pop("properties", None)
    schema.pop("additionalProperties", None)
    schema.pop("type", None)
    schema["oneOf"] = [
        {"type": "object", "title": " + ".join(shape), "required": list(shape), "additionalProperties": False,
         "properties": {name: _input_field_schema(name) for name in shape}}
        for shape in INPUT_SHAPES
    ]


class PredictRequest(BaseModel):
    """Exactly one input shape: a text (optionally with a second text), a list of texts (optionally with
    second texts), or a question with its context (single or lists) for extractive QA."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_input_shape)

    text: str | None = None
    text_pair: str | None = None
    texts: list[str] | None = None
    text_pairs: list[str] | None = None
    question: str | None = None
    context: str | None = None
    questions: list[str] | None = None
    contexts: list[str] | None = None

    def inputs(self, kind: TaskKind | None, *, max_items: int, max_chars: int) -> tuple[list[str], list[str] | None]:
        """(texts, second texts or None) for a task of `kind` (None: plain texts, no task); for QA
        (questions, contexts).
        Raises InvalidInput (422) when the shape does not fit, InputTooLarge (413) for an over-long text."""
        given = set(self.model_fields_set)
        nulls = sorted(k for k in given if getattr(self, k) is None)
        if nulls:
            raise InvalidInput(f"'{nulls[0]}' must not be null")
        match = next((shape for shape in INPUT_SHAPES if set(shape) == given), None)
        if match is None:
            raise InvalidInput(
                "body must be one of: {text}, {text, text_pair}, {texts}, {texts, text_pairs}, "
                f"{{question, context}}, {{questions, contexts}}; got {{{', '.join(sorted(given)) or 'nothing'}}}"
            )
        first, second = match[0], (match[1] if len(match) > 1 else None)
        question_form = first.startswith("question")
        problem = (kind.input_problem(question_form=question_form, has_pairs=second is not None) if kind is not None
                   else "send text or texts" if question_form else None)
        if problem:
            raise InvalidInput(problem)
        texts = _as_list(getattr(self, first))
        pairs = _as_list(getattr(self, second)) if second else None
        if not texts:
            raise InvalidInput(f"'{first}' must not be empty")
        if len(texts) > max_items:
            raise InvalidInput(f"'{first}' has {len(texts)} items; at most {max_items} per request")
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidInput(f"'{first}' has {len(texts)} items but '{second}' has {len(pairs)}")
        for name, values in ((first, texts), (second or "", pairs or [])):  # second is None: pairs is too
            for i, value in enumerate(values):
                where = f"'{name}'" if len(values) == 1 and not name.endswith("s") else f"'{name}[{i}]'"
                if not value.strip():
                    raise InvalidInput(f"{where} is empty")
                if len(value) > max_chars:
                    raise InputTooLarge(f"{where} has {len(value)} characters; the limit is {max_chars}")
        return texts, pairs


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


PREDICT_EXAMPLES: dict[str, dict[str, Any]] = {
    "text": {"summary": "One text", "value": {"text": "a gripping, beautifully shot film"}},
    "text_pair": {
        "summary": "One text pair (paraphrase, similarity)",
        "value": {"text": "The cat sat on the mat.", "text_pair": "A cat was sitting on the mat."},
    },
    "texts": {"summary": "Several texts", "value": {"texts": ["great acting", "a waste of two hours"]}},
    "text_pairs": {
        "summary": "Several text pairs",
        "value": {"texts": ["He left early.", "Prices rose."], "text_pairs": ["He went home early.", "Prices fell."]},
    },
    "question": {
        "summary": "One question (extractive QA)",
        "value": {"question": "Where is the Eiffel Tower?", "context": "The Eiffel Tower is in Paris, France."},
    },
    "questions": {
        "summary": "Several questions (extractive QA)",
        "value": {
            "questions": ["Who wrote Hamlet?", "When was it written?"],
            "contexts": ["Hamlet was written by William Shakespeare.", "Hamlet was written around 1600."],
        },
    },
}


class _Prediction(BaseModel):
    truncated: bool | None = Field(None, description="true when the input was cut to fit the model")


class ClassificationPrediction(_Prediction):
    label: str
    score: float
    scores: dict[str, float]


class MultilabelPrediction(_Prediction):
    labels: list[str]
    scores: dict[str, float]


class RegressionPrediction(_Prediction):
    value: float


class Entity(BaseModel):
    entity: str
    text: str
    start: int
    end: int
    score: float


class TokenClassificationPrediction(_Prediction):
    entities: list[Entity]


class QAPrediction(_Prediction):
    answer: str
    start: int
    end: int
    score: float


Prediction = (ClassificationPrediction | MultilabelPrediction | RegressionPrediction | TokenClassificationPrediction
              | QAPrediction)


class PredictResponse(BaseModel):
    task: str
    version: int
    predictions: list[Prediction] = Field(
        description="One per input, shaped by the task's head type. classification: {label, score, scores}; "
        "multilabel: {labels, scores}; regression: {value}; token-classification: {entities: [{entity, text, "
        "start, end, score}]}; qa: {answer, start, end, score}; plus truncated: true when the input was cut to "
        "fit the model.",
        examples=[[{"label": "positive", "score": 0.97, "scores": {"negative": 0.03, "positive": 0.97}}]],
    )


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, examples=[["a sentence to embed", "another one"]],
                             json_schema_extra={"items": _input_field_schema("text")})


class EmbedResponse(BaseModel):
    backbone: str
    embeddings: list[list[float]] = Field(description="L2-normalised mean-pooled backbone embeddings")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, examples=[1])

    @field_validator("version", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        """A JSON number, as JSON Schema's `integer` is (2.0 counts; `true` and "2" do not, which pydantic's
        lax mode would take)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("Input should be a valid integer")
        return value


class ActivateResponse(BaseModel):
    task: str
    active_version: int
    sha256: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "degraded"]
    checks: dict[str, str] = Field(description="Each check: `ok`, or what is wrong")
    backbone: str
    device: str
    precision: str
    precision_reason: str
    forward: Literal["packed", "padded"]


class NotReadyBody(ErrorBody):
    checks: dict[str, str] = Field(description="Each check: `ok`, or what is wrong")


class UploadResponse(BaseModel):
    task: str
    version: int
    sha256: str
    active: bool
    head_type: str
    labels: list[str]
    size_bytes: int


class VersionDetail(BaseModel):
    version: int
    active: bool
    resident: bool
    sha256: str
    size_bytes: int
    stored_at: datetime
    manifest: dict[str, Any]


class TaskListItem(BaseModel):
    task: str
    active_version: int
    versions: list[int]
    head_type: str
    labels: list[str]
    size_bytes: int
    resident: bool


class TaskList(BaseModel):
    adapters: list[TaskListItem]


class TaskDetail(BaseModel):
    task: str
    active_version: int
    head_type: str
    labels: list[str]
    versions: list[VersionDetail]

"""Everything about a call that is not I/O, shared by `Client` and `AsyncClient`: which route, which
credential, what body; how an answer becomes a typed result or an exception; and, after each attempt,
whether to return, wait and retry, or raise.

The two clients only send what `Call` describes and sleep for what `settle` / `settle_error` say, so both
behave identically by construction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from service.client.errors import BadResponse, ConnectionFailed, error_from_response
from service.client.models import (
    Activation,
    Embeddings,
    PredictResult,
    Readiness,
    TaskDetail,
    TaskSummary,
    UploadResult,
)
from service.client.retry import RetryPolicy, parse_retry_after, retryable_error

log = logging.getLogger("service.client")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Role = Literal["admin", "read", "public"]
"""admin: management routes (upload, activate, delete); read: predict, embed, list, describe; public: health."""

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Credentials:
    """The admin token goes to management routes, the API key to the rest; with only one of them, it is
    sent everywhere (a server without API keys ignores it on read routes)."""

    token: str | None = None
    api_key: str | None = None

    def headers(self, role: Role) -> dict[str, str]:
        if role == "public":
            return {}
        secret = (self.token or self.api_key) if role == "admin" else (self.api_key or self.token)
        return {"Authorization": f"Bearer {secret}"} if secret else {}


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: the request to send (again, on a retry) and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    role: Role = "read"
    idempotent: bool = True
    retry: bool = True
    json: Any = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    data: Mapping[str, str] | None = None
    answers: frozenset[int] = field(default_factory=frozenset)  # error statuses `parse` reads (readyz's 503)

    def request_args(self, credentials: Credentials) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client.request` / `httpx.AsyncClient.request`."""
        args: dict[str, Any] = {"method": self.method, "url": self.path, "headers": credentials.headers(self.role)}
        if self.json is not None:
            args["json"] = self.json
        if self.files is not None:
            args["files"] = dict(self.files)
        if self.data:
            args["data"] = dict(self.data)
        return args


@dataclass(frozen=True)
class Done(Generic[T]):
    value: T


@dataclass(frozen=True)
class Wait:
    seconds: float


def settle(call: Call[T], response: httpx.Response, attempt: int, policy: RetryPolicy) -> Done[T] | Wait:
    """After an answer: the parsed result; or a wait before retrying a 503; or raise its `ApiError`."""
    if response.status_code < 400 or response.status_code in call.answers:
        return Done(call.parse(response))
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if response.status_code == 503 and call.retry and attempt < policy.max_retries:
        wait = policy.wait(attempt, retry_after)
        log.info("%s %s answered 503; retry %d/%d in %.2fs", call.method, call.path, attempt + 1,
                 policy.max_retries, wait)
        return Wait(wait)
    raise error_from_response(response, retry_after)


def settle_error(call: Call[Any], exc: httpx.TransportError, attempt: int, policy: RetryPolicy) -> Wait:
    """After a failed connection: a wait before retrying, when that is safe; else raise ConnectionFailed."""
    url = str(exc.request.url) if _has_request(exc) else call.path
    if call.retry and attempt < policy.max_retries and retryable_error(exc, call.idempotent):
        wait = policy.wait(attempt)
        log.info("%s %s failed (%s); retry %d/%d in %.2fs", call.method, url, type(exc).__name__, attempt + 1,
                 policy.max_retries, wait)
        return Wait(wait)
    reason = str(exc) or type(exc).__name__
    raise ConnectionFailed(f"{call.method} {url}: {reason}", method=call.method, url=url) from exc


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 (httpx raises RuntimeError when the error has no request)
    except RuntimeError:
        return False
    return True


# --- reading answers --------------------------------------------------------------------------------------


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        try:
            return cls.model_validate_json(response.content)
        except ValidationError as exc:
            raise BadResponse(response.status_code, f"unexpected answer to {response.request.method} "
                              f"{response.request.url.path}: {_first_problem(exc)}") from None
    return parse


def _first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')} ({exc.error_count()} problem(s))"


class _TaskList(BaseModel):
    adapters: list[TaskSummary]


def _task_list(response: httpx.Response) -> list[TaskSummary]:
    return _model(_TaskList)(response).adapters


def _nothing(response: httpx.Response) -> None:
    return None


def _readiness(response: httpx.Response) -> Readiness:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BadResponse(response.status_code, f"unexpected answer to GET /readyz: {response.text[:200]!r}")
    ready = response.status_code == 200
    fields = {"status": "ready" if ready else "not ready", **body, "ready": ready}
    try:
        return Readiness.model_validate(fields)
    except ValidationError as exc:
        raise BadResponse(response.status_code, f"unexpected answer to GET /readyz: {_first_problem(exc)}") from None


# --- the calls ----------------------------------------------------------------------------------------------


def _task_path(task: str, suffix: str = "", *, prefix: str = "/adapters/") -> str:
    if not isinstance(task, str) or not task:
        raise ValueError("task must be a non-empty string")
    return f"{prefix}{quote(task, safe='')}{suffix}"


def _strings(name: str, values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise TypeError(f"{name} takes a list of strings (for one string use {name.rstrip('s')}=)")
    return list(values)


def predict_body(
    text: str | None = None, text_pair: str | None = None, texts: Sequence[str] | None = None,
    text_pairs: Sequence[str] | None = None, question: str | None = None, context: str | None = None,
    questions: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON body of a predict request: the fields given. Which combinations fit the task's head is the
    server's to say (a 422 whose message lists the accepted shapes)."""
    fields: dict[str, Any] = {
        "text": text, "text_pair": text_pair, "texts": _strings("texts", texts),
        "text_pairs": _strings("text_pairs", text_pairs), "question": question, "context": context,
        "questions": _strings("questions", questions), "contexts": _strings("contexts", contexts),
    }
    return {k: v for k, v in fields.items() if v is not None}


def predict(task: str, body: Mapping[str, Any]) -> Call[PredictResult]:
    """POST /predict/{task}: nothing is stored, so it is safe to retry."""
    return Call("POST", _task_path(task, prefix="/predict/"), _model(PredictResult), json=dict(body))


def embed(texts: Sequence[str]) -> Call[Embeddings]:
    return Call("POST", "/embed", _model(Embeddings), json={"texts": _strings("texts", texts)})


def read_upload(source: str | os.PathLike[str] | bytes) -> tuple[str, bytes]:
    """(file name, content) of what `upload` sends: a file's bytes, or bytes as given. The server tells a
    bundle from an archive by its content; the name is only informative."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "upload.bin", bytes(source)
    path = Path(source)
    return path.name, path.read_bytes()


def upload(filename: str, content: bytes, task: str | None = None,
           labels: Sequence[str] | str | None = None) -> Call[UploadResult]:
    """POST /adapters (multipart): a bundle, or a PEFT / AdapterHub archive with `task` and `labels`. Not
    idempotent (each success stores a new version): retried only when nothing was stored (503, or no
    connection made)."""
    data: dict[str, str] = {}
    if task is not None:
        data["task"] = task
    if isinstance(labels, str):  # already the form field: "neg,pos"
        data["labels"] = labels
    elif labels is not None:
        if any("," in name for name in labels):
            raise ValueError("labels are sent comma-separated: a label may not contain a comma")
        data["labels"] = ",".join(labels)
    files = {"file": (filename, content, "application/octet-stream")}
    return Call("POST", "/adapters", _model(UploadResult), role="admin", idempotent=False, files=files, data=data)


def list_tasks() -> Call[list[TaskSummary]]:
    return Call("GET", "/adapters", _task_list)


def describe(task: str) -> Call[TaskDetail]:
    return Call("GET", _task_path(task), _model(TaskDetail))


def activate(task: str, version: int) -> Call[Activation]:
    """PUT /adapters/{task}/active: setting the same version twice is the same as once (idempotent)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError("version must be an int")
    return Call("PUT", _task_path(task, "/active"), _model(Activation), role="admin", json={"version": version})


def delete(task: str) -> Call[None]:
    """DELETE /adapters/{task}: not retried after a broken connection, where it may have happened (a retry
    would then answer 404 for a delete that succeeded)."""
    return Call("DELETE", _task_path(task), _nothing, role="admin", idempotent=False)


def ready() -> Call[Readiness]:
    """GET /readyz, answered now: a 503 is a `Readiness(ready=False)`, not retried (a probe reports)."""
    return Call("GET", "/readyz", _readiness, role="public", retry=False, answers=frozenset({503}))

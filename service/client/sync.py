"""`Client`: the blocking client (httpx.Client). Every method builds a `Call` (service.client.calls), sends
it, and follows `settle` / `settle_error` (return, sleep and retry, or raise)."""

from __future__ import annotations

import builtins
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from service.client import calls
from service.client.calls import DEFAULT_URL, Call, Credentials, Done
from service.client.models import (
    Activation,
    Embeddings,
    PredictResult,
    Readiness,
    TaskDetail,
    TaskSummary,
    UploadResult,
)
from service.client.retry import RetryPolicy

T = TypeVar("T")


class Client:
    """A blocking client of one adapter-service.

        with Client("http://127.0.0.1:8000", token="change-me") as client:
            result = client.predict("sst2", "a gripping film")

    `token` is the admin token (upload, activate, delete), `api_key` the key for predict and reads; with
    only one of them it is sent on every call. Errors raise `ApiError` subclasses carrying the server's
    `detail`; 503s and unmade connections are retried per `retry` (`max_retries` overrides its count).
    `transport` and `headers` go to the underlying `httpx.Client`.
    """

    def __init__(
        self, url: str = DEFAULT_URL, *, token: str | None = None, api_key: str | None = None,
        timeout: float | None = 60.0, retry: RetryPolicy | None = None, max_retries: int | None = None,
        headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None,
    ):
        policy = retry or RetryPolicy()
        self.retry = policy if max_retries is None else dataclasses.replace(policy, max_retries=max_retries)
        self.credentials = Credentials(token, api_key)
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)

    # --- predictions -------------------------------------------------------------------------------------

    def predict(
        self, task: str, text: str | None = None, *, text_pair: str | None = None,
        texts: Sequence[str] | None = None, text_pairs: Sequence[str] | None = None,
        question: str | None = None, context: str | None = None,
        questions: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
    ) -> PredictResult:
        """Predictions of `task`, one per input: give `text` (+ `text_pair`), `texts` (+ `text_pairs`),
        `question` + `context`, or `questions` + `contexts`, as the task's head takes them."""
        body = calls.predict_body(text, text_pair, texts, text_pairs, question, context, questions, contexts)
        return self.predict_body(task, body)

    def predict_body(self, task: str, body: Mapping[str, Any]) -> PredictResult:
        """`predict` with the request body as a dict (e.g. a line of a JSON-lines file)."""
        return self._run(calls.predict(task, body))

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Sentence embeddings from the plain backbone (no adapter)."""
        return self._run(calls.embed(texts))

    # --- tasks -------------------------------------------------------------------------------------------

    def upload(self, source: str | os.PathLike[str] | bytes, *, task: str | None = None,
               labels: Sequence[str] | str | None = None) -> UploadResult:
        """Upload a bundle (.safetensors), or an adapter archive (.zip/.tar/.tar.gz of a PEFT or AdapterHub
        folder) with the `task` name to serve it as and its `labels`; it becomes the active version."""
        filename, content = calls.read_upload(source)
        return self._run(calls.upload(filename, content, task, labels))

    def list(self) -> builtins.list[TaskSummary]:
        """Every task: active version, versions, head type, labels, size, resident."""
        return self._run(calls.list_tasks())

    def describe(self, task: str) -> TaskDetail:
        """One task with each version's manifest."""
        return self._run(calls.describe(task))

    def activate(self, task: str, version: int) -> Activation:
        """Make an existing version active (roll back or forward)."""
        return self._run(calls.activate(task, version))

    def delete(self, task: str) -> None:
        """Delete a task and all its versions."""
        self._run(calls.delete(task))

    def ready(self) -> Readiness:
        """Readiness now (not retried): `ready` false with the failing `checks` while starting or degraded."""
        return self._run(calls.ready())

    # --- plumbing ----------------------------------------------------------------------------------------

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(**call.request_args(self.credentials))
            except httpx.TransportError as exc:
                step: Done[T] | calls.Wait = calls.settle_error(call, exc, attempt, self.retry)
            else:
                step = calls.settle(call, response, attempt, self.retry)
            if isinstance(step, Done):
                return step.value
            time.sleep(step.seconds)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

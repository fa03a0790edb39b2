"""`AsyncClient`: the asyncio client (httpx.AsyncClient), the same calls and retry decisions as `Client`
(service.client.calls); only sending and sleeping are awaited."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import os
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


class AsyncClient:
    """An asyncio client of one adapter-service; arguments and results as `Client`'s.

        async with AsyncClient("http://127.0.0.1:8000") as client:
            results = await asyncio.gather(*(client.predict("sst2", t) for t in texts))

    Concurrent requests share one connection pool, and the server batches them together.
    """

    def __init__(
        self, url: str = DEFAULT_URL, *, token: str | None = None, api_key: str | None = None,
        timeout: float | None = 60.0, retry: RetryPolicy | None = None, max_retries: int | None = None,
        headers: Mapping[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None,
    ):
        policy = retry or RetryPolicy()
        self.retry = policy if max_retries is None else dataclasses.replace(policy, max_retries=max_retries)
        self.credentials = Credentials(token, api_key)
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers, transport=transport)

    # --- predictions -------------------------------------------------------------------------------------

    async def predict(
        self, task: str, text: str | None = None, *, text_pair: str | None = None,
        texts: Sequence[str] | None = None, text_pairs: Sequence[str] | None = None,
        question: str | None = None, context: str | None = None,
        questions: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
    ) -> PredictResult:
        """Predictions of `task`, one per input (see `Client.predict`)."""
        body = calls.predict_body(text, text_pair, texts, text_pairs, question, context, questions, contexts)
        return await self.predict_body(task, body)

    async def predict_body(self, task: str, body: Mapping[str, Any]) -> PredictResult:
        """`predict` with the request body as a dict."""
        return await self._run(calls.predict(task, body))

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """Sentence embeddings from the plain backbone (no adapter)."""
        return await self._run(calls.embed(texts))

    # --- tasks -------------------------------------------------------------------------------------------

    async def upload(self, source: str | os.PathLike[str] | bytes, *, task: str | None = None,
                     labels: Sequence[str] | str | None = None) -> UploadResult:
        """Upload a bundle or an adapter archive (see `Client.upload`); the file is read in a thread."""
        filename, content = await asyncio.to_thread(calls.read_upload, source)
        return await self._run(calls.upload(filename, content, task, labels))

    async def list(self) -> builtins.list[TaskSummary]:
        """Every task: active version, versions, head type, labels, size, resident."""
        return await self._run(calls.list_tasks())

    async def describe(self, task: str) -> TaskDetail:
        """One task with each version's manifest."""
        return await self._run(calls.describe(task))

    async def activate(self, task: str, version: int) -> Activation:
        """Make an existing version active (roll back or forward)."""
        return await self._run(calls.activate(task, version))

    async def delete(self, task: str) -> None:
        """Delete a task and all its versions."""
        await self._run(calls.delete(task))

    async def ready(self) -> Readiness:
        """Readiness now (not retried)."""
        return await self._run(calls.ready())

    # --- plumbing ----------------------------------------------------------------------------------------

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(**call.request_args(self.credentials))
            except httpx.TransportError as exc:
                step: Done[T] | calls.Wait = calls.settle_error(call, exc, attempt, self.retry)
            else:
                step = calls.settle(call, response, attempt, self.retry)
            if isinstance(step, Done):
                return step.value
            await asyncio.sleep(step.seconds)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

"""What both prediction protocols do with a request once parsed (`POST /predict/{task}` and the Open Inference
Protocol's `POST /v2/models/{task}/infer`): find the task's live version, batch its rows with every other
task's, and label the request for metrics."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from service.api.deps import Services
from service.api.metrics import UNKNOWN_TASK
from service.api.schemas import PredictRequest
from service.runtime.registry import TaskView


async def live_view(svc: Services, task: str) -> TaskView:
    """The task's live view: from memory, or (a task this replica has not heard of yet) looked up in the store
    once, off the event loop. TaskNotFound / StoreUnavailable."""
    view = svc.registry.get(task)
    return view if view is not None else await run_in_threadpool(svc.registry.resolve, task)


async def predict_rows(svc: Services, task: str, view: TaskView, body: PredictRequest) -> list[dict[str, Any]]:
    """The predictions of `body`'s inputs by `task@view.version`, one per input, their rows batched with other
    requests' (of any task); raises the first row's error."""
    s = svc.settings
    texts, pairs = body.inputs(view.manifest.kind, max_items=s.max_items_per_request, max_chars=s.max_text_chars)
    rows = svc.engine.encode(view.manifest, texts, pairs)
    results = await svc.batcher.submit(svc.engine.requests(task, view.version, view.manifest, rows))
    predictions = []
    for r in results:
        if r.error is not None:
            raise r.error
        assert r.prediction is not None  # every row that did not fail has its prediction
        predictions.append(r.prediction)
    return predictions


def metrics_label(svc: Services, task: str) -> str:
    """The task's name as a metrics label, or one label for every unknown name (bounded label cardinality)."""
    return task if svc.registry.get(task) is not None else UNKNOWN_TASK

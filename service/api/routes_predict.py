"""POST /predict/{task} (cross-task batched) and POST /embed (plain backbone)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, cast

from fastapi import APIRouter, Body, Depends, Path, Request

from service.api.auth import require_api_key
from service.api.contract import JSON_BODY, errors
from service.api.deps import Services, services
from service.api.errors import status_for
from service.api.responses import JSON
from service.api.schemas import PREDICT_EXAMPLES, EmbedRequest, EmbedResponse, PredictRequest, PredictResponse
from service.api.serving import live_view, metrics_label, predict_rows
from service.runtime.engine import RowRequest

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])


@router.post(
    "/predict/{task}", operation_id="predict", response_model=PredictResponse, dependencies=[JSON_BODY],
    responses=errors(400, 401, 403, 404, 413, 415, 422, 503,
                     e413="A text is over the configured character limit",
                     e422="A malformed body, an empty text, a body shape the task's head does not take (e.g. "
                          "question/context for a classifier), text_pairs of another length than texts"),
)
async def predict(
    task: Annotated[str, Path(description="The task's name", examples=["sst2"])],
    request: Request,
    body: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)],
    svc: Annotated[Services, Depends(services)],
):
    """Predict with one task. Requests for different tasks share backbone forwards."""
    t0 = time.perf_counter()
    try:
        view = await live_view(svc, task)
        predictions = await predict_rows(svc, task, view, body)
        response = JSON({"task": task, "version": view.version, "predictions": predictions})
        svc.metrics.observe_request(task, 200, time.perf_counter() - t0)
        return response
    except BaseException as exc:
        status = 499 if isinstance(exc, asyncio.CancelledError) else status_for(exc)  # 499: client went away
        svc.metrics.observe_request(metrics_label(svc, task), status, time.perf_counter() - t0)
        raise


@router.post("/embed", operation_id="embed", response_model=EmbedResponse, dependencies=[JSON_BODY],
             responses=errors(400, 401, 403, 413, 415, 422, 503, e413="A text is over the configured character limit"))
async def embed(body: EmbedRequest, svc: Annotated[Services, Depends(services)]):
    """Sentence embeddings from the plain backbone (mean-pooled, L2-normalised): no adapter."""
    s = svc.settings
    texts, _ = PredictRequest(texts=body.texts).inputs(  # the same checks as a plain-text predict
        None, max_items=s.max_items_per_request, max_chars=s.max_text_chars
    )
    rows = svc.engine.encode(None, texts)
    results = await svc.batcher.submit([RowRequest(None, 0, r) for r in rows])
    # cast: row errors are not checked here; a failed row (prediction None) fails the request as before
    embeddings = [cast("dict[str, Any]", r.prediction)["embedding"] for r in results]
    return JSON({"backbone": svc.engine.backbone.ref.id, "embeddings": embeddings})

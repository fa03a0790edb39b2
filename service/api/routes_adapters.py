"""Task management: upload, list, describe, activate (rollback / roll forward), delete."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api.auth import require_admin, require_api_key
from service.api.contract import JSON_BODY, errors, require_media_type
from service.api.deps import Services, services
from service.api.schemas import ActivateRequest, ActivateResponse, TaskDetail, TaskList, UploadResponse
from service.bundles.archive import is_archive
from service.bundles.store import VersionInfo
from service.errors import BundleTooLarge, InvalidInput

router = APIRouter(prefix="/adapters", tags=["adapters"])

TASK = Path(description="The task's name", examples=["sst2"])


def _upload_body(info: VersionInfo, active: bool) -> dict:
    m = info.manifest
    return {"task": info.task, "version": info.version, "sha256": info.sha256, "active": active,
            "head_type": m.kind.name, "labels": m.labels, "size_bytes": info.size_bytes}


@router.post(
    "", status_code=201, operation_id="upload_adapter", response_model=UploadResponse,
    dependencies=[Depends(require_admin), Depends(require_media_type("multipart/form-data"))],
    responses=errors(400, 401, 403, 413, 415, 422, 503, e413="The upload is over the size limit",
                     e422="Not a valid bundle or adapter archive (the message names the problem), or 'task' / "
                          "'labels' given with a bundle, which names its own"),
)
async def upload(
    svc: Annotated[Services, Depends(services)],
    file: Annotated[UploadFile, File(description="A bundle (.safetensors) made by `adapter-service train` or "
                                     "`import`; or a PEFT LoRA folder (adapter_config.json + "
                                     "adapter_model.safetensors) as a .zip, .tar or .tar.gz")],
    task: Annotated[str | None, Form(description="Adapter archives only: the task name to serve it as")] = None,
    labels: Annotated[str | None, Form(description="Adapter archives only: class names, comma-separated, in the "
                                       "classifier's output order (token classification: BIO tags)")] = None,
):
    """Upload a bundle: validated fully and smoke-tested, then stored as the task's next version and made
    active. An adapter archive (a PEFT LoRA folder, safetensors weights only) is converted first, with the
    same validation. Requests already admitted finish on the version they started with. `active` says
    whether it still is when the answer is written (another replica's write may have moved the pointer
    since)."""
    limit = svc.settings.upload_max_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise BundleTooLarge(file.size or len(data), limit)
    if is_archive(data):
        if not task:
            raise InvalidInput("an adapter archive needs the form field 'task' (the name to serve it as)")
        names = [x.strip() for x in labels.split(",")] if labels else None
        info = await run_in_threadpool(svc.manager.upload_archive, data, task, names, limit)
    elif task is not None or labels is not None:
        raise InvalidInput("'task' and 'labels' are for adapter archives; a bundle names its own task and labels")
    else:
        info = await run_in_threadpool(svc.manager.upload, data)
    active = await run_in_threadpool(svc.manager.is_active, info.task, info.version)
    return _upload_body(info, active)


@router.get("", operation_id="list_adapters", response_model=TaskList, dependencies=[Depends(require_api_key)],
            responses=errors(401, 403, 503))
async def list_adapters(request: Request, svc: Annotated[Services, Depends(services)]):
    """Every task: active version, versions, head type, labels, size, resident on the device or not. Called
    with a per-task API key: the tasks that key may call."""
    summaries = await run_in_threadpool(svc.manager.summaries)
    key = request.state.api_key
    if key is not None:
        summaries = [s for s in summaries if key.allows(s.task)]
    return {"adapters": [
        {"task": s.task, "active_version": s.active_version, "versions": s.versions,
         "head_type": s.active.manifest.kind.name, "labels": s.active.manifest.labels,
         "size_bytes": s.active.size_bytes, "resident": s.active_version in s.resident_versions}
        for s in summaries
    ]}


@router.get("/{task}", operation_id="describe_adapter", response_model=TaskDetail,
            dependencies=[Depends(require_api_key)], responses=errors(401, 403, 404, 503))
async def describe(task: Annotated[str, TASK], svc: Annotated[Services, Depends(services)]):
    """A task with each version's manifest (adapter config, backbone, training metrics)."""
    summary = await run_in_threadpool(svc.manager.summary, task)
    versions = await run_in_threadpool(svc.manager.versions, task)
    return {
        "task": task, "active_version": summary.active_version,
        "head_type": summary.active.manifest.kind.name, "labels": summary.active.manifest.labels,
        "versions": [
            {"version": v.version, "active": v.version == summary.active_version,
             "resident": v.version in summary.resident_versions, "sha256": v.sha256, "size_bytes": v.size_bytes,
             "stored_at": v.stored_at, "manifest": json.loads(v.manifest.model_dump_json())}
            for v in versions
        ],
    }


@router.put("/{task}/active", operation_id="activate_adapter", response_model=ActivateResponse,
            dependencies=[Depends(require_admin), JSON_BODY],
            responses=errors(400, 401, 403, 404, 415, 422, 503, e404="Unknown task or version"))
async def activate(task: Annotated[str, TASK], body: ActivateRequest, svc: Annotated[Services, Depends(services)]):
    """Make an existing version active (rollback or roll forward)."""
    info = await run_in_threadpool(svc.manager.activate, task, body.version)
    return {"task": task, "active_version": info.version, "sha256": info.sha256}


@router.delete("/{task}", status_code=204, operation_id="delete_adapter", response_class=Response,
               dependencies=[Depends(require_admin)], responses=errors(401, 403, 404, 503))
async def delete(task: Annotated[str, TASK], svc: Annotated[Services, Depends(services)]):
    """Delete a task and all its versions; predict answers 404 from now on."""
    await run_in_threadpool(svc.manager.delete, task)
    return Response(status_code=204)

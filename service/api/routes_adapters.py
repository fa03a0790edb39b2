"""Task management: upload, list, describe, activate (rollback / roll forward), delete."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api.auth import require_admin, require_api_key
from service.api.deps import Services, services
from service.api.schemas import ActivateRequest, TaskDetail, TaskList, UploadResponse
from service.bundles.archive import is_archive
from service.bundles.store import VersionInfo
from service.errors import BundleTooLarge, InvalidInput

router = APIRouter(prefix="/adapters", tags=["adapters"])

ADMIN: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing bearer token"}, 403: {"description": "Wrong token"},
}


def _upload_body(info: VersionInfo, active: bool) -> dict:
    m = info.manifest
    return {"task": info.task, "version": info.version, "sha256": info.sha256, "active": active,
            "head_type": m.kind.name, "labels": m.labels, "size_bytes": info.size_bytes}


@router.post(
    "", status_code=201, response_model=UploadResponse, dependencies=[Depends(require_admin)],
    responses={**ADMIN, 413: {"description": "Bundle over the size limit"},
               422: {"description": "Invalid bundle (the message names the problem)"}},
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


@router.get("", response_model=TaskList, dependencies=[Depends(require_api_key)])
async def list_adapters(svc: Annotated[Services, Depends(services)]):
    """Every task: active version, versions, head type, labels, size, resident on the device or not."""
    summaries = await run_in_threadpool(svc.manager.summaries)
    return {"adapters": [
        {"task": s.task, "active_version": s.active_version, "versions": s.versions,
         "head_type": s.active.manifest.kind.name, "labels": s.active.manifest.labels,
         "size_bytes": s.active.size_bytes, "resident": s.active_version in s.resident_versions}
        for s in summaries
    ]}


@router.get("/{task}", response_model=TaskDetail, dependencies=[Depends(require_api_key)],
            responses={404: {"description": "Unknown task"}})
async def describe(task: str, svc: Annotated[Services, Depends(services)]):
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


@router.put("/{task}/active", dependencies=[Depends(require_admin)],
            responses={**ADMIN, 404: {"description": "Unknown task or version"}})
async def activate(task: str, body: ActivateRequest, svc: Annotated[Services, Depends(services)]):
    """Make an existing version active (rollback or roll forward)."""
    info = await run_in_threadpool(svc.manager.activate, task, body.version)
    return {"task": task, "active_version": info.version, "sha256": info.sha256}


@router.delete("/{task}", status_code=204, dependencies=[Depends(require_admin)],
               responses={**ADMIN, 404: {"description": "Unknown task"}})
async def delete(task: str, svc: Annotated[Services, Depends(services)]):
    """Delete a task and all its versions; predict answers 404 from now on."""
    await run_in_threadpool(svc.manager.delete, task)
    return Response(status_code=204)

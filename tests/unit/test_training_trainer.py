"""Short training runs on a tiny BERT: the loss goes down, the bundle loads in the engine, and the engine's
predictions equal the trainer's own evaluation predictions for every head type and training mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from service.bundles.codec import decode_bundle
from service.bundles.manifest import HeadType
from service.modeling.backbone import load_backbone
from service.training.evaluation import engine_for, evaluate_task
from service.training.readers import TableColumns, TextExample, read_conll, read_dataset, read_squad
from service.training.trainer import TrainConfig, train
from tests.conftest import DATASETS

pytestmark = pytest.mark.skipif(not DATASETS.is_dir(), reason="../shared/datasets is not present")


def take(path, head, n, columns=None):
    """The first n examples of a shared dataset file."""
    if head is HeadType.TOKEN_CLASSIFICATION:
        out = []
        for ex in read_conll(path):
            out.append(ex)
            if len(out) == n:
                break
        return out
    if head is HeadType.QA:
        return list(read_squad(path))[:n]
    return read_dataset(path, head, columns)[:n]


def data(head: HeadType):
    """(train, eval) excerpts of real data for each head (multilabel: SST-2 sentences, made-up labels)."""
    if head is HeadType.CLASSIFICATION:
        rows = take(DATASETS / "mrpc/train.tsv", head, 60)
        return rows[:40], rows[40:]
    if head is HeadType.REGRESSION:
        rows = take(DATASETS / "stsb/train.tsv", head, 60)
        return rows[:40], rows[40:]
    if head is HeadType.MULTILABEL:
        rows = take(DATASETS / "sst2/dev.tsv", HeadType.CLASSIFICATION, 60)
        tags = [("short",) if len(r.text) < 60 else () for r in rows]
        rows = [TextExample(r.text, labels=(("pos",) if r.label == "1" else ()) + t) for r, t in zip(rows, tags)]
        return rows[:40], rows[40:]
    if head is HeadType.TOKEN_CLASSIFICATION:
        rows = take(DATASETS / "conll2003/train.txt", head, 60)
        return rows[:40], rows[40:]
    rows = take(DATASETS / "squad/dev_subset_xquad_en.json", head, 50)
    return rows[:35], rows[35:]


@pytest.fixture
def trainer_backbone(tiny_model_dirs):
    return load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")


def config(head: HeadType, **kw) -> TrainConfig:
    base = dict(task="t1", head=head, bottleneck=8, epochs=1, batch_size=8, eval_batch_size=7, max_length=96,
                lr=5e-3, progress=False, backbone="tiny")
    return TrainConfig(**{**base, **kw})


def assert_same_prediction(a, b, path="prediction"):
    """Equal structure and strings; floats equal up to float32 round-off."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_prediction(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_prediction(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def check_engine_parity(result, tiny_backbone, store, eval_set):
    store.put("t1", result.bundle)
    engine = engine_for(tiny_backbone, store)
    served = evaluate_task(engine, "t1", eval_set, batch_size=5, keep_logits=True)
    assert len(served.predictions) == len(result.predictions) == len(eval_set)
    for i, (ours, theirs) in enumerate(zip(result.predictions, served.predictions)):
        assert_same_prediction(ours, theirs, f"row {i}")
        torch.testing.assert_close(result.logits[i], served.logits[i], atol=1e-5, rtol=1e-4)
    assert served.metrics == pytest.approx(result.metrics, abs=1e-5)  # regression: float32 noise
    assert result.manifest.metrics == pytest.approx(result.metrics, abs=1e-6)


@pytest.mark.parametrize("head", list(HeadType), ids=lambda h: h.value)
def test_engine_prediction_equals_trainer_evaluation(head, trainer_backbone, tiny_backbone, store):
    train_set, eval_set = data(head)
    result = train(config(head), train_set, eval_set, backbone=trainer_backbone)
    assert result.bundle is not None and result.best_epoch == 1
    check_engine_parity(result, tiny_backbone, store, eval_set)


@pytest.mark.parametrize("variant", [
    dict(mode="head-only"),
    dict(placement="pfeiffer", train_layernorm=True, activation="relu", pooling="cls", hidden_layer=False),
], ids=["head-only", "pfeiffer-layernorm-cls"])
def test_engine_parity_for_other_modes_and_adapter_shapes(variant, trainer_backbone, tiny_backbone, store):
    train_set, eval_set = data(HeadType.CLASSIFICATION)
    result = train(config(HeadType.CLASSIFICATION, **variant), train_set, eval_set, backbone=trainer_backbone)
    if variant.get("mode") == "head-only":
        assert result.manifest.adapter is None and result.params["adapter"] == 0
    else:
        assert result.manifest.adapter.train_layernorm and result.params["adapter"] > 0
    check_engine_parity(result, tiny_backbone, store, eval_set)


def test_short_training_lowers_the_loss_and_writes_a_bundle_the_engine_loads(trainer_backbone, tiny_backbone, store):
    rows = read_dataset(DATASETS / "sst2/train.tsv", HeadType.CLASSIFICATION, TableColumns())
    train_set, eval_set = rows[:48], rows[96:128]
    result = train(config(HeadType.CLASSIFICATION, epochs=10, lr=2e-2, bottleneck=16, max_length=32), train_set,
                   eval_set, backbone=trainer_backbone, training_info={"command": "adapter-service train ..."})
    losses = [e.loss for e in result.history]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses  # random tiny backbone: a slow but clear fall
    bundle = decode_bundle(result.bundle, backbone=tiny_backbone.ref, max_bytes=len(result.bundle))
    m = bundle.manifest
    assert m.labels == ["0", "1"] and m.adapter.bottleneck == 16 and m.max_length == 32
    assert m.training["best_epoch"] == result.best_epoch and m.training["command"].startswith("adapter-service")
    assert len(m.training["history"]) == 10 and m.training["parameters"]["trainable"] == result.params["trainable"]
    assert result.params["trainable"] == result.params["adapter"] + result.params["head"]
    assert result.params["receiving_grad"] == result.params["trainable"]
    best = max(result.history, key=lambda e: e.metrics["accuracy"])
    assert m.metrics["accuracy"] == pytest.approx(best.metrics["accuracy"])
    store.put("t1", result.bundle)
    _, preds = engine_for(tiny_backbone, store).predict("t1", [e.text for e in eval_set[:3]])
    assert [p["label"] for p in preds] == [p["label"] for p in result.predictions[:3]]


def test_full_fine_tuning_reports_metrics_and_writes_no_bundle(trainer_backbone):
    train_set, eval_set = data(HeadType.REGRESSION)
    before = next(trainer_backbone.model.parameters()).detach().clone()
    result = train(config(HeadType.REGRESSION, mode="full", lr=1e-3), train_set, eval_set,
                   backbone=trainer_backbone)
    assert result.bundle is None and set(result.metrics) == {"pearson", "spearman", "mse"}
    assert result.params["trainable"] == result.params["backbone"] + result.params["head"]
    assert not torch.equal(before, next(trainer_backbone.model.parameters()))


def test_same_seed_same_weights(tiny_model_dirs):
    train_set, eval_set = data(HeadType.CLASSIFICATION)
    runs = []
    for seed in (0, 0, 1):
        bb = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
        res = train(config(HeadType.CLASSIFICATION, seed=seed, max_train_examples=30), train_set, eval_set,
                    backbone=bb)
        runs.append(decode_bundle(res.bundle, backbone=None, max_bytes=len(res.bundle)).tensors)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_config_rejects_a_metric_that_does_not_fit_the_head():
    with pytest.raises(ValueError, match="does not fit"):
        TrainConfig(task="t", head=HeadType.REGRESSION, metric="accuracy")
    assert TrainConfig(task="t", head=HeadType.CLASSIFICATION, mode="full").lr == 3e-5


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_train_then_evaluate_the_bundle(tiny_model_dirs, tmp_path):
    from service.cli import app

    lines = (DATASETS / "sst2/dev.tsv").read_text().splitlines(keepends=True)
    train_file, eval_file = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train_file.write_text("".join(lines[:61]))
    eval_file.write_text(lines[0] + "".join(lines[61:91]))
    bundle, report = tmp_path / "out" / "b.safetensors", tmp_path / "report.json"
    tiny = str(tiny_model_dirs["bert"])
    runner = CliRunner()
    res = runner.invoke(app, [
        "train", "--task", "sst2", "--head", "classification", "--train", str(train_file), "--eval", str(eval_file),
        "--out", str(bundle), "--report", str(report), "--backbone", tiny, "--device", "cpu", "--epochs", "2",
        "--bottleneck", "4", "--max-length", "32", "--label-map", "0=negative,1=positive", "--quiet",
        "--store", str(tmp_path / "store"),
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(report.read_text())
    assert summary["bundle_bytes"] == bundle.stat().st_size and summary["store"]["version"] == 1
    assert summary["command"].startswith("adapter-service train --task sst2")
    res = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--eval", str(eval_file), "--backbone", tiny,
                              "--device", "cpu", "--metric", "mcc"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["examples"] == 30 and out["metrics"]["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert -1.0 <= out["metrics"]["mcc"] <= 1.0 and not math.isnan(out["metrics"]["mcc"])
    res = runner.invoke(app, ["evaluate", "--task", "sst2", "--store", str(tmp_path / "store"), "--eval",
                              str(eval_file), "--backbone", tiny, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"] == {k: v for k, v in out["metrics"].items() if k != "mcc"}


def test_cli_reports_a_malformed_line_with_file_and_line(tmp_path):
    from service.cli import app

    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood one\t1\nmissing its label\n")
    res = CliRunner().invoke(app, ["train", "--task", "x", "--head", "classification", "--train", str(bad),
                                   "--out", str(tmp_path / "b.safetensors")])
    assert res.exit_code == 2
    assert f"{bad}:3: expected 2 tab-separated columns, found 1" in res.output

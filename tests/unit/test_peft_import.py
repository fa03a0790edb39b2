"""PEFT LoRA adapters imported as bundles, checked against the real `peft` library: tiny BERT and RoBERTa
models built in code are wrapped with `peft`, trained a few steps, saved with `save_pretrained`, imported,
and served by our engine; every row's logits equal the PEFT model's own (float32, atol 1e-4), alone and in a
mixed batch beside a bottleneck task and plain-backbone rows. Unsupported configurations and malformed
folders are refused with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.bundles.codec import decode_bundle, encode_bundle
from service.bundles.manifest import HeadType
from service.bundles.store import LocalAdapterStore
from service.errors import BundleInvalid
from service.modeling.backbone import load_backbone
from service.runtime.engine import Engine, RowRequest
from service.runtime.imports import import_peft
from tests.conftest import make_manifest
from tests.synthetic import random_tensors

ATOL = 1e-4
TEXTS = ["Hi", "John Smith flew from Paris to Berlin on Monday.", "great film, would watch it again"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]

# (case, architecture, PEFT task type, outputs, LoraConfig options)
CASES = {
    "bert-cls-qv": ("bert", TaskType.SEQ_CLS, 3, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-cls-all-dense": ("bert", TaskType.SEQ_CLS, 2,  # "dense" also hits the pooler: folded into the head
                           dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                                alpha_pattern={"bert.pooler.dense": 5})),  # PEFT matches the full module name
    "bert-rslora-patterns": ("bert", TaskType.SEQ_CLS, 2,
                             dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value"],
                                  rank_pattern={"value": 6}, alpha_pattern={"value": 3})),
    "bert-pattern-alternation": ("bert", TaskType.SEQ_CLS, 2,  # a pattern key with "|", as PEFT groups it
                                 dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"],
                                      rank_pattern={"query|value": 6}, alpha_pattern={"query|value": 3})),
    "bert-regression": ("bert", TaskType.SEQ_CLS, 1, dict(r=4, lora_alpha=4, target_modules=["query", "value"])),
    "bert-token": ("bert", TaskType.TOKEN_CLS, 5, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "roberta-cls": ("roberta", TaskType.SEQ_CLS, 3, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-qa": ("bert", TaskType.QUESTION_ANS, 2, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
}
CONTEXTS = ["Hello there, friend.", "He flew on Monday, from Paris to Berlin.", "The film was great."]


def _peft_model(model_dir: Path, task_type: TaskType, outputs: int, options: dict, seed: int = 0):
    """A PEFT LoRA model on `model_dir`, trained 3 steps on random labels (so lora_B is non-zero), in eval."""
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if task_type is TaskType.QUESTION_ANS:
        model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir))
        batch = tokenizer(TEXTS, CONTEXTS, padding=True, return_tensors="pt")
        targets = {"start_positions": torch.tensor([5, 7, 6]), "end_positions": torch.tensor([6, 9, 7])}
    else:
        auto = (AutoModelForTokenClassification if task_type is TaskType.TOKEN_CLS
                else AutoModelForSequenceClassification)
        model = auto.from_pretrained(str(model_dir), num_labels=outputs)
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        if task_type is TaskType.TOKEN_CLS:
            targets = {"labels": torch.randint(0, outputs, batch["input_ids"].shape)}
        elif outputs == 1:
            targets = {"labels": torch.rand(len(TEXTS))}
        else:
            targets = {"labels": torch.randint(0, outputs, (len(TEXTS),))}
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, **options))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(**batch, **targets).loss.backward()
        optimizer.step()
    return peft_model.eval()


def _saved(peft_model, out: Path) -> dict[str, bytes]:
    peft_model.save_pretrained(str(out))
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _peft_logits(peft_model, row) -> torch.Tensor:
    """The PEFT model's logits for one encoded row, alone (no padding)."""
    kwargs = {"input_ids": torch.tensor([row.input_ids])}
    if row.token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor([row.token_type_ids])
    with torch.no_grad():
        out = peft_model(**kwargs)
    if hasattr(out, "start_logits"):  # extractive QA: [T, 2] (start, end), as our QA head computes them
        return torch.stack((out.start_logits[0], out.end_logits[0]), -1)
    return out.logits[0]


@pytest.fixture(scope="module")
def imported(tiny_model_dirs, tmp_path_factory) -> dict[str, tuple]:
    """Every case: (PEFT model, imported bundle bytes)."""
    out = {}
    for name, (arch, task_type, outputs, options) in CASES.items():
        peft_model = _peft_model(tiny_model_dirs[arch], task_type, outputs, options)
        files = _saved(peft_model, tmp_path_factory.mktemp(name))
        backbone = load_backbone(str(tiny_model_dirs[arch]), device="cpu", dtype="float32")
        labels = TAGS if task_type is TaskType.TOKEN_CLS else None
        out[name] = (peft_model, import_peft(files, name, backbone, labels), files)
    return out


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("strategy", ["segment", "gather"])
@pytest.mark.parametrize("case", list(CASES))
def test_imported_lora_predicts_what_peft_predicts(imported, tiny_model_dirs, tmp_path, case, strategy, packing):
    arch, task_type, outputs, _ = CASES[case]
    peft_model, data, _ = imported[case]
    store = LocalAdapterStore(tmp_path / "store")
    store.put(case, data)
    backbone = load_backbone(str(tiny_model_dirs[arch]), device="cpu", dtype="float32")
    engine = Engine(backbone, store, cache_max_slots=4, strategy=strategy, packing=packing)
    manifest = store.get_info(case, 1).manifest
    assert manifest.lora is not None and manifest.adapter is None
    want_head = {TaskType.TOKEN_CLS: HeadType.TOKEN_CLASSIFICATION, TaskType.QUESTION_ANS: HeadType.QA}.get(
        task_type, HeadType.REGRESSION if outputs == 1 else HeadType.CLASSIFICATION)
    assert manifest.head_type is want_head
    rows = engine.encode(manifest, TEXTS, CONTEXTS if want_head is HeadType.QA else None)
    results = engine.run([RowRequest(case, 1, r) for r in rows], keep_logits=True)
    for row, res in zip(rows, results):
        assert res.error is None and res.logits is not None
        want = _peft_logits(peft_model, row)
        if want_head is HeadType.REGRESSION:
            want = want.reshape(1)
        assert res.logits.shape == want.shape
        assert torch.allclose(res.logits, want, atol=ATOL), (res.logits - want).abs().max()
    with peft_model.disable_adapter():  # the check can fail: LoRA really moves these logits
        plain = _peft_logits(peft_model, rows[1]).reshape(results[1].logits.shape)
    assert (plain - results[1].logits).abs().max() > 1e-3


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("strategy", ["segment", "gather"])
def test_a_mixed_batch_of_lora_bottleneck_and_plain_rows_equals_each_row_alone(imported, tiny_model_dirs, tmp_path,
                                                                               strategy, packing):
    store = LocalAdapterStore(tmp_path / "store")
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    for case in ("bert-cls-qv", "bert-token", "bert-cls-all-dense"):
        store.put(case, imported[case][1])
    native = make_manifest(backbone.ref, task="native", head_type=HeadType.CLASSIFICATION)
    store.put("native", encode_bundle(native, random_tensors(native, seed=5, std=0.2)))
    engine = Engine(backbone, store, cache_max_slots=8, strategy=strategy, packing=packing)
    requests = []
    for task in ("bert-cls-qv", "native", "bert-token", "bert-cls-all-dense"):
        manifest = store.get_info(task, 1).manifest
        requests += [RowRequest(task, 1, r) for r in engine.encode(manifest, TEXTS)]
    requests += [RowRequest(None, 0, r) for r in engine.encode(None, TEXTS[:2])]
    requests = requests[::3] + requests[1::3] + requests[2::3]  # tasks interleaved
    mixed = engine.run(requests, keep_logits=True)
    for req, got in zip(requests, mixed):
        (alone,) = engine.run([req], keep_logits=True)
        assert got.error is None and alone.error is None
        assert torch.allclose(got.logits, alone.logits, atol=ATOL), req.task
    for req, got in zip(requests, mixed):  # and the imported ones equal PEFT's own
        if req.task in imported:
            want = _peft_logits(imported[req.task][0], req.row)
            assert torch.allclose(got.logits, want, atol=ATOL), req.task


# --- refusals ---------------------------------------------------------------------------------------------


def _config_with(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    cfg = json.loads(files["adapter_config.json"])
    cfg.update(changes)
    return {**files, "adapter_config.json": json.dumps(cfg).encode()}


@pytest.mark.parametrize(("changes", "message"), [
    ({"peft_type": "IA3"}, "PEFT type 'IA3' is not supported"),
    ({"peft_type": "PREFIX_TUNING"}, "PEFT type 'PREFIX_TUNING'"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"task_type": "CAUSAL_LM"}, "task_type 'CAUSAL_LM'"),
    ({"r": 0}, "r must be an integer"),
    ({"alora_invocation_tokens": [101, 102]}, "aLoRA"),
    ({"init_lora_weights": "pissa"}, "changed the base model's weights"),
    ({"rank_pattern": {"value": 0}}, "rank must be an integer"),
    ({"lora_alpha": None}, "lora_alpha must be a number"),
])
def test_unsupported_peft_configs_are_refused_with_a_message(imported, tiny_model_dirs, changes, message):
    files = _config_with(imported["bert-cls-qv"][2], **changes)
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    with pytest.raises(BundleInvalid, match=message):
        import_peft(files, "t", backbone)


def _weights_with(files: dict[str, bytes], edit) -> dict[str, bytes]:
    tensors = dict(st_load(files["adapter_model.safetensors"]))
    edit(tensors)
    return {**files, "adapter_model.safetensors": st_save(tensors)}


def _first(tensors: dict, needle: str) -> str:
    return next(k for k in sorted(tensors) if needle in k)


@pytest.mark.parametrize(("what", "edit_or_files", "code"), [
    ("no weights file", lambda f: {k: v for k, v in f.items() if k != "adapter_model.safetensors"}, "missing_file"),
    ("no config", lambda f: {k: v for k, v in f.items() if k != "adapter_config.json"}, "missing_file"),
    ("NaN", lambda f: _weights_with(f, lambda t: t[_first(t, "lora_B")].fill_(float("nan"))), "non_finite"),
    ("wrong width", lambda f: _weights_with(f, lambda t: t.update({_first(t, "lora_A"): torch.zeros(4, 48)})),
     "bad_shape"),
    ("layer past the backbone", lambda f: _weights_with(f, lambda t: t.update(
        {k.replace("layer.1.", "layer.7."): v.clone() for k, v in list(t.items()) if "layer.1." in k})),
     "num_layers_mismatch"),
    ("LoRA on the embeddings", lambda f: _weights_with(f, lambda t: t.update(
        {"base_model.model.bert.embeddings.word_embeddings.lora_A.weight": torch.zeros(4, 32)})), "unsupported_peft"),
    ("no classifier", lambda f: _weights_with(f, lambda t: [t.pop(k) for k in list(t) if "classifier" in k]),
     "missing_tensor"),
    ("corrupt safetensors", lambda f: {**f, "adapter_model.safetensors": b"\x00" * 40}, "not_safetensors"),
    ("a RoBERTa-style head on BERT", lambda f: _weights_with(f, lambda t: t.update({
        "base_model.model.classifier.dense.weight": torch.zeros(32, 32),
        "base_model.model.classifier.dense.bias": torch.zeros(32),
        "base_model.model.classifier.out_proj.weight": t.pop("base_model.model.classifier.weight"),
        "base_model.model.classifier.out_proj.bias": t.pop("base_model.model.classifier.bias")})), "unsupported_peft"),
])
def test_malformed_peft_folders_are_refused(imported, tiny_model_dirs, what, edit_or_files, code):
    files = edit_or_files(dict(imported["bert-cls-qv"][2]))
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    with pytest.raises(BundleInvalid) as err:
        import_peft(files, "t", backbone)
    assert err.value.code == code, f"{what}: {err.value.code}: {err.value}"


def test_a_roundtrip_through_the_bundle_keeps_the_import(imported, tiny_model_dirs):
    backbone = load_backbone(str(tiny_model_dirs["roberta"]), device="cpu", dtype="float32")
    bundle = decode_bundle(imported["roberta-cls"][1], backbone=backbone.ref, max_bytes=2**26)
    assert bundle.manifest.training["imported_from"] == "peft"
    assert bundle.manifest.lora.targets == ("query", "value") and bundle.manifest.lora.scaling == 1.0


def test_the_import_command_writes_a_bundle_or_says_why_not(imported, tiny_model_dirs, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    folder = tmp_path / "peft"
    folder.mkdir()
    for name, data in imported["bert-token"][2].items():
        (folder / name).write_bytes(data)
    out, store = tmp_path / "ner.safetensors", tmp_path / "store"
    args = ["import", str(folder), "--task", "ner", "--labels", ",".join(TAGS), "--backbone",
            str(tiny_model_dirs["bert"])]
    got = CliRunner().invoke(app, [*args, "--out", str(out), "--store", str(store)])
    assert got.exit_code == 0, got.output
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    bundle = decode_bundle(out.read_bytes(), backbone=backbone.ref, max_bytes=2**26)
    assert bundle.manifest.labels == TAGS and LocalAdapterStore(store).get_active("ner") == 1
    wrong = [*args[:4], "--labels", "a,b", *args[6:], "--out", str(tmp_path / "w.safetensors")]
    got = CliRunner().invoke(app, wrong)
    assert got.exit_code == 1 and "2 labels given" in got.output and not (tmp_path / "w.safetensors").exists()
    (folder / "adapter_model.safetensors").unlink()
    got = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad.safetensors")])
    assert got.exit_code == 1 and "adapter_model.safetensors missing" in got.output
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_lora_rank_the_cache_budget_cannot_hold_in_every_slot_is_refused(imported, tiny_model_dirs, tmp_path):
    """The LoRA pool keeps every slot at the widest rank: a task that would grow it past the adapter cache's
    byte budget is refused with a message (the request fails, the service does not allocate it)."""
    store = LocalAdapterStore(tmp_path / "store")
    store.put("bert-cls-qv", imported["bert-cls-qv"][1])
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    need = store.get_info("bert-cls-qv", 1).manifest
    engine = Engine(backbone, store, cache_max_slots=64, cache_max_bytes=64 * 1024)
    assert engine.cache.footprint(need) < 64 * 1024 < engine.pool.lora.bytes_after(need.lora)
    (result,) = engine.run([RowRequest("bert-cls-qv", 1, engine.encode(need, ["hi"])[0])])
    assert isinstance(result.error, BundleInvalid) and "LoRA pool" in str(result.error)
    assert not engine.pool.lora.A  # nothing allocated


def test_the_cli_reads_pickled_weights_with_weights_only_and_refuses_code(imported, tiny_model_dirs, tmp_path):
    """Pickled adapter_model.bin (older PEFT saves) is read by the local CLI alone, with
    torch.load(weights_only=True): tensors load, a pickle that would run code is refused."""
    import pickle

    from typer.testing import CliRunner

    from service.cli import app

    files = imported["bert-cls-qv"][2]
    folder = tmp_path / "peft-bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(files["adapter_config.json"])
    torch.save(dict(st_load(files["adapter_model.safetensors"])), folder / "adapter_model.bin")
    args = ["import", str(folder), "--task", "qv", "--backbone", str(tiny_model_dirs["bert"])]
    got = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "qv.safetensors")])
    assert got.exit_code == 0, got.output
    same = decode_bundle((tmp_path / "qv.safetensors").read_bytes(), backbone=None, max_bytes=2**26)
    original = decode_bundle(imported["bert-cls-qv"][1], backbone=None, max_bytes=2**26)
    assert all(torch.equal(same.tensors[k], v) for k, v in original.tensors.items())

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    got = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad.safetensors")])
    assert got.exit_code == 1 and "could not be loaded as plain tensors" in got.output
    assert "this must never run" not in got.output

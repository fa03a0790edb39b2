"""AdapterHub adapters imported as bundles, checked against the real `adapters` library.

The library pins an older transformers than the service, so it runs in the AdapterHub peer's own virtualenv
(`../shared/peers/adapterhub/setup.sh`, built here when missing): `tests/peers/adapterhub_reference.py`
trains each adapter a few steps on a tiny BERT built in code, saves it with `save_adapter(with_head=True)`,
and records the library's logits; the service imports the folder and must give the same logits (float32,
atol 1e-4), alone and in one mixed batch with a native task. Configurations the service cannot serve
exactly are refused with a message naming them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from service.bundles.adapterhub import PICKLED
from service.bundles.codec import decode_bundle, encode_bundle
from service.bundles.manifest import HeadType
from service.bundles.store import LocalAdapterStore
from service.errors import BundleInvalid
from service.modeling.backbone import load_backbone
from service.runtime.engine import Engine, RowRequest
from service.runtime.imports import import_folder, safetensors_from_pickle
from tests.conftest import REPO, make_manifest
from tests.synthetic import random_tensors

pytestmark = pytest.mark.peers

PEER_VENV = "/tmp/peervenv"
SETUP = REPO.parent / "shared" / "peers" / "adapterhub" / "setup.sh"
ATOL = 1e-4
TEXTS = ["Hi", "John Smith flew from Paris to Berlin on Monday.", "great film, would watch it again"]
CONTEXTS = ["Hello there, friend.", "He flew on Monday, from Paris to Berlin.", "The film was great."]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _bn(**over) -> dict:
    """A bottleneck config dict with the Houlsby wiring (double_seq_bn's defaults), overridden."""
    base = {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "swish",
            "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True}
    return {**base, **over}


# name: (adapter config, head, labels, our head type, the service's labels or None)
SERVED = {
    "houlsby-cls": ("double_seq_bn", "classification", 3, HeadType.CLASSIFICATION),
    "houlsby-relu-scaled": (_bn(reduction_factor=8, non_linearity="relu", scaling=0.5, leave_out=[0]),
                            "classification", 2, HeadType.CLASSIFICATION),
    "attention-only-regression": (_bn(output_adapter=False, non_linearity="gelu"), "regression", 1,
                                  HeadType.REGRESSION),
    "ffn-only-multilabel": (_bn(mh_adapter=False, reduction_factor=4), "multilabel", 3, HeadType.MULTILABEL),
    "houlsby-tagging": ("double_seq_bn", "tagging", 5, HeadType.TOKEN_CLASSIFICATION),
    "houlsby-qa": ("double_seq_bn", "qa", 2, HeadType.QA),
    "roberta-houlsby-cls": ("double_seq_bn", "classification", 3, HeadType.CLASSIFICATION),  # on tiny RoBERTa
    "pfeiffer-seq-bn": ("seq_bn", "classification", 2, HeadType.CLASSIFICATION),  # the adapter reads LN(z)
    "pfeiffer-both-tagging": (_bn(original_ln_before=True, reduction_factor=8, non_linearity="gelu"), "tagging", 5,
                              HeadType.TOKEN_CLASSIFICATION),
    # the adapter's own LayerNorms: on its input and on its output, one layer left out (its output norm must
    # then give 0, not its bias), scaled; and the output one on the seq_bn wiring
    "houlsby-adapter-norms": (_bn(ln_before=True, ln_after=True, leave_out=[1], scaling=2.0, non_linearity="relu"),
                              "classification", 3, HeadType.CLASSIFICATION),
    "pfeiffer-ln-after-qa": (_bn(mh_adapter=False, original_ln_before=True, ln_after=True), "qa", 2, HeadType.QA),
}
REFUSED = {  # name: (adapter config, words of the refusal)
    "parallel": ("par_bn", "parallel adapters"),
    "compacter": ("compacter[reduction_factor=4]", "Compacter"),
    "residual-inside-norm": (_bn(ln_after=True, adapter_residual_before_ln=True), "residual inside its own LayerNorm"),
}


@pytest.fixture(scope="module")
def library(tiny_model_dirs, tmp_path_factory):
    """The peer virtualenv (built when missing) has produced every case's folder and expected logits."""
    python = f"{PEER_VENV}/bin/python"
    ready = Path(python).exists() and subprocess.run([python, "-c", "import adapters"],
                                                     capture_output=True).returncode == 0
    if not ready:
        built = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
        assert built.returncode == 0, f"could not build the AdapterHub venv:\n{built.stdout[-2000:]}{built.stderr[-2000:]}"
    out = tmp_path_factory.mktemp("adapterhub")
    every = {**SERVED, **{k: (c, "classification", 2, None) for k, (c, _) in REFUSED.items()}}
    for arch in ("bert", "roberta"):
        backbone = load_backbone(str(tiny_model_dirs[arch]), device="cpu", dtype="float32")
        engine = Engine(backbone, LocalAdapterStore(tmp_path_factory.mktemp("probe")), cache_max_slots=1)
        cases = {}
        for name, (config, head, n, _kind) in every.items():
            if _arch(name) != arch:
                continue
            qa = head == "qa"
            rows = engine.encoder.encode(TEXTS, CONTEXTS if qa else None, qa=qa)
            cases[name] = {"config": config, "head": head, "labels": n,
                           "rows": [{"input_ids": list(r.input_ids),
                                     "token_type_ids": list(r.token_type_ids or []) or None} for r in rows]}
        (out / f"cases-{arch}.json").write_text(json.dumps(cases))
        made = subprocess.run([python, str(REPO / "tests" / "peers" / "adapterhub_reference.py"),
                               str(tiny_model_dirs[arch]), str(out / "folders"), str(out / f"cases-{arch}.json")],
                              capture_output=True, text=True, timeout=600)
        assert made.returncode == 0, made.stderr[-3000:]
    return {name: _safetensors({p.name: p.read_bytes() for p in (out / "folders" / name).iterdir()}) for name in every}


def _safetensors(files: dict[str, bytes]) -> dict[str, bytes]:
    """A folder the library saved pickled (its default; the only way for ln_before) as the CLI reads it."""
    for name, safe in PICKLED.items():
        if name in files:
            files[safe] = safetensors_from_pickle(files.pop(name), name)
    return files


def _arch(case: str) -> str:
    return "roberta" if case.startswith("roberta-") else "bert"


def _labels(kind: HeadType) -> list[str] | None:
    return TAGS if kind is HeadType.TOKEN_CLASSIFICATION else None


@pytest.mark.parametrize("packing", ["on", "off"])
@pytest.mark.parametrize("case", list(SERVED))
def test_an_imported_adapterhub_adapter_predicts_what_the_library_predicts(library, tiny_model_dirs, tmp_path,
                                                                          case, packing):
    _, _, _, kind = SERVED[case]
    files = library[case]
    backbone = load_backbone(str(tiny_model_dirs[_arch(case)]), device="cpu", dtype="float32")
    store = LocalAdapterStore(tmp_path / "store")
    store.put(case, import_folder(files, case, backbone, _labels(kind)))
    manifest = store.get_info(case, 1).manifest
    assert manifest.head_type is kind and manifest.adapter is not None
    engine = Engine(backbone, store, cache_max_slots=4, packing=packing)
    rows = engine.encode(manifest, TEXTS, CONTEXTS if kind is HeadType.QA else None)
    results = engine.run([RowRequest(case, 1, r) for r in rows], keep_logits=True)
    expected = json.loads(files["expected.json"])["logits"]
    plain = LocalAdapterStore(tmp_path / "plain")  # the same head on the plain backbone: the check can fail
    bundle = decode_bundle(store.get_bytes(case, 1), backbone=None, max_bytes=2**26)
    head_only = {k: v for k, v in bundle.tensors.items() if k.startswith("head.")}
    plain.put(case, encode_bundle(manifest.model_copy(update={"adapter": None}), head_only))
    (no_adapter,) = Engine(load_backbone(str(tiny_model_dirs[_arch(case)]), device="cpu", dtype="float32"), plain,
                           cache_max_slots=1).run([RowRequest(case, 1, rows[1])], keep_logits=True)
    for res, want in zip(results, expected):
        want = torch.tensor(want).reshape(res.logits.shape)
        assert torch.allclose(res.logits, want, atol=ATOL), (res.logits - want).abs().max()
    assert (no_adapter.logits - results[1].logits).abs().max() > 1e-3


def test_one_mixed_batch_of_an_adapterhub_a_peft_lora_and_a_native_task_equals_each_row_alone(
        library, tiny_model_dirs, tmp_path):
    """One forward holding an imported AdapterHub task, an imported PEFT LoRA task, a native task and plain
    rows: every row equals the same row run alone, in every strategy and packing mode, and the imported ones
    equal their libraries' own logits."""
    from peft import TaskType

    from tests.unit.test_peft_import import _peft_logits, _peft_model, _saved

    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    store = LocalAdapterStore(tmp_path / "store")
    store.put("adapterhub", import_folder(library["houlsby-cls"], "adapterhub", backbone))
    lora = _peft_model(tiny_model_dirs["bert"], TaskType.SEQ_CLS, 2, dict(r=4, lora_alpha=8,
                                                                        target_modules=["query", "value"]))
    store.put("lora", import_folder(_saved(lora, tmp_path / "lora"), "lora", backbone))
    native = make_manifest(backbone.ref, task="native", head_type=HeadType.CLASSIFICATION)
    store.put("native", encode_bundle(native, random_tensors(native, seed=3, std=0.2)))
    expected = json.loads(library["houlsby-cls"]["expected.json"])["logits"]
    for strategy in ("segment", "gather"):
        for packing in ("on", "off"):
            engine = Engine(load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32"), store,
                            cache_max_slots=4, strategy=strategy, packing=packing)
            requests = [RowRequest(t, 1, r) for t in ("adapterhub", "lora", "native")
                        for r in engine.encode(store.get_info(t, 1).manifest, TEXTS)]
            requests += [RowRequest(None, 0, r) for r in engine.encode(None, TEXTS[:2])]
            requests = requests[::3] + requests[1::3] + requests[2::3]  # tasks interleaved
            for req, got in zip(requests, engine.run(requests, keep_logits=True)):
                (alone,) = engine.run([req], keep_logits=True)
                assert torch.allclose(got.logits, alone.logits, atol=ATOL), (strategy, packing, req.task)
                if req.task == "lora":
                    assert torch.allclose(got.logits, _peft_logits(lora, req.row), atol=ATOL)
                if req.task == "adapterhub":
                    want = torch.tensor(expected[TEXTS.index(req.row.text)])
                    assert torch.allclose(got.logits, want, atol=ATOL)


@pytest.mark.parametrize("case", list(REFUSED))
def test_adapterhub_configs_the_service_cannot_serve_exactly_are_refused(library, tiny_model_dirs, case):
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    with pytest.raises(BundleInvalid, match=REFUSED[case][1]):
        import_folder(library[case], case, backbone)


def test_a_folder_without_its_head_or_with_pickled_weights_only_is_refused(library, tiny_model_dirs):
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    files = dict(library["houlsby-cls"])
    with pytest.raises(BundleInvalid, match="head_config.json missing"):
        import_folder({k: v for k, v in files.items() if k != "head_config.json"}, "t", backbone)
    with pytest.raises(BundleInvalid, match="read by the local CLI only"):
        import_folder({k: v for k, v in files.items() if k != "adapter.safetensors"}, "t", backbone)


def test_the_cli_imports_adapterhubs_default_pickled_files(library, tiny_model_dirs, tmp_path):
    """`save_adapter` writes pickled pytorch_adapter.bin / pytorch_model_head.bin by default: the local CLI
    reads them with torch.load(weights_only=True) and gives the same bundle as the safetensors files."""
    from safetensors.torch import load as st_load
    from typer.testing import CliRunner

    from service.cli import app

    files = library["houlsby-cls"]
    folder = tmp_path / "ah"
    folder.mkdir()
    for name in ("adapter_config.json", "head_config.json"):
        (folder / name).write_bytes(files[name])
    torch.save(dict(st_load(files["adapter.safetensors"])), folder / "pytorch_adapter.bin")
    torch.save(dict(st_load(files["model_head.safetensors"])), folder / "pytorch_model_head.bin")
    out = tmp_path / "ah.safetensors"
    got = CliRunner().invoke(app, ["import", str(folder), "--task", "ah", "--labels", "a,b,c", "--backbone",
                                   str(tiny_model_dirs["bert"]), "--out", str(out)])
    assert got.exit_code == 0, got.output
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    direct = decode_bundle(import_folder(files, "ah", backbone, ["a", "b", "c"]), backbone=None, max_bytes=2**26)
    via_cli = decode_bundle(out.read_bytes(), backbone=None, max_bytes=2**26)
    assert via_cli.manifest.labels == ["a", "b", "c"]
    assert all(torch.equal(via_cli.tensors[k], v) for k, v in direct.tensors.items())


# --- export ------------------------------------------------------------------------------------------------


def _load_with_the_library(model_dir: str, folder, rows, tmp_path) -> list[torch.Tensor]:
    """The library's logits for `rows` with the exported adapter loaded by `load_adapter`."""
    (tmp_path / "rows.json").write_text(json.dumps([{"input_ids": list(r.input_ids), "token_type_ids":
                                                     list(r.token_type_ids) if r.token_type_ids else None}
                                                    for r in rows]))
    ran = subprocess.run([f"{PEER_VENV}/bin/python", str(REPO / "tests" / "peers" / "adapterhub_reference.py"),
                          "load", model_dir, str(folder), str(tmp_path / "rows.json"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return [torch.tensor(x) for x in json.loads((tmp_path / "out.json").read_text())["logits"]]


@pytest.mark.parametrize("task", ["conll2003", "squad"])
def test_a_shipped_task_exported_to_adapterhub_predicts_the_same_there(library, tmp_path, task):
    """The shipped token-level tasks on the packaged MiniLM: `adapter-service export`, then the real library's
    `load_adapter` on its own MiniLM gives the service's logits."""
    from typer.testing import CliRunner

    from service.cli import app

    folder = tmp_path / "exported"
    got = CliRunner().invoke(app, ["export", task, str(folder), "--store", str(REPO / "adapters_store")])
    assert got.exit_code == 0, got.output
    store = LocalAdapterStore(REPO / "adapters_store")
    manifest = store.get_info(task, store.get_active(task)).manifest
    engine = Engine(load_backbone(device="cpu", dtype="float32"), store, cache_max_slots=2)
    qa = manifest.kind.question_answering
    rows = engine.encode(manifest, TEXTS, CONTEXTS if qa else None)
    ours = engine.run([RowRequest(task, store.get_active(task), r) for r in rows], keep_logits=True)
    theirs = _load_with_the_library("minilm", folder, rows, tmp_path)
    for res, want in zip(ours, theirs):
        assert torch.allclose(res.logits, want.reshape(res.logits.shape), atol=ATOL), (res.logits - want).abs().max()


@pytest.mark.parametrize("case", ["houlsby-relu-scaled", "pfeiffer-seq-bn", "houlsby-adapter-norms"])
def test_an_exported_classifier_round_trips_and_mean_pooled_heads_are_refused(library, tiny_model_dirs, tmp_path,
                                                                             case):
    """A classification task with a [CLS] head exports (either wiring), loads in the library and predicts the
    same; the shipped sequence tasks (mean-pooled heads) are refused with a message."""
    from service.bundles.adapterhub import export_adapterhub

    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    data = import_folder(library[case], "cls2", backbone)  # an imported task: [CLS] head
    bundle = decode_bundle(data, backbone=backbone.ref, max_bytes=2**26)
    folder = tmp_path / "cls2"
    folder.mkdir()
    for name, content in export_adapterhub(bundle.manifest, bundle.tensors, "cls2").items():
        (folder / name).write_bytes(content)
    store = LocalAdapterStore(tmp_path / "store")
    store.put("cls2", data)
    engine = Engine(backbone, store, cache_max_slots=2)
    rows = engine.encode(bundle.manifest, TEXTS)
    ours = engine.run([RowRequest("cls2", 1, r) for r in rows], keep_logits=True)
    theirs = _load_with_the_library(str(tiny_model_dirs["bert"]), folder, rows, tmp_path)
    for res, want in zip(ours, theirs):
        assert torch.allclose(res.logits, want, atol=ATOL)
    shipped = LocalAdapterStore(REPO / "adapters_store")
    sst2 = decode_bundle(shipped.get_bytes("sst2", shipped.get_active("sst2")), backbone=None, max_bytes=2**26)
    with pytest.raises(BundleInvalid, match="pooling by 'mean' has no AdapterHub equivalent"):
        export_adapterhub(sst2.manifest, sst2.tensors, "sst2")


def _head_config_with(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    meta = json.loads(files["head_config.json"])
    meta["config"].update(changes)
    return {**files, "head_config.json": json.dumps(meta).encode()}


@pytest.mark.parametrize(("changes", "message"), [
    ({"label2id": ["a", "b"]}, "label2id must map names"),
    ({"label2id": {"a": "x", "b": 1, "c": 2}}, "not an integer"),
    ({"head_type": ["classification"]}, "malformed adapter folder|head type"),
    ({"layers": 3}, "3 layers"),
])
def test_malformed_adapterhub_head_configs_are_refused_not_crashed(library, tiny_model_dirs, changes, message):
    backbone = load_backbone(str(tiny_model_dirs["bert"]), device="cpu", dtype="float32")
    with pytest.raises(BundleInvalid, match=message):
        import_folder(_head_config_with(dict(library["houlsby-cls"]), **changes), "t", backbone)

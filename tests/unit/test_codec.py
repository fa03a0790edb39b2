"""Bundle format: round trip, and every refusal names its problem."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from service.bundles.codec import decode_bundle, encode_bundle, read_manifest
from service.bundles.layout import adapter_parameter_count, expected_shapes
from service.bundles.manifest import AdapterConfig, BackboneRef, HeadType, Manifest
from service.errors import BackboneMismatch, BundleInvalid, BundleTooLarge
from service.modeling.bottleneck import BottleneckAdapter
from tests.conftest import LABELS, make_manifest
from tests.synthetic import random_tensors

REF = BackboneRef(id="tiny", fingerprint="ab" * 32, model_type="bert", hidden_size=32, num_layers=2)
LIMIT = 64 * 1024 * 1024


def raw_bundle(manifest: Manifest | dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """Write a safetensors file without encode_bundle's checks (to build invalid bundles)."""
    meta = manifest if isinstance(manifest, dict) else json.loads(manifest.model_dump_json())
    return st_save(tensors, metadata={"manifest": json.dumps(meta)})


def valid(head_type=HeadType.CLASSIFICATION, **kw) -> tuple[Manifest, dict[str, torch.Tensor]]:
    m = make_manifest(REF, head_type=head_type, **kw)
    return m, random_tensors(m, seed=1)


def refused(data: bytes, code: str, words: str, backbone: BackboneRef | None = REF, limit: int = LIMIT):
    with pytest.raises(BundleInvalid) as err:
        decode_bundle(data, backbone=backbone, max_bytes=limit)
    assert err.value.code == code
    assert words.lower() in err.value.message.lower()
    return err.value


@pytest.mark.parametrize("head_type", list(HeadType))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_round_trip_every_head_type(head_type, placement):
    m, t = valid(head_type, adapter=AdapterConfig(placement=placement, bottleneck=4, train_layernorm=True))
    bundle = decode_bundle(encode_bundle(m, t), backbone=REF, max_bytes=LIMIT)
    assert bundle.manifest == m
    assert set(bundle.tensors) == set(t)
    for k in t:
        assert torch.equal(bundle.tensors[k], t[k])
    assert len(bundle.sha256) == 64


def test_head_only_bundle_has_no_adapter_tensors():
    m, t = valid(adapter=None)
    assert all(k.startswith("head.") for k in t)
    assert decode_bundle(encode_bundle(m, t), backbone=REF, max_bytes=LIMIT).manifest.adapter is None


@pytest.mark.parametrize("d, m", [(32, 4), (384, 64), (768, 48)])
def test_adapter_parameter_count_is_2md_plus_d_plus_m(d, m):
    expected = 2 * m * d + d + m
    assert adapter_parameter_count(d, m) == expected
    assert sum(p.numel() for p in BottleneckAdapter(d, m).parameters()) == expected
    manifest = make_manifest(REF.model_copy(update={"hidden_size": d}), adapter=AdapterConfig(bottleneck=m))
    shapes = expected_shapes(manifest)
    per_point = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("adapter.0.attn."))
    assert per_point == expected
    assert sum(1 for k in shapes if k.endswith("down.weight")) == 2 * REF.num_layers  # Houlsby: 2 per layer


def test_pfeiffer_places_one_adapter_per_layer():
    shapes = expected_shapes(make_manifest(REF, adapter=AdapterConfig(placement="pfeiffer", bottleneck=4)))
    assert {k.split(".")[2] for k in shapes if k.startswith("adapter.")} == {"ffn"}


def test_read_manifest_reads_the_header_only():
    m, t = valid()
    assert read_manifest(encode_bundle(m, t)).task == m.task


# --- refusals ---------------------------------------------------------------------------------------


def test_refuses_random_bytes():
    refused(b"\x00" * 7 + b"garbage" * 10, "not_safetensors", "safetensors")


def test_refuses_a_pickle_without_loading_it():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle was executed')",))

    refused(pickle.dumps(Boom()), "not_safetensors", "pickle")


def test_refuses_a_torch_save_checkpoint():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    refused(buf.getvalue(), "not_safetensors", "zip")


def test_refuses_a_truncated_file():
    m, t = valid()
    refused(encode_bundle(m, t)[:-100], "not_safetensors", "safetensors")


def test_refuses_safetensors_without_manifest():
    refused(st_save({"x": torch.zeros(2)}), "missing_manifest", "manifest")


def test_refuses_manifest_that_is_not_json():
    refused(st_save({"x": torch.zeros(2)}, metadata={"manifest": "{not json"}), "bad_manifest", "json")


def test_refuses_unknown_format_version():
    m, t = valid()
    refused(raw_bundle({**json.loads(m.model_dump_json()), "format_version": 99}, t), "format_version", "99")


@pytest.mark.parametrize("name", ["SST2", "../etc", "", "-x", "a" * 65, "a b", "a/b"])
def test_refuses_bad_task_name(name):
    m, t = valid()
    refused(raw_bundle({**json.loads(m.model_dump_json()), "task": name}, t), "bad_task_name", "task name")


def test_refuses_unknown_head_type():
    m, t = valid()
    refused(raw_bundle({**json.loads(m.model_dump_json()), "head_type": "summarisation"}, t),
            "unknown_head_type", "summarisation")


def test_refuses_manifest_with_a_bad_field_and_names_it():
    m, t = valid()
    raw = json.loads(m.model_dump_json())
    raw["adapter"]["bottleneck"] = -3
    err = refused(raw_bundle(raw, t), "bad_manifest", "adapter.bottleneck")
    assert "bottleneck" in err.message


def test_refuses_wrong_fingerprint():
    m, t = valid()
    other = REF.model_copy(update={"fingerprint": "cd" * 32, "id": "other-model"})
    err = refused(encode_bundle(m, t), "fingerprint_mismatch", "fingerprint", backbone=other)
    assert isinstance(err, BackboneMismatch)


def test_refuses_wrong_hidden_size():
    m, t = valid()
    err = refused(encode_bundle(m, t), "hidden_size_mismatch", "hidden size",
                  backbone=REF.model_copy(update={"hidden_size": 64}))
    assert isinstance(err, BackboneMismatch)


def test_refuses_wrong_layer_count():
    m, t = valid()
    refused(encode_bundle(m, t), "num_layers_mismatch", "layers", backbone=REF.model_copy(update={"num_layers": 6}))


def test_refuses_missing_tensor():
    m, t = valid()
    del t["adapter.1.ffn.up.weight"]
    refused(raw_bundle(m, t), "missing_tensor", "adapter.1.ffn.up.weight")


def test_refuses_extra_tensor():
    m, t = valid()
    t["adapter.9.ffn.up.weight"] = torch.zeros(8, 32)
    refused(raw_bundle(m, t), "unexpected_tensor", "adapter.9.ffn.up.weight")


def test_refuses_misshapen_tensor():
    m, t = valid()
    t["adapter.0.attn.down.weight"] = torch.zeros(32, 9)
    refused(raw_bundle(m, t), "bad_shape", "adapter.0.attn.down.weight")


def test_refuses_integer_tensor():
    m, t = valid()
    t["head.out.bias"] = torch.zeros(2, dtype=torch.int64)
    refused(raw_bundle(m, t), "bad_dtype", "head.out.bias")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite_values(bad):
    m, t = valid()
    t["adapter.0.ffn.up.bias"][3] = bad
    refused(raw_bundle(m, t), "non_finite", "adapter.0.ffn.up.bias")


def test_refuses_label_list_that_does_not_match_the_head():
    m, t = valid()
    raw = json.loads(m.model_dump_json())
    raw["labels"] = ["negative", "neutral", "positive"]  # head.out has 2 outputs
    refused(raw_bundle(raw, t), "labels_mismatch", "3 labels")


@pytest.mark.parametrize(
    "head_type, labels, words",
    [
        (HeadType.CLASSIFICATION, ["only"], "at least 2"),
        (HeadType.CLASSIFICATION, ["a", "a"], "unique"),
        (HeadType.QA, ["x"], "no labels"),
        (HeadType.TOKEN_CLASSIFICATION, ["B-PER", "I-PER"], "'O'"),
        (HeadType.TOKEN_CLASSIFICATION, ["O", "PER"], "B-<type>"),
        (HeadType.REGRESSION, ["a", "b"], "at most 1"),
    ],
)
def test_refuses_label_lists_that_do_not_fit_the_head_type(head_type, labels, words):
    m, t = valid(head_type)
    raw = json.loads(m.model_dump_json())
    raw["labels"] = labels
    refused(raw_bundle(raw, t), "bad_labels", words)


def test_refuses_a_file_over_the_size_limit():
    m, t = valid()
    data = encode_bundle(m, t)
    err = refused(data, "too_large", str(len(data) - 1), limit=len(data) - 1)
    assert isinstance(err, BundleTooLarge)


def test_encode_refuses_to_write_an_invalid_bundle():
    m, t = valid()
    t["head.out.weight"] = torch.zeros(5, 32)
    with pytest.raises(BundleInvalid):
        encode_bundle(m, t)


def test_label_names_for_every_head_type_are_valid():
    for head_type, labels in LABELS.items():
        m, t = valid(head_type)
        assert decode_bundle(encode_bundle(m, t), backbone=REF, max_bytes=LIMIT).manifest.labels == labels


@pytest.mark.parametrize("header_bytes", [0x480, 0x580])
def test_a_header_length_that_starts_like_a_pickle_is_still_read_as_safetensors(header_bytes):
    """The first two bytes of a safetensors file are its header length: 0x480 bytes reads as b"\\x80\\x04",
    the mark of a protocol-4 pickle. Such a bundle is read, and a real pickle is still refused."""
    import pickle
    import struct

    m, t = valid(adapter=None)
    data = encode_bundle(m, t)
    (n,) = struct.unpack("<Q", data[:8])
    body = data[8 : 8 + n].rstrip(b" ")
    assert len(body) <= header_bytes
    body += b" " * (header_bytes - len(body))  # the format pads its header with spaces
    padded = struct.pack("<Q", len(body)) + body + data[8 + n :]
    assert padded[:2] == bytes([0x80, header_bytes >> 8])
    assert decode_bundle(padded, backbone=REF, max_bytes=LIMIT).manifest.task == m.task
    with pytest.raises(BundleInvalid, match="pickle"):
        decode_bundle(pickle.dumps({"a": 1}, protocol=4), backbone=REF, max_bytes=LIMIT)


def test_bundles_without_lora_keep_the_format_older_replicas_read():
    """Fields added after format 1 shipped (lora, token_type_ids, backbone.intermediate_size) are written only
    when a bundle uses them, so a replica that predates them reads every other bundle during an upgrade."""
    import json
    import struct

    m, t = valid()
    m = m.model_copy(update={"backbone": m.backbone.model_copy(update={"intermediate_size": 64})})
    data = encode_bundle(m, t)
    (n,) = struct.unpack("<Q", data[:8])
    stored = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["manifest"])
    assert "lora" not in stored and "token_type_ids" not in stored and "intermediate_size" not in stored["backbone"]
    assert decode_bundle(data, backbone=REF, max_bytes=LIMIT).manifest.token_type_ids is True


def test_a_normed_adapter_round_trips_and_a_default_one_omits_the_field():
    import json
    import struct

    for reads in ("normed", "projection"):
        m, t = valid(adapter=AdapterConfig(bottleneck=8, reads=reads))
        data = encode_bundle(m, t)
        (n,) = struct.unpack("<Q", data[:8])
        stored = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["manifest"])
        assert ("reads" in stored["adapter"]) is (reads == "normed")
        assert decode_bundle(data, backbone=REF, max_bytes=LIMIT).manifest.adapter.reads == reads

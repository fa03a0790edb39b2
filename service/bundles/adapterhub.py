"""AdapterHub (`adapters` 1.x) bottleneck adapter folders -> bundles.

`save_adapter(dir, name, with_head=True)` writes `adapter_config.json` (`{"config": {...}, "name", ...}`), the
adapter weights (`adapter.safetensors`, or pickled `pytorch_adapter.bin`, which only the CLI reads), and with
a head `head_config.json` plus `model_head.safetensors` (or `pytorch_model_head.bin`). Weight names:
`<model>.encoder.layer.<i>.attention.output.adapters.<name>.adapter_down.0.weight` [m, d] (+ bias),
`...adapter_up.weight` [d, m] (+ bias), and `.output.adapters.` for the feed-forward point; heads are
`heads.<name>.<index>.weight` in the head's `nn.Sequential` (dropout, linear, activation, dropout, linear).

Served exactly: the two sequential bottleneck wirings (`original_ln_after: true, residual_before_ln: true,
adapter_residual_before_ln: false`, no gating): Houlsby's (`double_seq_bn`:
`original_ln_before: false`, the adapter reads the projection's output h: LN(h + adapter(h) + x)) and
Pfeiffer's (`seq_bn`: `original_ln_before: true`, the adapter reads LN(z), z = h + x: LN(z + adapter(LN(z))),
`AdapterConfig.reads = "normed"`), on the attention point, the feed-forward point or both, with `leave_out`
layers (zero adapters there), any reduction factor, swish/relu/gelu, and a numeric `scaling` (multiplied into
the up-projection), and the adapter's own LayerNorms (`ln_before`: on its input, `adapter_down.0`, the
down-projection then `adapter_down.1`; `ln_after`: `adapter_norm_after` on its scaled output, before the
residual add; `AdapterConfig.ln_before / ln_after`). Refused with a message naming it: parallel adapters,
Compacter/PHM, gating, `adapter_residual_before_ln`, learned scaling, and prefix tuning, LoRA, IA3, fusion or
stacks.

Heads: classification (regression when it has one label), multi-label classification, tagging and
question answering, 1 or 2 layers (tanh between them), read from the first token (`use_pooler: false`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import ValidationError

from service.bundles.codec import manifest_invalid, read_float_tensors
from service.bundles.layout import adapter_key
from service.bundles.manifest import Activation, AdapterConfig, BackboneRef, HeadConfig, Manifest, Placement
from service.errors import BundleInvalid

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"
PICKLED = {"pytorch_adapter.bin": WEIGHTS_FILE, "pytorch_model_head.bin": HEAD_WEIGHTS_FILE}
"""AdapterHub's default (pickled) file names and the safetensors names they stand for."""

_REQUIRED = {"original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
             "is_parallel": False, "phm_layer": False, "use_gating": False, "cross_adapter": False, "inv_adapter": None}
_WHY = {"is_parallel": "parallel adapters", "phm_layer": "Compacter / PHM layers", "use_gating": "gated adapters",
        "adapter_residual_before_ln": "the adapter's residual inside its own LayerNorm",
        "inv_adapter": "invertible adapters", "cross_adapter": "cross-attention adapters"}
LN_EPS = 1e-5
"""eps of the adapters' own LayerNorms (`nn.LayerNorm(hidden)` in the library: its default)."""
_ACTIVATIONS = {"swish": Activation.SWISH, "silu": Activation.SWISH, "relu": Activation.RELU,
                "gelu": Activation.GELU}
_POINT = {"attention.output": "attn", "output": "ffn"}
_KEY = re.compile(r"^(?:.*\.)?(?:encoder|transformer)\.layer\.(\d+)\.(attention\.output|output)\.adapters\.([^.]+)\."
                  r"(adapter_down\.[01]|adapter_up|adapter_norm_before|adapter_norm_after)\.(weight|bias)$")


def is_adapterhub_config(raw: bytes) -> bool:
    try:
        cfg = json.loads(raw)
    except ValueError:
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("config"), dict) and "peft_type" not in cfg


def _fail(message: str) -> BundleInvalid:
    return BundleInvalid("unsupported_adapterhub", message)


def _json(raw: bytes, name: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BundleInvalid("bad_adapterhub_config", f"{name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleInvalid("bad_adapterhub_config", f"{name} must be a JSON object")
    return data


def _adapter_config(cfg: Mapping[str, Any], backbone: BackboneRef,
                    ) -> tuple[Activation, float, set[int], Literal["projection", "normed"], bool, bool]:
    arch = cfg.get("architecture")
    if arch not in (None, "bottleneck"):
        raise _fail(f"AdapterHub architecture {arch!r} is not supported: only bottleneck adapters are imported")
    for key, want in _REQUIRED.items():
        if cfg.get(key, want) != want:
            raise _fail(f"{_WHY.get(key, key)} ({key}={cfg.get(key)!r}) is not supported: only the sequential "
                        "wirings of double_seq_bn and seq_bn are served exactly")
    act = str(cfg.get("non_linearity", "relu")).lower()
    if act not in _ACTIVATIONS:
        raise _fail(f"non_linearity {act!r} is not supported (one of {sorted(_ACTIVATIONS)})")
    scaling = cfg.get("scaling", 1.0)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise _fail(f"scaling={scaling!r} is not supported: only a fixed number")
    leave_out = cfg.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(x, int) for x in leave_out):
        raise BundleInvalid("bad_adapterhub_config", f"leave_out must be a list of layer indices, got {leave_out!r}")
    reads: Literal["projection", "normed"] = "normed" if cfg.get("original_ln_before", False) else "projection"
    ln = {key: cfg.get(key, False) for key in ("ln_before", "ln_after")}
    if not all(isinstance(v, bool) for v in ln.values()):
        raise BundleInvalid("bad_adapterhub_config", f"ln_before / ln_after must be true or false, got {ln}")
    # as the library: a layer is left out when its index is listed (no negative or out-of-range resolution)
    return (_ACTIVATIONS[act], float(scaling), {x for x in leave_out if 0 <= x < backbone.num_layers}, reads,
            ln["ln_before"], ln["ln_after"])


def convert_adapterhub(files: Mapping[str, bytes], *, task: str, backbone: BackboneRef,
                       labels: Sequence[str] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """An AdapterHub folder's files (safetensors weights) as our bundle's manifest and tensors."""
    meta = _json(files[CONFIG_FILE], CONFIG_FILE)
    cfg = meta["config"]
    if meta.get("hidden_size") not in (None, backbone.hidden_size):
        raise BundleInvalid("hidden_size_mismatch", f"the adapter is for hidden size {meta['hidden_size']}, the "
                            f"backbone's is {backbone.hidden_size}")
    activation, scaling, leave_out, reads, ln_before, ln_after = _adapter_config(cfg, backbone)
    # module -> our part: with ln_before, adapter_down is (LayerNorm, Linear, act), else (Linear, act)
    modules = {"adapter_down.0": "ln_before" if ln_before else "down", "adapter_up": "up"}
    if ln_before:  # the library's state dict has its input LayerNorm twice: also as adapter_norm_before
        modules |= {"adapter_down.1": "down", "adapter_norm_before": "ln_before (again)"}
    if ln_after:
        modules["adapter_norm_after"] = "ln_after"
    if WEIGHTS_FILE not in files:
        raise BundleInvalid("missing_file", f"{WEIGHTS_FILE} missing (pickled {next(iter(PICKLED))} is read by "
                            "the local CLI only)")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names: set[str] = set()
    for key, value in read_float_tensors(files[WEIGHTS_FILE], WEIGHTS_FILE).items():
        m = _KEY.match(key)
        if m is None:
            raise _fail(f"weights the service cannot serve: {key}")
        layer, point, name = int(m.group(1)), _POINT[m.group(2)], m.group(3)
        if not 0 <= layer < backbone.num_layers:
            raise BundleInvalid("num_layers_mismatch", f"adapter weights for layer {layer}, the backbone has "
                                f"{backbone.num_layers} layers")
        names.add(name)
        if m.group(4) not in modules:
            raise _fail(f"weights the service cannot serve with this config (ln_before={ln_before}, "
                        f"ln_after={ln_after}): {key}")
        parts.setdefault((layer, point), {})[f"{modules[m.group(4)]}.{m.group(5)}"] = value
    for found in parts.values():  # the second copy of the input LayerNorm must be the first
        for part in ("weight", "bias"):
            again = found.pop(f"ln_before (again).{part}", None)
            if again is not None and (f"ln_before.{part}" not in found
                                      or not torch.equal(again, found[f"ln_before.{part}"])):
                raise BundleInvalid("bad_weights", "adapter_norm_before and adapter_down.0 (the same LayerNorm) differ")
    if len(names) != 1:
        raise _fail(f"the folder holds adapters {sorted(names)}: import one adapter (no fusion or stacks)")
    points = {p for _, p in parts}
    if not points:
        raise BundleInvalid("missing_tensor", f"{WEIGHTS_FILE} holds no adapter weights")
    m_width = next(iter(parts.values()))["down.weight"].shape[0]
    d = backbone.hidden_size
    placement = Placement.PFEIFFER if points == {"ffn"} else Placement.HOULSBY
    adapter = AdapterConfig(placement=placement, bottleneck=m_width, activation=activation, reads=reads,
                            ln_before=ln_before, ln_after=ln_after, ln_eps=LN_EPS)
    norms = [n for n, on in (("ln_before", ln_before), ("ln_after", ln_after)) if on]
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(backbone.num_layers):
        for point in adapter.points:
            got = parts.get((layer, point))
            if got is None:  # left out (leave_out), or a placement on one point only: no adapter there, exactly
                if layer not in leave_out and point in points:
                    raise BundleInvalid("missing_tensor", f"no adapter weights for layer {layer} ({point})")
                # (an output LayerNorm of zeros too: LN_after(0) would be its bias, not 0)
                got = {"down.weight": torch.zeros(m_width, d), "down.bias": torch.zeros(m_width),
                       "up.weight": torch.zeros(d, m_width), "up.bias": torch.zeros(d),
                       **{f"{n}.{part}": torch.zeros(d) for n in norms for part in ("weight", "bias")}}
            missing = {"down.weight", "down.bias", "up.weight", "up.bias",
                       *(f"{n}.{part}" for n in norms for part in ("weight", "bias"))} - set(got)
            if missing:
                raise BundleInvalid("missing_tensor", f"layer {layer} ({point}): {sorted(missing)} missing")
            if got["down.weight"].shape != (m_width, d) or got["up.weight"].shape != (d, m_width):
                raise BundleInvalid("bad_shape", f"layer {layer} ({point}): down {list(got['down.weight'].shape)}, "
                                    f"up {list(got['up.weight'].shape)}; expected [{m_width}, {d}] and [{d}, {m_width}]")
            tensors[adapter_key(layer, point, "down.weight")] = got["down.weight"].T.contiguous()
            tensors[adapter_key(layer, point, "down.bias")] = got["down.bias"].contiguous()
            tensors[adapter_key(layer, point, "up.weight")] = (got["up.weight"] * scaling).T.contiguous()
            tensors[adapter_key(layer, point, "up.bias")] = (got["up.bias"] * scaling).contiguous()
            for n in norms:
                for part in ("weight", "bias"):
                    if got[f"{n}.{part}"].shape != (d,):
                        raise BundleInvalid("bad_shape", f"layer {layer} ({point}): {n}.{part} has shape "
                                            f"{list(got[f'{n}.{part}'].shape)}; expected [{d}]")
                    tensors[adapter_key(layer, point, f"{n}.{part}")] = got[f"{n}.{part}"].contiguous()
    head_type, head_cfg, head_tensors, head_labels = _head(files, backbone, labels)
    try:
        manifest = Manifest(task=task, head_type=head_type, labels=head_labels, head=head_cfg, adapter=adapter,
                            backbone=backbone,
                            training={"imported_from": "adapterhub", "adapters_version": meta.get("version"),
                                      "adapter_name": meta.get("name"), "config": cfg})
    except ValidationError as exc:
        raise manifest_invalid(exc) from None
    return manifest, {**tensors, **head_tensors}


_HEAD_TYPES = {"classification", "multilabel_classification", "tagging", "question_answering"}


def _head(files: Mapping[str, bytes], backbone: BackboneRef, labels: Sequence[str] | None,
          ) -> tuple[str, HeadConfig, dict[str, torch.Tensor], list[str]]:
    if HEAD_CONFIG_FILE not in files:
        raise BundleInvalid("missing_file", f"{HEAD_CONFIG_FILE} missing: save the adapter with_head=True (a task "
                            "needs its prediction head)")
    meta = _json(files[HEAD_CONFIG_FILE], HEAD_CONFIG_FILE)
    cfg = meta.get("config") or {}
    kind = cfg.get("head_type")
    if kind not in _HEAD_TYPES:
        raise _fail(f"head type {kind!r} is not supported (one of {sorted(_HEAD_TYPES)})")
    layers = cfg.get("layers", 1)
    if layers == 2 and kind in ("tagging", "question_answering"):
        raise _fail(f"a {kind} head with 2 layers is not supported (the service's token heads have one)")
    if layers not in (1, 2) or (layers == 2 and str(cfg.get("activation_function")).lower() != "tanh"):
        raise _fail(f"a {kind} head with {layers} layers and activation {cfg.get('activation_function')!r} is not "
                    "supported (1 layer, or 2 with tanh)")
    if cfg.get("use_pooler") or cfg.get("bias", True) is not True:
        raise _fail("heads reading the pooler, or without an output bias, are not supported")
    if HEAD_WEIGHTS_FILE not in files:
        raise BundleInvalid("missing_file", f"{HEAD_WEIGHTS_FILE} missing (pickled pytorch_model_head.bin is read "
                            "by the local CLI only)")
    weights = read_float_tensors(files[HEAD_WEIGHTS_FILE], HEAD_WEIGHTS_FILE)
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        m = re.match(r"^heads\.[^.]+\.(\d+)\.(weight|bias)$", key)
        if m is None:
            raise _fail(f"head weights the service cannot serve: {key}")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    linear = [by_index[i] for i in sorted(by_index)]
    if len(linear) != layers or any(set(p) != {"weight", "bias"} for p in linear):
        raise BundleInvalid("missing_tensor", f"the head has {layers} layer(s) but {HEAD_WEIGHTS_FILE} holds "
                            f"{sorted(by_index)}")
    out = linear[-1]
    tensors = {"head.out.weight": out["weight"], "head.out.bias": out["bias"]}
    if layers == 2:
        tensors |= {"head.dense.weight": linear[0]["weight"], "head.dense.bias": linear[0]["bias"]}
    for name, t in tensors.items():
        if name.endswith("weight") and t.shape[-1] != backbone.hidden_size:
            raise BundleInvalid("hidden_size_mismatch", f"head tensor {name} has shape {list(t.shape)}, the "
                                f"backbone's hidden size is {backbone.hidden_size}")
    width = out["weight"].shape[0]
    label2id = cfg.get("label2id") or {}
    if not isinstance(label2id, dict) or sorted(_as_int(v) for v in label2id.values()) != list(range(len(label2id))):
        raise BundleInvalid("bad_adapterhub_config", f"label2id must map names to 0..n-1, got {label2id!r}")
    names = list(labels) if labels is not None else [n for n, _ in sorted(label2id.items(), key=lambda kv: _as_int(kv[1]))]
    if kind == "question_answering":
        return "qa", HeadConfig(), tensors, []
    if kind == "tagging":
        return "token-classification", HeadConfig(), tensors, _check_labels(names, width)
    head_cfg = HeadConfig(pooling="cls", hidden_layer=layers == 2)
    if kind == "classification" and width == 1:
        return "regression", head_cfg, tensors, []
    return ("multilabel" if kind == "multilabel_classification" else "classification"), head_cfg, tensors, \
        _check_labels(names, width)


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BundleInvalid("bad_adapterhub_config", f"label2id id {value!r} is not an integer") from None


def _check_labels(names: list[str], width: int) -> list[str]:
    if not names:
        return [f"LABEL_{i}" for i in range(width)]
    if len(names) != width:
        raise BundleInvalid("labels_mismatch", f"{len(names)} labels, the head has {width} outputs")
    return names


# --- export ------------------------------------------------------------------------------------------------

_EXPORT_ACTIVATIONS = {Activation.SWISH: "swish", Activation.RELU: "relu", Activation.GELU: "gelu"}
_EXPORT_HEADS = {"classification": "classification", "regression": "classification",
                 "multilabel": "multilabel_classification", "token-classification": "tagging",
                 "qa": "question_answering"}


def export_adapterhub(manifest: Manifest, tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, bytes]:
    """One of our bundles as an AdapterHub adapter folder (`load_adapter(folder)` in `adapters` 1.x loads it
    and predicts the same): {file name: bytes}. Refused where AdapterHub has no exact equivalent: LoRA tasks,
    task LayerNorms, head-only tasks, mean-pooled sequence heads (AdapterHub's read the first token)."""
    from safetensors.torch import save as st_save

    if manifest.adapter is None:
        raise _fail("only bottleneck-adapter tasks export to AdapterHub (this one has "
                    f"{'LoRA' if manifest.lora is not None else 'no adapter'})")
    cfg = manifest.adapter
    if cfg.train_layernorm:
        raise _fail("task-specific LayerNorms have no AdapterHub equivalent")
    if cfg.own_norms and cfg.ln_eps != LN_EPS:
        raise _fail(f"adapter LayerNorms with eps {cfg.ln_eps} have no AdapterHub equivalent (its eps is {LN_EPS})")
    kind = manifest.kind
    if kind.sequence_level and manifest.head.pooling != "cls":
        raise _fail(f"a sequence head pooling by {manifest.head.pooling!r} has no AdapterHub equivalent (its heads "
                    "read the first token): train with --pooling cls to export")
    if manifest.kind.name not in _EXPORT_HEADS:
        raise _fail(f"head type {manifest.kind.name!r} has no AdapterHub equivalent")
    d, m, layers = manifest.backbone.hidden_size, cfg.bottleneck, manifest.backbone.num_layers
    prefix = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra"}.get(
        manifest.backbone.model_type)
    if prefix is None:
        raise _fail(f"exporting for {manifest.backbone.model_type!r} is not supported (BERT, RoBERTa, ELECTRA)")
    points = {"attn": "attention.output", "ffn": "output"}
    weights: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for point in cfg.points:
            base = f"{prefix}.encoder.layer.{layer}.{points[point]}.adapters.{name}"
            down = f"{base}.adapter_down.1" if cfg.ln_before else f"{base}.adapter_down.0"
            weights[f"{down}.weight"] = tensors[adapter_key(layer, point, "down.weight")].T.contiguous()
            weights[f"{down}.bias"] = tensors[adapter_key(layer, point, "down.bias")].contiguous()
            for on, module, ours in ((cfg.ln_before, "adapter_down.0", "ln_before"),
                                     (cfg.ln_after, "adapter_norm_after", "ln_after")):
                if on:
                    for part in ("weight", "bias"):
                        weights[f"{base}.{module}.{part}"] = tensors[adapter_key(layer, point, f"{ours}.{part}")]
            weights[f"{base}.adapter_up.weight"] = tensors[adapter_key(layer, point, "up.weight")].T.contiguous()
            weights[f"{base}.adapter_up.bias"] = tensors[adapter_key(layer, point, "up.bias")].contiguous()
    rf = d / m
    if int(d // rf) != m:  # AdapterHub computes m = int(d // reduction_factor)
        raise _fail(f"a bottleneck of {m} on hidden size {d} has no reduction factor AdapterHub maps back to {m}")
    config = {"mh_adapter": cfg.placement is Placement.HOULSBY, "output_adapter": True, "reduction_factor": rf,
              "non_linearity": _EXPORT_ACTIVATIONS[cfg.activation], "original_ln_before": cfg.reads == "normed",
              "original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
              "ln_before": cfg.ln_before, "ln_after": cfg.ln_after, "is_parallel": False, "scaling": 1.0,
              "use_gating": False,
              "init_weights": "bert", "leave_out": [], "dropout": 0.0}
    meta = {"config": config, "hidden_size": d, "model_class": f"{prefix.capitalize()}AdapterModel",
            "model_name": manifest.backbone.id, "model_type": manifest.backbone.model_type, "name": name,
            "version": "adapters.1.3.0"}
    head_kind = _EXPORT_HEADS[kind.name]
    two_layers = "head.dense.weight" in tensors
    # the keys each AdapterHub head class takes (its __init__), as `save_adapter` writes them
    head_cfg: dict[str, Any] = {"head_type": head_kind, "num_labels": 2 if kind.question_answering else
                                manifest.output_size(), "layers": 2 if two_layers else 1,
                                "activation_function": "tanh", "dropout_prob": None}
    names = manifest.labels or [f"LABEL_{i}" for i in range(head_cfg["num_labels"])]
    head_cfg["label2id"] = {label: i for i, label in enumerate(names)}
    if kind.sequence_level:
        head_cfg |= {"use_pooler": False, "bias": True}
    # nn.Sequential indices: [dropout, linear] or [dropout, linear (dense), tanh, dropout, linear (out)]
    linear = {1: "head.dense", 4: "head.out"} if two_layers else {1: "head.out"}
    head_weights = {f"heads.{name}.{i}.{part}": tensors[f"{ours}.{part}"] for i, ours in linear.items()
                    for part in ("weight", "bias")}
    head_meta = {"config": head_cfg, "hidden_size": d, "model_class": meta["model_class"],
                 "model_name": manifest.backbone.id, "model_type": manifest.backbone.model_type, "name": name,
                 "version": "adapters.1.3.0"}
    return {CONFIG_FILE: json.dumps(meta, indent=2).encode(), WEIGHTS_FILE: st_save(weights),
            HEAD_CONFIG_FILE: json.dumps(head_meta, indent=2).encode(),
            HEAD_WEIGHTS_FILE: st_save({k: v.contiguous().float() for k, v in head_weights.items()})}

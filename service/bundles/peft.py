"""PEFT LoRA folders -> bundles: the adapters people trained with Hugging Face PEFT, served beside ours.

A PEFT folder holds `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`, `use_rslora`,
`target_modules`, `rank_pattern`/`alpha_pattern`, `modules_to_save`, `task_type`) and
`adapter_model.safetensors`, whose keys name the wrapped model's modules:
`base_model.model.<model>.encoder.layer.<i>.<path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r],
plus the saved task head (`modules_to_save`: `classifier.*`, `score.*`, `qa_outputs.*`).

The conversion is exact: `W x + b + s * B (A x)` becomes the bundle's `x @ A' @ B'` with A' = A^T and
B' = s * B^T (each module's own scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA, baked in, so modules
of different ranks share one bundle, zero-padded to the largest rank), and the head is rebuilt in our layout:
BERT's sequence classifier reads the pooler (tanh(dense([CLS]))) then `classifier`, which is our sequence
head with `pooling: cls` and its hidden layer set to the backbone's own pooler (LoRA on the pooler folded
into it); RoBERTa's `classifier.dense`/`classifier.out_proj` is the same head; token classifiers and
`qa_outputs` are our token heads. Anything else is refused with a message naming it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from service.bundles.codec import read_float_tensors
from service.bundles.layout import lora_key, lora_shapes
from service.bundles.manifest import BackboneRef, HeadConfig, LoraConfig, Manifest
from service.errors import BundleInvalid

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_TYPES = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}
ROBERTA_HEADS = ("roberta", "xlm-roberta", "camembert")
"""Model types whose sequence classifier is `classifier.dense` -> tanh -> `classifier.out_proj` on the first
token, which is our sequence head with `pooling: cls`."""
_LAYER_KEY = re.compile(r"^(?:.*\.)?(?:encoder|transformer)\.layer\.(\d+)\.(.+)\.lora_([AB])\.weight$")
_POOLER_LORA = re.compile(r"^((?:.*\.)?pooler\.dense)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class PeftImport:
    """A converted PEFT adapter: the bundle's manifest and tensors."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]


def _fail(message: str) -> BundleInvalid:
    return BundleInvalid("unsupported_peft", message)


def read_peft_config(raw: bytes) -> dict[str, Any]:
    """`adapter_config.json`, checked for what this service can serve exactly."""
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleInvalid("bad_peft_config", f"{CONFIG_FILE} is not valid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise BundleInvalid("bad_peft_config", f"{CONFIG_FILE} must be a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise _fail(f"PEFT type {kind!r} is not supported: only LORA adapters are imported")
    refused = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "lora_bias": "LoRA bias terms",
               "fan_in_fan_out": "fan_in_fan_out (Conv1D layouts)", "layer_replication": "layer replication",
               "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "activated LoRA (aLoRA)",
               "use_bdlora": "BD-LoRA", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
               "arrow_config": "Arrow routing", "velora_config": "VeLoRA", "loftq_config": "LoftQ (a quantised base)",
               "megatron_config": "Megatron layers", "target_parameters": "LoRA on parameters"}
    for key, what in refused.items():
        if cfg.get(key):
            raise _fail(f"{what} ({key}) is not supported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init not in ("gaussian", "eva"):
        # PiSSA, OLoRA, CorDA, LoftQ initialisations change the base weights; PEFT rewrites the saved config to
        # `true` only when the adapter was converted to plain LoRA on save
        raise _fail(f"init_lora_weights={init!r} changed the base model's weights: save the adapter converted "
                    "to plain LoRA (path_initial_model_for_weight_conversion) to import it")
    if cfg.get("bias", "none") != "none":
        raise _fail(f"bias={cfg['bias']!r} is not supported: only bias='none' LoRA is imported")
    task_type = cfg.get("task_type")
    if task_type not in TASK_TYPES:
        raise _fail(f"task_type {task_type!r} is not supported; expected one of {sorted(TASK_TYPES)}")
    r = cfg.get("r")
    if not isinstance(r, int) or not 1 <= r <= 256:
        raise BundleInvalid("bad_peft_config", f"r must be an integer from 1 to 256, got {r!r}")
    return cfg


def _scaling(cfg: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(rank, scaling) of one module, honouring rank_pattern / alpha_pattern (PEFT matches by suffix)."""
    def pick(pattern: Mapping[str, Any], default: Any) -> Any:
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):  # as PEFT matches them (peft.utils.other)
                return value
        return default

    r = pick(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pick(cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", 8))
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 256:
        raise BundleInvalid("bad_peft_config", f"{module}: rank must be an integer from 1 to 256, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise BundleInvalid("bad_peft_config", f"{module}: lora_alpha must be a number, got {alpha!r}")
    return r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def convert_peft(
    config_raw: bytes, weights_raw: bytes, *, task: str, backbone: BackboneRef, target_paths: Mapping[str, str],
    base_weight: Callable[[str], torch.Tensor | None], labels: Sequence[str] | None = None,
) -> PeftImport:
    """Convert a PEFT LoRA folder's two files into our bundle for `task` on `backbone`.

    `target_paths` maps a module path inside one encoder layer (e.g. "attention.self.query") to its LoRA
    target name (`manifest.LORA_TARGETS`); `base_weight(name)` returns a backbone parameter by its base-model
    name (e.g. "pooler.dense.weight"), or None. `labels` name the classes (default LABEL_0, LABEL_1, ...)."""
    cfg = read_peft_config(config_raw)
    weights = read_float_tensors(weights_raw, WEIGHTS_FILE)
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    module_names: dict[tuple[int, str], str] = {}  # for rank_pattern / alpha_pattern
    pooler_lora: dict[str, torch.Tensor] = {}
    pooler_module = "pooler.dense"  # its name as PEFT matched it (e.g. bert.pooler.dense)
    head: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = key.removeprefix("base_model.model.")
        if (m := _LAYER_KEY.match(name)) is not None:
            layer, path, part = int(m.group(1)), m.group(2), m.group(3)
            target = target_paths.get(path)
            if target is None:
                raise _fail(f"LoRA on '{path}' is not supported (adaptable: {', '.join(sorted(target_paths))})")
            if not 0 <= layer < backbone.num_layers:
                raise BundleInvalid("num_layers_mismatch", f"LoRA weights for layer {layer}, but the backbone has "
                                    f"{backbone.num_layers} layers")
            lora.setdefault((layer, target), {})[part] = value
            module_names[(layer, target)] = name.rsplit(".lora_", 1)[0]
        elif (m := _POOLER_LORA.match(name)) is not None:
            pooler_lora[m.group(2)] = value
            pooler_module = m.group(1)
        elif ".lora_" in name:
            raise _fail(f"LoRA on '{name.rsplit('.lora_', 1)[0]}' is not supported (only the encoder layers' "
                        "projections and the pooler)")
        else:
            head[name] = value
    if not lora:
        raise BundleInvalid("missing_tensor", f"{WEIGHTS_FILE} holds no LoRA weights of the encoder layers")
    try:
        lora_config, tensors = _lora_tensors(cfg, lora, module_names, backbone, task)
    except ValidationError as exc:  # e.g. more than 256 ranks after rank_pattern
        raise BundleInvalid("bad_peft_config", f"the LoRA configuration does not fit: {exc.errors()[0]['msg']}") from None
    head_type, head_cfg, head_tensors, names = _head(cfg, head, (pooler_module, pooler_lora), base_weight, backbone,
                                                     labels)
    manifest = Manifest(task=task, head_type=head_type, labels=names, head=head_cfg, adapter=None,
                        lora=lora_config, backbone=backbone,
                        # PeftModelForQuestionAnswering does not pass token_type_ids on (peft 0.21): such
                        # adapters are trained, and must be served, with segment ids all zero
                        token_type_ids=cfg["task_type"] != "QUESTION_ANS",
                        training={"imported_from": "peft", "peft_version": cfg.get("peft_version"),
                                  "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                                  "r": cfg["r"], "lora_alpha": cfg.get("lora_alpha"),
                                  "use_rslora": bool(cfg.get("use_rslora")), "task_type": cfg["task_type"]})
    return PeftImport(manifest, {**tensors, **head_tensors})


def _lora_tensors(cfg: Mapping[str, Any], lora: Mapping[tuple[int, str], Mapping[str, torch.Tensor]],
                  module_names: Mapping[tuple[int, str], str], backbone: BackboneRef, task: str,
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    targets = sorted({t for _, t in lora})
    scaled: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 1
    for (layer, target), parts in lora.items():
        if "A" not in parts or "B" not in parts:
            raise BundleInvalid("missing_tensor", f"layer {layer} {target}: lora_A and lora_B are both needed")
        A, B = parts["A"], parts["B"]  # [r, in], [out, r]
        r, s = _scaling(cfg, module_names[(layer, target)])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise BundleInvalid("bad_shape", f"layer {layer} {target}: lora_A {list(A.shape)} and lora_B "
                                f"{list(B.shape)} do not have rank {r}")
        scaled[(layer, target)] = (A.T.contiguous(), (B * s).T.contiguous())  # [in, r], [r, out]
        rank = max(rank, r)
    config = LoraConfig(rank=rank, scaling=1.0, targets=tuple(targets))
    shapes = lora_shapes(Manifest(task=task, head_type="regression", adapter=None, lora=config, backbone=backbone))
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(backbone.num_layers):
        for target in config.targets:
            n_in, r_out = shapes[lora_key(layer, target, "A")][0], shapes[lora_key(layer, target, "B")][1]
            A = torch.zeros(n_in, rank)
            B = torch.zeros(rank, r_out)
            if (layer, target) in scaled:  # layers PEFT left alone (layers_to_transform) stay zero: exact
                a, b = scaled[(layer, target)]
                if a.shape[0] != n_in or b.shape[1] != r_out:
                    raise BundleInvalid("bad_shape", f"layer {layer} {target}: LoRA is {a.shape[0]} -> {b.shape[1]}, "
                                        f"the backbone's projection is {n_in} -> {r_out}")
                A[:, : a.shape[1]] = a
                B[: b.shape[0]] = b
            tensors[lora_key(layer, target, "A")] = A
            tensors[lora_key(layer, target, "B")] = B
    return config, tensors


def _head(cfg: Mapping[str, Any], head: Mapping[str, torch.Tensor],
          pooler_lora: tuple[str, Mapping[str, torch.Tensor]], base_weight: Callable[[str], torch.Tensor | None], backbone: BackboneRef, labels: Sequence[str] | None,
          ) -> tuple[str, HeadConfig, dict[str, torch.Tensor], list[str]]:
    """(head type, head config, head tensors, labels) in our layout (see the module docstring)."""
    def take(*names: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in head]
        if missing:
            raise BundleInvalid("missing_tensor", f"the saved head lacks {', '.join(missing)} (save the "
                                "classifier with modules_to_save)")
        return [head[n] for n in names]

    task_type = cfg["task_type"]
    used: set[str] = set()
    if task_type == "QUESTION_ANS":
        out_w, out_b = take("qa_outputs.weight", "qa_outputs.bias")
        used |= {"qa_outputs.weight", "qa_outputs.bias"}
        head_type, head_cfg, tensors, names = "qa", HeadConfig(), {"head.out.weight": out_w, "head.out.bias": out_b}, []
    elif task_type == "TOKEN_CLS":
        out_w, out_b = take("classifier.weight", "classifier.bias")
        used |= {"classifier.weight", "classifier.bias"}
        names = _labels(labels, out_w.shape[0])
        head_type, head_cfg = "token-classification", HeadConfig()
        tensors = {"head.out.weight": out_w, "head.out.bias": out_b}
    else:  # SEQ_CLS
        if "classifier.out_proj.weight" in head:  # RoBERTa's classification head on <s> (dense, tanh, out_proj)
            if backbone.model_type not in ROBERTA_HEADS:  # ELECTRA's has the same names and a GELU
                raise _fail(f"a {backbone.model_type} classification head (classifier.dense + out_proj) is not "
                            f"supported; only {', '.join(ROBERTA_HEADS)}'s (tanh)")
            dense_w, dense_b, out_w, out_b = take("classifier.dense.weight", "classifier.dense.bias",
                                                  "classifier.out_proj.weight", "classifier.out_proj.bias")
            used |= {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                     "classifier.out_proj.bias"}
        elif "pre_classifier.weight" in head:
            raise _fail("DistilBERT's sequence classifier (pre_classifier + ReLU) is not supported")
        else:  # BERT: the pooler, tanh(dense([CLS])), then the classifier
            out_w, out_b = take("classifier.weight", "classifier.bias")
            used |= {"classifier.weight", "classifier.bias"}
            dense_w, dense_b = _pooler(head, pooler_lora, base_weight, cfg, used)
        num = out_w.shape[0]
        head_type = "regression" if num == 1 else "classification"
        names = [] if num == 1 else _labels(labels, num)
        head_cfg = HeadConfig(pooling="cls", hidden_layer=True)
        tensors = {"head.dense.weight": dense_w, "head.dense.bias": dense_b, "head.out.weight": out_w,
                   "head.out.bias": out_b}
    extra = sorted(set(head) - used)
    if extra:
        raise _fail(f"saved modules the service cannot serve: {', '.join(extra[:5])}")
    for name, t in tensors.items():
        if name.endswith("weight") and t.shape[-1] != backbone.hidden_size:
            raise BundleInvalid("hidden_size_mismatch", f"head tensor {name} has shape {list(t.shape)}, the backbone's "
                                f"hidden size is {backbone.hidden_size}")
    return head_type, head_cfg, {k: v.contiguous() for k, v in tensors.items()}, names


def _pooler(head: Mapping[str, torch.Tensor], pooler_lora: tuple[str, Mapping[str, torch.Tensor]],
            base_weight: Callable[[str], torch.Tensor | None], cfg: Mapping[str, Any], used: set[str],
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooler's dense layer as the PEFT model ran it: saved (modules_to_save) or the backbone's own, with
    any LoRA on it folded in (W + s B A)."""
    if "bert.pooler.dense.weight" in head or "pooler.dense.weight" in head:
        prefix = "bert." if "bert.pooler.dense.weight" in head else ""
        w, b = head[f"{prefix}pooler.dense.weight"], head[f"{prefix}pooler.dense.bias"]
        used |= {f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias"}
    else:
        got_w, got_b = base_weight("pooler.dense.weight"), base_weight("pooler.dense.bias")
        if got_w is None or got_b is None:
            raise _fail("the backbone has no pooler, which a BERT sequence classifier reads")
        w, b = got_w.float(), got_b.float()
    module, parts = pooler_lora
    if parts:
        r, s = _scaling(cfg, module)
        A, B = parts.get("A"), parts.get("B")
        if A is None or B is None or A.shape != (r, w.shape[1]) or B.shape != (w.shape[0], r):
            raise BundleInvalid("bad_shape", f"{module}: lora_A and lora_B of rank {r} for a "
                                f"{w.shape[1]} -> {w.shape[0]} layer are needed, got "
                                f"{[list(t.shape) for t in (A, B) if t is not None]}")
        w = w + s * (B @ A)
    return w.clone(), b.clone()


def _labels(labels: Sequence[str] | None, count: int) -> list[str]:
    if labels is None:
        return [f"LABEL_{i}" for i in range(count)]
    if len(labels) != count:
        raise BundleInvalid("labels_mismatch", f"{len(labels)} labels given, the saved classifier has {count} outputs")
    return list(labels)

"""Adapters trained elsewhere -> our bundles, against the running backbone: PEFT LoRA folders and AdapterHub
bottleneck adapter folders.

The conversions themselves are `service.bundles.peft` and `service.bundles.adapterhub` (pure: bytes in,
tensors out); this module tells the two apart, supplies what only the loaded backbone knows (where each LoRA
target sits in a layer, the pooler's weights a BERT classifier reads) and validates the result exactly as an
upload is validated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import ValidationError

from service.bundles.adapterhub import convert_adapterhub, is_adapterhub_config
from service.bundles.codec import decode_bundle, encode_bundle, manifest_invalid
from service.bundles.manifest import LORA_TARGETS
from service.bundles.peft import CONFIG_FILE, WEIGHTS_FILE, convert_peft
from service.errors import BundleInvalid, ServiceError
from service.modeling.backbone import Backbone

MAX_IMPORT_BYTES = 512 * 1024 * 1024


def safetensors_from_pickle(data: bytes, name: str) -> bytes:
    """A pickled weights file (PEFT's `adapter_model.bin`, AdapterHub's `pytorch_adapter.bin`, the libraries'
    defaults) as safetensors bytes, loaded with torch.load(weights_only=True): tensors and plain containers
    only, no code. For the local CLI alone; never reached over HTTP. Tensors the library saved twice under two
    names (AdapterHub's `adapter_norm_before` is also `adapter_down.0`) are written as separate copies."""
    import io

    from safetensors.torch import save

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for files it refuses
        raise BundleInvalid("bad_weights", f"{name} could not be loaded as plain tensors: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleInvalid("bad_weights", f"{name} does not hold a flat dict of tensors")
    return save({k: v.contiguous().clone() for k, v in state.items()})


def import_peft(files: Mapping[str, bytes], task: str, backbone: Backbone, labels: Sequence[str] | None = None,
                ) -> bytes:
    """A PEFT LoRA folder's files (name -> bytes) as one validated bundle for `task` on `backbone`."""
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in files]
    if missing:
        hint = " (pickled adapter_model.bin is not read: save with safe_serialization)" \
            if WEIGHTS_FILE in missing and "adapter_model.bin" in files else ""
        raise BundleInvalid("missing_file", f"not a PEFT adapter folder: {', '.join(missing)} missing{hint}")
    params = dict(backbone.model.named_parameters())

    def base_weight(name: str) -> torch.Tensor | None:
        t = params.get(name)
        return None if t is None else t.detach().float().cpu()

    try:
        converted = convert_peft(
            files[CONFIG_FILE], files[WEIGHTS_FILE], task=task, backbone=backbone.ref,
            target_paths={backbone.spec.lora_target(t): t for t in LORA_TARGETS}, base_weight=base_weight,
            labels=labels,
        )
    except ValidationError as exc:  # the manifest it describes is not one (e.g. a bad task name or labels)
        raise manifest_invalid(exc) from None
    data = encode_bundle(converted.manifest, converted.tensors)
    decode_bundle(data, backbone=backbone.ref, max_bytes=MAX_IMPORT_BYTES)  # every check an upload gets
    return data


def import_adapterhub(files: Mapping[str, bytes], task: str, backbone: Backbone,
                      labels: Sequence[str] | None = None) -> bytes:
    """An AdapterHub adapter folder's files (safetensors weights) as one validated bundle for `task`."""
    manifest, tensors = convert_adapterhub(files, task=task, backbone=backbone.ref, labels=labels)
    data = encode_bundle(manifest, tensors)
    decode_bundle(data, backbone=backbone.ref, max_bytes=MAX_IMPORT_BYTES)  # every check an upload gets
    return data


def import_folder(files: Mapping[str, bytes], task: str, backbone: Backbone, labels: Sequence[str] | None = None,
                  ) -> bytes:
    """A PEFT or an AdapterHub adapter folder (told apart by its adapter_config.json) as one bundle."""
    if CONFIG_FILE not in files:
        raise BundleInvalid("missing_file", f"not an adapter folder: {CONFIG_FILE} missing")
    try:
        if is_adapterhub_config(files[CONFIG_FILE]):
            return import_adapterhub(files, task, backbone, labels)
        return import_peft(files, task, backbone, labels)
    except ServiceError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:  # a malformed config or tensor
        raise BundleInvalid("bad_adapter_folder", f"malformed adapter folder ({type(exc).__name__}: {exc})") from None

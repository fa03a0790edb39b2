"""Bundle bytes <-> (Manifest, tensors). All bundle validation lives here.

A bundle is ONE safetensors file: the tensors named in `layout.py` plus the manifest as JSON under the
`manifest` key of the safetensors `__metadata__`. Pickles are never loaded: the bytes are parsed as
safetensors or refused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.bundles.layout import expected_shapes, label_problem
from service.bundles.manifest import FORMAT_VERSION, TASK_NAME_RE, AdapterConfig, BackboneRef, Manifest
from service.errors import BackboneMismatch, BundleInvalid, BundleTooLarge
from service.kinds import kind_names

MANIFEST_KEY = "manifest"
MAX_HEADER_BYTES = 16 * 1024 * 1024
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class Bundle:
    """A decoded, validated bundle."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    sha256: str | None  # of the file; None when the caller did not ask for it (cache loads)
    size_bytes: int


def encode_bundle(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise a bundle. Checks the tensors against the manifest first, so a bad bundle is never written."""
    problem = _tensor_problem(manifest, {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()})
    if problem:
        raise BundleInvalid(problem[0], problem[1])
    meta = {MANIFEST_KEY: manifest_json(manifest)}
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)


def manifest_invalid(exc: ValidationError) -> BundleInvalid:
    """A manifest that does not validate, as the refusal naming its first bad field."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return BundleInvalid("bad_manifest", f"manifest field '{where}': {first['msg']}")


def read_float_tensors(raw: bytes, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of adapter weights (another library's, being imported) as float32 tensors."""
    try:
        return {k: v.float() for k, v in st_load(raw).items()}
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise BundleInvalid("not_safetensors", f"{name} is not a valid safetensors file: {exc}") from None


def manifest_json(manifest: Manifest) -> str:
    """The manifest as stored in a bundle. Fields added after format 1 shipped are written only when they
    differ from their defaults (lora, token_type_ids, adapter.reads / ln_before / ln_after / ln_eps), so a replica that predates them still
    reads every bundle that does not use them (a rolling upgrade); `backbone.intermediate_size` only where
    LoRA on the feed-forward needs it."""
    data = json.loads(manifest.model_dump_json())
    if manifest.lora is None:
        data.pop("lora", None)
    if manifest.token_type_ids:
        data.pop("token_type_ids", None)
    if manifest.adapter is not None:
        defaults = AdapterConfig.model_fields
        for name in ("reads", "ln_before", "ln_after", "ln_eps"):
            if getattr(manifest.adapter, name) == defaults[name].default:
                data["adapter"].pop(name, None)
    if manifest.lora is None or not {"ffn_in", "ffn_out"} & set(manifest.lora.targets):
        data["backbone"].pop("intermediate_size", None)
    return json.dumps(data, separators=(",", ":"))


def read_header(data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, or BundleInvalid("not_safetensors") saying what the bytes look like."""
    # A safetensors header is JSON right after its 8-byte length; only bytes that are not can be a pickle (a
    # header of 0x380 bytes starts with the same two bytes as a protocol-3 pickle)
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and data[8:9] != b"{":
        raise BundleInvalid("not_safetensors", "file is a Python pickle; only safetensors bundles are accepted")
    if data[:4] == b"PK\x03\x04":
        raise BundleInvalid(
            "not_safetensors", "file is a zip archive (torch.save checkpoint?); only safetensors bundles are accepted"
        )
    if len(data) < 10:
        raise BundleInvalid("not_safetensors", "file is too short to be a safetensors bundle")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise BundleInvalid("not_safetensors", "not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleInvalid("not_safetensors", "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise BundleInvalid("not_safetensors", "not a safetensors file (header is not an object)")
    return header


def read_manifest(data: bytes) -> Manifest:
    """Parse and check the manifest alone (header only: no tensor is materialised)."""
    return _parse_manifest(read_header(data))


def decode_bundle(data: bytes, *, backbone: BackboneRef | None, max_bytes: int, digest: bool = True) -> Bundle:
    """Validate `data` fully and return the bundle; raise BundleInvalid naming the first problem found.

    `backbone` is the running backbone; None skips the backbone checks (inspecting a file offline).
    `digest=False` skips the file's sha256 (a third of a cache load's time; the store already has it).
    """
    if len(data) > max_bytes:
        raise BundleTooLarge(len(data), max_bytes)
    header = read_header(data)
    manifest = _parse_manifest(header)
    if backbone is not None:
        check_backbone(manifest, backbone)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in entries.items():
        if not isinstance(info, dict) or "dtype" not in info or "shape" not in info:
            raise BundleInvalid("not_safetensors", f"not a safetensors file (bad entry for {name!r})")
    problem = _tensor_problem(manifest, {k: (v["dtype"], tuple(v["shape"])) for k, v in entries.items()})
    if problem:
        raise BundleInvalid(*problem)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt offsets/lengths
        raise BundleInvalid("not_safetensors", f"not a valid safetensors file: {exc}") from None
    _check_finite(tensors)
    return Bundle(manifest, tensors, hashlib.sha256(data).hexdigest() if digest else None, len(data))


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf. Fast path: one sum per tensor (any NaN or Inf makes the sum non-finite); only when a
    sum is non-finite (which a huge finite value can also cause) does the exact element check decide."""
    if not tensors:
        return
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()])
    if bool(torch.isfinite(sums).all()):
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise BundleInvalid("non_finite", f"tensor '{name}' contains NaN or Inf")


def check_backbone(manifest: Manifest, running: BackboneRef) -> None:
    """Raise BackboneMismatch when the bundle was trained for another backbone."""
    want = manifest.backbone
    if want.hidden_size != running.hidden_size:
        raise BackboneMismatch(
            "hidden_size_mismatch",
            f"bundle hidden size {want.hidden_size} != backbone hidden size {running.hidden_size}",
        )
    if want.num_layers != running.num_layers:
        raise BackboneMismatch(
            "num_layers_mismatch", f"bundle has {want.num_layers} layers, backbone has {running.num_layers}"
        )
    if want.intermediate_size is not None and running.intermediate_size not in (None, want.intermediate_size):
        raise BackboneMismatch(
            "intermediate_size_mismatch",
            f"bundle feed-forward width {want.intermediate_size} != backbone's {running.intermediate_size}",
        )
    if want.fingerprint != running.fingerprint:
        raise BackboneMismatch(
            "fingerprint_mismatch",
            f"bundle was trained on backbone '{want.id}' (fingerprint {want.fingerprint[:12]}), but this "
            f"service runs '{running.id}' (fingerprint {running.fingerprint[:12]})",
        )


def _parse_manifest(header: dict[str, Any]) -> Manifest:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise BundleInvalid("missing_manifest", "safetensors metadata has no 'manifest' entry")
    try:
        raw = json.loads(meta[MANIFEST_KEY])
    except (TypeError, json.JSONDecodeError):
        raise BundleInvalid("bad_manifest", "manifest is not valid JSON") from None
    if not isinstance(raw, dict):
        raise BundleInvalid("bad_manifest", "manifest must be a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleInvalid(
            "format_version", f"unsupported bundle format_version {version!r} (this service reads {FORMAT_VERSION})"
        )
    task = raw.get("task")
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task):
        raise BundleInvalid("bad_task_name", f"task name {task!r} does not match ^[a-z0-9][a-z0-9_-]{{0,63}}$")
    head = raw.get("head_type")
    if head not in kind_names():
        raise BundleInvalid("unknown_head_type", f"unknown head type {head!r}; expected one of {kind_names()}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise manifest_invalid(exc) from None
    problem = label_problem(manifest)
    if problem:
        raise BundleInvalid("bad_labels", problem)
    return manifest


def _tensor_problem(manifest: Manifest, actual: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[str, str] | None:
    """(code, message) for the first tensor that is missing, extra, misshapen or not float; else None."""
    want = expected_shapes(manifest)
    out_shape = actual.get("head.out.weight", (None, ()))[1]
    if manifest.kind.labelled and out_shape and out_shape[0] != manifest.output_size():
        return (
            "labels_mismatch",
            f"manifest lists {len(manifest.labels)} labels but head.out.weight has {out_shape[0]} outputs",
        )
    missing = sorted(set(want) - set(actual))
    if missing:
        return "missing_tensor", f"missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
    extra = sorted(set(actual) - set(want))
    if extra:
        return "unexpected_tensor", f"unexpected tensor(s): {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
    for name, shape in want.items():
        dtype, got = actual[name]
        if tuple(got) != shape:
            return "bad_shape", f"tensor '{name}' has shape {list(got)}, expected {list(shape)}"
        if _safetensors_dtype(dtype) not in FLOAT_DTYPES:
            return "bad_dtype", f"tensor '{name}' has dtype {dtype}; bundle tensors must be floating point"
    return None


def _safetensors_dtype(dtype: str) -> str:
    """Normalise a torch dtype string ('torch.float32') or a safetensors one ('F32') to the safetensors name."""
    torch_names = {
        "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float64": "F64",
    }
    return torch_names.get(dtype, dtype)

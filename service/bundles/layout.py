"""Tensor names and shapes of a bundle, derived from its manifest: the contract between training and serving.

Adapter weights use the `x @ weight` convention, so they copy straight into the serving slot pool:

    adapter.{layer}.{point}.down.weight  [d, m]     adapter.{layer}.{point}.down.bias  [m]
    adapter.{layer}.{point}.up.weight    [m, d]     adapter.{layer}.{point}.up.bias    [d]
    adapter.{layer}.{point}.norm.weight  [d]        adapter.{layer}.{point}.norm.bias  [d]   (train_layernorm only)
    adapter.{layer}.{point}.ln_before.weight [d]    adapter.{layer}.{point}.ln_before.bias [d] (ln_before only)
    adapter.{layer}.{point}.ln_after.weight [d]     adapter.{layer}.{point}.ln_after.bias [d]  (ln_after only)

LoRA (instead of adapters; `in`/`out` of the target projection, d or d_ff; B is not multiplied by the
scaling, which the manifest records):

    lora.{layer}.{target}.A  [in, r]     lora.{layer}.{target}.B  [r, out]

Heads (`C` = `Manifest.output_size()`; the kind says, `TaskKind.head_shapes`):

    head.dense.weight [d, d]   head.dense.bias [d]     (sequence-level heads with hidden_layer)
    head.out.weight   [C, d]   head.out.bias   [C]
"""

from __future__ import annotations

from service.bundles.manifest import Manifest

Shape = tuple[int, ...]


def adapter_key(layer: int, point: str, part: str) -> str:
    """e.g. adapter_key(3, "ffn", "down.weight") -> "adapter.3.ffn.down.weight"."""
    return f"adapter.{layer}.{point}.{part}"


def adapter_shapes(manifest: Manifest) -> dict[str, Shape]:
    cfg = manifest.adapter
    if cfg is None:
        return {}
    d, m = manifest.backbone.hidden_size, cfg.bottleneck
    shapes: dict[str, Shape] = {}
    for layer in range(manifest.backbone.num_layers):
        for point in cfg.points:
            shapes[adapter_key(layer, point, "down.weight")] = (d, m)
            shapes[adapter_key(layer, point, "down.bias")] = (m,)
            shapes[adapter_key(layer, point, "up.weight")] = (m, d)
            shapes[adapter_key(layer, point, "up.bias")] = (d,)
            for flag, norm in ((cfg.train_layernorm, "norm"), (cfg.ln_before, "ln_before"), (cfg.ln_after, "ln_after")):
                if flag:
                    shapes[adapter_key(layer, point, f"{norm}.weight")] = (d,)
                    shapes[adapter_key(layer, point, f"{norm}.bias")] = (d,)
    return shapes


def lora_key(layer: int, target: str, part: str) -> str:
    """e.g. lora_key(3, "query", "A") -> "lora.3.query.A"."""
    return f"lora.{layer}.{target}.{part}"


def lora_dims(manifest: Manifest, target: str) -> tuple[int, int]:
    """(in, out) width of a LoRA target projection."""
    d, inner = manifest.backbone.hidden_size, manifest.backbone.intermediate_size or 0
    return {"ffn_in": (d, inner), "ffn_out": (inner, d)}.get(target, (d, d))


def lora_shapes(manifest: Manifest) -> dict[str, Shape]:
    cfg = manifest.lora
    if cfg is None:
        return {}
    shapes: dict[str, Shape] = {}
    for layer in range(manifest.backbone.num_layers):
        for target in cfg.targets:
            n_in, n_out = lora_dims(manifest, target)
            shapes[lora_key(layer, target, "A")] = (n_in, cfg.rank)
            shapes[lora_key(layer, target, "B")] = (cfg.rank, n_out)
    return shapes


def head_shapes(manifest: Manifest) -> dict[str, Shape]:
    return manifest.kind.head_shapes(manifest.backbone.hidden_size, manifest.labels, manifest.head)


def expected_shapes(manifest: Manifest) -> dict[str, Shape]:
    """Every tensor a bundle with this manifest must hold, and nothing else."""
    return {**adapter_shapes(manifest), **lora_shapes(manifest), **head_shapes(manifest)}


def adapter_parameter_count(hidden: int, bottleneck: int) -> int:
    """Parameters of one adapter `d -> m -> d`: 2md + d + m (Houlsby et al. 2019, section 2.1)."""
    return 2 * bottleneck * hidden + hidden + bottleneck


def label_problem(manifest: Manifest) -> str | None:
    """Why the label list does not fit the head type, or None when it does."""
    labels = manifest.labels
    if len(set(labels)) != len(labels):
        return "label names must be unique"
    if any(not isinstance(x, str) or not x.strip() for x in labels):
        return "label names must be non-empty strings"
    return manifest.kind.label_problem(labels)

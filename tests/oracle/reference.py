"""A reference ("oracle") implementation of one task's forward: adapters + head, written plainly.

It serves as ground truth for the production engine (slot pool, routing, packing, gather/segment), so it
shares none of that code: it does not import `service.modeling.slot_pool`, `packed`, `bottleneck` or
`heads`. Only the bundle tensor names (`service.bundles.layout.adapter_key`) and the per-architecture module
paths (`service.modeling.backbone.ARCHITECTURES`) are borrowed, because they are the contract being checked.

One task at a time, one row at a time (batch of 1, no padding, no attention mask), on a fresh Hugging Face
load of the backbone (`attn_implementation="eager"`, float32, eval mode: dropout off). The maths, for a task
with adapter config (placement, m, act, train_layernorm) and bundle tensors:

  At every layer l and every insertion point p of the placement (houlsby: attn and ffn; pfeiffer: ffn),
  the output h [T, d] of the sublayer's output projection (BERT/RoBERTa: attention.output.dense and
  output.dense; DistilBERT: attention.out_lin and ffn.lin2) is replaced, before the residual add, by

      h' = h + (act(h @ D + b_D) @ U + b_U)

  with D = adapter.l.p.down.weight [d, m], b_D = adapter.l.p.down.bias [m], U = adapter.l.p.up.weight
  [m, d], b_U = adapter.l.p.up.bias [d] (the `x @ W` convention of the bundle layout). With
  train_layernorm, the LayerNorm that follows (on h' + residual) uses the task's own affine parameters:

      LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * adapter.l.p.norm.weight + adapter.l.p.norm.bias

  (biased variance over the last dimension, eps = the backbone LayerNorm's own eps). Activations:
  gelu(x) = x/2 * (1 + erf(x / sqrt 2)) (exact, not the tanh approximation), relu(x) = max(x, 0),
  swish(x) = x * sigmoid(x).

  LoRA instead of adapters (config rank r, scaling s, targets): every target projection (query, key, value:
  attention.self.query/key/value; attn_out and ffn_out: the projections above; ffn_in: intermediate.dense;
  DistilBERT's q_lin/k_lin/v_lin/out_lin/lin1/lin2) of every layer l computes, for its input x,

      y = x @ W^T + b + s * (x @ A) @ B      with A = lora.l.target.A [in, r], B = lora.l.target.B [r, out]

  With `reads: normed` (AdapterHub's seq_bn wiring) the adapter reads the LayerNorm's output instead: the
  LayerNorm that follows the point computes, for its input z = h + residual,

      LN(z + (act(LN(z) @ D + b_D) @ U + b_U))      (the backbone's own LayerNorm both times)

  With the adapter's own LayerNorms (AdapterHub's ln_before / ln_after; eps = the adapter config's ln_eps)
  the adapter above becomes, for its input x,

      LN_after(act(LN_before(x) @ D + b_D) @ U + b_U)      LN_before: adapter.l.p.ln_before.weight/bias, etc.

  Head, on the last hidden states H [T, d] of the row (its own tokens only):
  - sequence-level (classification, multilabel, regression):
        v = H[0] (pooling "cls": the first token) or mean_t H[t] (pooling "mean")
        v = tanh(v @ Wd^T + bd)  with Wd = head.dense.weight, bd = head.dense.bias (only when hidden_layer)
        logits = v @ Wo^T + bo   with Wo = head.out.weight [C, d], bo = head.out.bias [C]      -> [C]
    (head weights are stored as (out, in), the nn.Linear convention, unlike the adapters' (in, out)).
  - token-level (token classification, QA: C = 2 for start/end): logits = H @ Wo^T + bo    -> [T, C]
  - no task (plain backbone): the mean of H over the row's tokens                              -> [d]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from service.bundles.layout import adapter_key, lora_key
from service.bundles.manifest import Activation, Manifest
from service.modeling.backbone import ARCHITECTURES


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _relu(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, min=0.0)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


ACTIVATION_FUNCTIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.GELU: _gelu,
    Activation.RELU: _relu,
    Activation.SWISH: _swish,
}


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


class Oracle:
    """A fresh, unpatched backbone that computes one task's logits row by row (see the module docstring)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", local_files_only=True)
        self.model.float().eval().requires_grad_(False)
        self.model_type = self.model.config.model_type
        self.spec = ARCHITECTURES[self.model_type]
        self.layers = list(self.model.get_submodule(self.spec.layers))

    # --- hooks: the adapter and the task's LayerNorm at each insertion point -----------------------------

    def _install(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> list:
        if manifest.lora is not None:
            return self._install_lora(manifest, tensors)
        cfg = manifest.adapter
        if cfg is None:
            return []
        act = ACTIVATION_FUNCTIONS[cfg.activation]
        handles = []
        for layer_index, layer in enumerate(self.layers):
            for point in cfg.points:
                def t(part: str, _l: int = layer_index, _p: str = point) -> torch.Tensor:
                    return tensors[adapter_key(_l, _p, part)].float()

                down_w, down_b, up_w, up_b = t("down.weight"), t("down.bias"), t("up.weight"), t("up.bias")
                assert down_w.shape == (manifest.backbone.hidden_size, cfg.bottleneck)
                before = (t("ln_before.weight"), t("ln_before.bias")) if cfg.ln_before else None
                after = (t("ln_after.weight"), t("ln_after.bias")) if cfg.ln_after else None

                def adapter(x, dw=down_w, db=down_b, uw=up_w, ub=up_b, before=before, after=after, eps=cfg.ln_eps):
                    a = layer_norm(x, *before, eps) if before is not None else x
                    u = act(a @ dw + db) @ uw + ub
                    return layer_norm(u, *after, eps) if after is not None else u

                if cfg.reads == "normed":  # AdapterHub's seq_bn wiring: the LayerNorm gives LN(z + adapter(LN(z)))
                    def normed_hook(module, inputs, _out, adapter=adapter):
                        z = inputs[0]
                        a = layer_norm(z, module.weight, module.bias, module.eps)
                        return layer_norm(z + adapter(a), module.weight, module.bias, module.eps)

                    norm = layer.get_submodule(self.spec.norm(point))
                    handles.append(norm.register_forward_hook(normed_hook))
                    continue

                def adapter_hook(module, inputs, h, adapter=adapter):
                    return h + adapter(h)

                projection = layer.get_submodule(self.spec.projection(point))
                handles.append(projection.register_forward_hook(adapter_hook))
                if cfg.train_layernorm:
                    norm_w, norm_b = t("norm.weight"), t("norm.bias")

                    def norm_hook(module, inputs, _out, w=norm_w, b=norm_b):
                        return layer_norm(inputs[0], w, b, module.eps)

                    norm = layer.get_submodule(self.spec.norm(point))
                    handles.append(norm.register_forward_hook(norm_hook))
        return handles

    def hidden(self, input_ids: Sequence[int], token_type_ids: Sequence[int] | None) -> torch.Tensor:
        """The backbone's last hidden states of one row, alone: [T, d]."""
        kwargs = {"input_ids": torch.tensor([list(input_ids)], dtype=torch.long)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.tensor([list(token_type_ids)], dtype=torch.long)
        with torch.no_grad():
            return self.model(**kwargs).last_hidden_state[0]

    def _install_lora(self, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> list:
        cfg = manifest.lora
        assert cfg is not None
        handles = []
        for layer_index, layer in enumerate(self.layers):
            for target in cfg.targets:
                A = tensors[lora_key(layer_index, target, "A")].float()
                B = tensors[lora_key(layer_index, target, "B")].float()

                def lora_hook(module, inputs, y, A=A, B=B, s=cfg.scaling):
                    return y + s * ((inputs[0] @ A) @ B)

                handles.append(layer.get_submodule(self.spec.lora_target(target)).register_forward_hook(lora_hook))
        return handles

    # --- the head --------------------------------------------------------------------------------------

    @staticmethod
    def head(manifest: Manifest | None, tensors: dict[str, torch.Tensor], H: torch.Tensor) -> torch.Tensor:
        if manifest is None:
            return H.mean(0)
        Wo, bo = tensors["head.out.weight"].float(), tensors["head.out.bias"].float()
        if not manifest.kind.sequence_level:
            return H @ Wo.T + bo  # [T, C]
        v = H[0] if manifest.head.pooling == "cls" else H.mean(0)
        if manifest.head.hidden_layer:
            v = torch.tanh(v @ tensors["head.dense.weight"].float().T + tensors["head.dense.bias"].float())
        return v @ Wo.T + bo  # [C]

    # --- one task --------------------------------------------------------------------------------------

    def logits(self, manifest: Manifest | None, tensors: dict[str, torch.Tensor] | None, rows) -> list[torch.Tensor]:
        """Logits of each row (objects with `input_ids` and `token_type_ids`, e.g. `EncodedRow`) for the task
        of `manifest` with bundle `tensors`; `manifest=None`: the plain backbone's mean-pooled hidden state."""
        tensors = tensors or {}
        if manifest is not None:
            assert manifest.backbone.model_type == self.model_type, "bundle is for another architecture"
        handles = self._install(manifest, tensors) if manifest is not None else []
        try:
            return [self.head(manifest, tensors, self.hidden(r.input_ids, r.token_type_ids)) for r in rows]
        finally:
            for h in handles:
                h.remove()

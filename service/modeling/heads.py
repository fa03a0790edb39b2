"""Building a task's head module from its manifest (and its bundle tensors). The head classes, with their
forwards, losses and post-processing, belong to the kinds (`service/kinds/`)."""

from __future__ import annotations

import torch

from service.bundles.manifest import Manifest
from service.kinds.heads import TaskHead


def build_head(manifest: Manifest, tensors: dict[str, torch.Tensor] | None = None) -> TaskHead:
    """The head a manifest describes; loaded from bundle tensors (`head.*`) when given."""
    kind, hidden = manifest.kind, manifest.backbone.hidden_size
    if tensors is None:
        return kind.build_head(hidden, manifest.labels, manifest.head)
    # Built on the meta device and given the bundle's tensors: no random init that would be overwritten
    # (a third of a cold load's time).
    with torch.device("meta"):
        head = kind.build_head(hidden, manifest.labels, manifest.head)
    state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    head.load_state_dict(state, strict=True, assign=True)
    return head


def head_tensors(head: TaskHead) -> dict[str, torch.Tensor]:
    """Bundle tensors (`head.*`) of a head."""
    return {f"head.{k}": v.detach().float().cpu().clone() for k, v in head.state_dict().items()}

"""The registry of task kinds: head type name -> `TaskKind` (see `service/kinds/base.py`).

Built-in kinds are listed here; `register_kind` adds another at run time (a test, or a deployment's own head
type), after which manifests naming it validate and its tasks are served, trained and scored like the rest.
"""

from __future__ import annotations

from enum import Enum

from service.kinds.base import Targets, TaskKind
from service.kinds.classification import ClassificationKind
from service.kinds.heads import HeadConfig, TaskHead
from service.kinds.multilabel import MultiLabelKind
from service.kinds.qa import QuestionAnsweringKind
from service.kinds.regression import RegressionKind
from service.kinds.token_classification import TokenClassificationKind

__all__ = ["HeadConfig", "HeadType", "TaskHead", "TaskKind", "Targets", "head_type_of", "kind_names", "kind_of",
           "register_kind", "unregister_kind"]


class HeadType(str, Enum):
    """The built-in kinds' names (a manifest's `head_type` holds one of these, or a registered kind's name)."""

    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"
    REGRESSION = "regression"
    TOKEN_CLASSIFICATION = "token-classification"
    QA = "qa"


_KINDS: dict[str, TaskKind] = {
    HeadType.CLASSIFICATION.value: ClassificationKind(),
    HeadType.MULTILABEL.value: MultiLabelKind(),
    HeadType.REGRESSION.value: RegressionKind(),
    HeadType.TOKEN_CLASSIFICATION.value: TokenClassificationKind(),
    HeadType.QA.value: QuestionAnsweringKind(),
}


def kind_of(head_type: str) -> TaskKind:
    """The kind named `head_type` (a HeadType or a registered name); KeyError when there is none."""
    name = head_type.value if isinstance(head_type, HeadType) else head_type
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown head type {name!r}; known: {', '.join(kind_names())}") from None


def kind_names() -> list[str]:
    return list(_KINDS)


def head_type_of(name: str) -> str:
    """`name` as a manifest holds it: the HeadType member for a built-in kind, else the registered name.
    ValueError when no kind has that name."""
    if name not in _KINDS:
        raise ValueError(f"unknown head type {name!r}; known: {', '.join(kind_names())}")
    try:
        return HeadType(name)
    except ValueError:
        return name


def register_kind(kind: TaskKind) -> None:
    """Make `kind` known to this process (its name must be new)."""
    if kind.name in _KINDS:
        raise ValueError(f"a kind named {kind.name!r} is already registered")
    _KINDS[kind.name] = kind


def unregister_kind(name: str) -> None:
    """Forget a kind added by `register_kind` (built-in kinds stay)."""
    if name in {h.value for h in HeadType}:
        raise ValueError(f"{name!r} is a built-in kind")
    _KINDS.pop(name, None)

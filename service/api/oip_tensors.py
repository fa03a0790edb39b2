"""How a task looks as Open Inference Protocol tensors: its inputs and outputs by head type, v2 input
tensors -> the `PredictRequest` that /predict validates, and /predict's predictions -> v2 output tensors.

Inputs are batches of strings (datatype BYTES, shape [N] or [N, 1]): `text` and, where the head takes
pairs, an optional `text_pair`; `question` and `context` for extractive QA. Outputs, one row per input:

| head type | outputs |
|---|---|
| classification | `label` BYTES [N], `score` FP32 [N], `scores` FP32 [N, labels] |
| multilabel | `labels` BYTES [N] (each a JSON array of the labels over the threshold), `scores` FP32 [N, labels] |
| regression | `value` FP32 [N] |
| token-classification | `entities` BYTES [N] (each a JSON array of {entity, text, start, end, score}) |
| qa | `answer` BYTES [N], `start` INT64 [N], `end` INT64 [N], `score` FP32 [N] (character offsets) |
| any other kind | `prediction` BYTES [N] (each /predict's prediction as a JSON object) |

and for every head type `truncated` BOOL [N]: the input was cut to fit the model. The columns of `scores`
follow the task's label list, which model metadata gives as the parameter `labels` (a JSON array).
Variable structures are JSON strings in BYTES tensors, as Triton's own Python models answer them.

Tensor problems are `InvalidInput` (answered 400 on the v2 routes), so the API maps every error in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import orjson

from service.api.oip_schemas import RequestInput, RequestOutput
from service.api.schemas import PredictRequest
from service.errors import InvalidInput
from service.kinds import HeadType, TaskKind

BYTES, FP32, INT64, BOOL = "BYTES", "FP32", "INT64", "BOOL"


@dataclass(frozen=True)
class InputSpec:
    name: str
    single: str  # the PredictRequest field for one input (its messages then read as /predict's do)
    several: str  # ... and for a batch
    required: bool = True


@dataclass(frozen=True)
class OutputSpec:
    name: str
    datatype: str
    value: Callable[[dict[str, Any]], Any]  # one prediction -> its row of the tensor
    width: int | None = None  # None: shape [N]; else [N, width]

    @property
    def shape(self) -> list[int]:
        return [-1] if self.width is None else [-1, self.width]


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def input_specs(kind: TaskKind) -> list[InputSpec]:
    if kind.question_answering:
        return [InputSpec("question", "question", "questions"), InputSpec("context", "context", "contexts")]
    specs = [InputSpec("text", "text", "texts")]
    if kind.accepts_pairs:
        specs.append(InputSpec("text_pair", "text_pair", "text_pairs", required=False))
    return specs


def output_specs(kind: TaskKind, labels: Sequence[str]) -> list[OutputSpec]:
    labels = list(labels)
    scores = OutputSpec("scores", FP32, lambda p: [p["scores"][name] for name in labels], width=len(labels))
    specs: list[OutputSpec]
    if kind.name == HeadType.CLASSIFICATION.value:
        specs = [OutputSpec("label", BYTES, lambda p: p["label"]), OutputSpec("score", FP32, lambda p: p["score"]),
                 scores]
    elif kind.name == HeadType.MULTILABEL.value:
        specs = [OutputSpec("labels", BYTES, lambda p: _json(p["labels"])), scores]
    elif kind.name == HeadType.REGRESSION.value:
        specs = [OutputSpec("value", FP32, lambda p: p["value"])]
    elif kind.name == HeadType.TOKEN_CLASSIFICATION.value:
        specs = [OutputSpec("entities", BYTES, lambda p: _json(p["entities"]))]
    elif kind.name == HeadType.QA.value:
        specs = [OutputSpec("answer", BYTES, lambda p: p["answer"]), OutputSpec("start", INT64, lambda p: p["start"]),
                 OutputSpec("end", INT64, lambda p: p["end"]), OutputSpec("score", FP32, lambda p: p["score"])]
    else:  # a kind registered at run time: its predictions as /predict answers them
        specs = [OutputSpec("prediction", BYTES,
                            lambda p: _json({k: v for k, v in p.items() if k != "truncated"}))]
    return [*specs, OutputSpec("truncated", BOOL, lambda p: bool(p.get("truncated", False)))]


def model_metadata(task: str, version: int, kind: TaskKind, labels: Sequence[str], platform: str) -> dict[str, Any]:
    inputs = input_specs(kind)
    optional = [s.name for s in inputs if not s.required]
    parameters: dict[str, Any] = {"head_type": kind.name, "labels": _json(list(labels))}
    if optional:
        parameters["optional_inputs"] = ",".join(optional)
    return {
        "name": task,
        "versions": [str(version)],
        "platform": platform,
        "inputs": [{"name": s.name, "datatype": BYTES, "shape": [-1]} for s in inputs],
        "outputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in output_specs(kind, labels)],
        "parameters": parameters,
    }


def _names(specs: Sequence[InputSpec] | Sequence[OutputSpec]) -> str:
    return ", ".join(s.name + ("" if getattr(s, "required", True) else " (optional)") for s in specs)


def _strings(tensor: RequestInput) -> list[str]:
    """The batch of strings a BYTES input tensor holds, with its shape checked against its data."""
    where = f"input '{tensor.name}'"
    if tensor.parameters and "binary_data_size" in tensor.parameters:
        raise InvalidInput(f"{where} uses the binary tensor data extension, which this server does not support: "
                           "send its elements as JSON strings in 'data'")
    if tensor.datatype != BYTES:
        raise InvalidInput(f"{where} has datatype {tensor.datatype}; it must be BYTES (a batch of texts)")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"{where} has shape {shape}; it must be [N] or [N, 1] (a batch of N texts)")
    flat: list[Any] = []
    for item in tensor.data:  # at most one level of nesting: [[a], [b]] for shape [N, 1]
        if isinstance(item, list):
            flat.extend(item)
        else:
            flat.append(item)
    bad = next((i for i, x in enumerate(flat) if not isinstance(x, str)), None)
    if bad is not None:
        raise InvalidInput(f"{where}: element {bad} is {type(flat[bad]).__name__}, not a string; BYTES elements "
                           "are JSON strings")
    if len(flat) != prod(shape):
        raise InvalidInput(f"{where} has shape {shape} ({prod(shape)} elements) but {len(flat)} elements of data")
    return flat


def predict_request(kind: TaskKind, inputs: Sequence[RequestInput]) -> PredictRequest:
    """The /predict body these input tensors stand for. A batch of one uses the single fields (`text`,
    `question`, ...) and a larger one the list fields, so /predict's checks answer with its own words."""
    specs = {s.name: s for s in input_specs(kind)}
    given: dict[str, list[str]] = {}
    for tensor in inputs:
        if tensor.name not in specs:
            raise InvalidInput(f"this model has no input '{tensor.name}'; its inputs are {_names(list(specs.values()))}")
        if tensor.name in given:
            raise InvalidInput(f"input '{tensor.name}' is given more than once")
        given[tensor.name] = _strings(tensor)
    missing = [s.name for s in specs.values() if s.required and s.name not in given]
    if missing:
        raise InvalidInput(f"missing input '{missing[0]}'; this model's inputs are {_names(list(specs.values()))}")
    batch = any(len(values) != 1 for values in given.values())
    fields = {(specs[name].several if batch else specs[name].single): (values if batch else values[0])
              for name, values in given.items()}
    return PredictRequest(**fields)


def select_outputs(specs: Sequence[OutputSpec], requested: Sequence[RequestOutput] | None) -> list[OutputSpec]:
    """The outputs a request asks for, in its order (all of them when it names none)."""
    if not requested:
        return list(specs)
    by_name = {s.name: s for s in specs}
    chosen: list[OutputSpec] = []
    for out in requested:
        if out.name not in by_name:
            raise InvalidInput(f"this model has no output '{out.name}'; its outputs are {_names(specs)}")
        if by_name[out.name] in chosen:
            raise InvalidInput(f"output '{out.name}' is asked for more than once")
        chosen.append(by_name[out.name])
    return chosen


def output_tensors(specs: Sequence[OutputSpec], predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """/predict's predictions as v2 output tensors (data flat, in row-major order)."""
    tensors = []
    for spec in specs:
        rows = [spec.value(p) for p in predictions]
        if spec.width is None:
            shape, data = [len(rows)], rows
        else:
            shape, data = [len(rows), spec.width], [x for row in rows for x in row]
        tensors.append({"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": data})
    return tensors

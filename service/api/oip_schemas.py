"""Bodies of the Open Inference Protocol (KServe v2 REST, `/v2/...`), as the protocol's specification names
them (kserve/kserve docs/predict-api/v2/required_api.md and rest_predict_v2.yaml).

JSON tensors only: the binary tensor data extension and gRPC are not served. Every v2 error answers the
protocol's `{"error": "<message>"}` (`OipError`), not the `{"detail": ...}` of the other routes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

Parameter = str | int | float | bool
Parameters = dict[str, Parameter]

TENSOR_DATA = ("The tensor's elements in row-major order, flat or nested as the shape says. BYTES elements "
               "are JSON strings.")


class OipError(BaseModel):
    """Every v2 error (4xx and 5xx): what is wrong, in one sentence."""

    error: str = Field(examples=["unknown task 'sentimnet'"])


class ServerMetadata(BaseModel):
    name: str = Field(examples=["adapter-service"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(description="Protocol extensions this server supports (none: JSON tensors only)")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["BYTES"])
    shape: list[int] = Field(description="-1 is a variable dimension (the batch)", examples=[[-1]])


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The versions that may be asked for explicitly: the active one")
    platform: str = Field(examples=["adapter-service"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters = Field(
        default_factory=dict,
        description="Server-specific: head_type, labels (a JSON array, the column order of the 'scores' output) "
        "and optional_inputs (comma-separated input names a request may leave out)",
    )


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(examples=[[2]])
    datatype: str = Field(examples=["BYTES"])
    parameters: Parameters | None = None
    data: list[Any] = Field(description=TENSOR_DATA, examples=[["a gripping film", "two wasted hours"]])


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        None, description="Accepted and ignored (binary_data included: outputs are always JSON tensors)")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = Field(
        None, description="Accepted and ignored (binary_data_output included: outputs are always JSON tensors)")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="The outputs to answer (default: all of them)")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] = Field(description=TENSOR_DATA)


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="The request's id, when it gave one")
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


INFER_EXAMPLES: dict[str, dict[str, Any]] = {
    "text": {
        "summary": "Texts (classification, multilabel, regression, token classification)",
        "value": {"id": "1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                         "data": ["a gripping, beautifully shot film", "two hours I will never get back"]}]},
    },
    "text_pair": {
        "summary": "Text pairs (paraphrase, similarity)",
        "value": {"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["The cat sat on the mat."]},
            {"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["A cat was sitting on the mat."]},
        ]},
    },
    "qa": {
        "summary": "Questions with their contexts (extractive QA)",
        "value": {"inputs": [
            {"name": "question", "shape": [1], "datatype": "BYTES", "data": ["Where is the Eiffel Tower?"]},
            {"name": "context", "shape": [1], "datatype": "BYTES", "data": ["The Eiffel Tower is in Paris, France."]},
        ]},
    },
    "outputs": {
        "summary": "Only some outputs",
        "value": {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [["great acting"]]}],
                  "outputs": [{"name": "label"}]},
    },
}

"""The contract's details, one by one and in-process (the live fuzzing run is tests/api/test_contract.py)."""

from __future__ import annotations

import pytest

from tests.api.conftest import AUTH

pytestmark = pytest.mark.anyio


async def test_every_route_publishes_its_real_body_schema_and_one_error_model(client):
    spec = (await client.get("/openapi.json")).json()
    ref = lambda op, code: op["responses"][code]["content"]["application/json"]["schema"]  # noqa: E731
    paths = spec["paths"]
    assert ref(paths["/adapters"]["get"], "200") == {"$ref": "#/components/schemas/TaskList"}
    assert ref(paths["/healthz"]["get"], "200") == {"$ref": "#/components/schemas/HealthResponse"}
    assert ref(paths["/readyz"]["get"], "200") == {"$ref": "#/components/schemas/ReadyResponse"}
    assert ref(paths["/embed"]["post"], "200") == {"$ref": "#/components/schemas/EmbedResponse"}
    assert "text/plain" in next(iter(paths["/metrics"]["get"]["responses"]["200"]["content"]))
    for path, ops in paths.items():
        if path.startswith("/v2"):
            continue  # the Open Inference Protocol has its own error shape ({"error": ...})
        for op in ops.values():
            for code in op["responses"]:
                if code.startswith(("4", "5")) and code != "503" or code == "503" and path != "/readyz":
                    assert ref(op, code) == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


async def test_the_predict_body_is_published_as_exactly_one_input_shape_with_the_server_limits(client):
    spec = (await client.get("/openapi.json")).json()
    shapes = spec["components"]["schemas"]["PredictRequest"]["oneOf"]
    assert sorted(tuple(s["required"]) for s in shapes) == sorted(
        [("text",), ("text", "text_pair"), ("texts",), ("texts", "text_pairs"), ("question", "context"),
         ("questions", "contexts")])
    texts = next(s for s in shapes if s["required"] == ["texts"])["properties"]["texts"]
    settings = client.app.state.svc.settings
    assert texts["maxItems"] == settings.max_items_per_request
    assert texts["items"]["maxLength"] == settings.max_text_chars
    assert all(s["additionalProperties"] is False for s in shapes)


async def test_upload_links_lead_to_the_task_operations(client):
    spec = (await client.get("/openapi.json")).json()
    links = spec["paths"]["/adapters"]["post"]["responses"]["201"]["links"]
    ids = {op["operationId"] for ops in spec["paths"].values() for op in ops.values()}
    assert {link["operationId"] for link in links.values()} <= ids
    assert links["ActivateVersion"]["requestBody"] == {"version": "$response.body#/version"}


@pytest.mark.parametrize("path,allowed", [("/adapters/sentiment", "DELETE, GET"), ("/healthz", "GET"),
                                          ("/adapters", "GET, POST")])
async def test_options_and_405_list_every_method_of_the_path(client, path, allowed):
    r = await client.options(path)
    assert r.status_code == 204 and r.headers["allow"] == allowed
    r = await client.patch(path, headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == allowed and "PATCH is not allowed" in r.json()["detail"]


async def test_a_body_in_another_media_type_is_a_415(client):
    r = await client.post("/predict/sentiment", content=b'{"text": "good"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = await client.post("/adapters", content=b"xx", headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


@pytest.mark.parametrize("body,message", [
    ({"text": None}, "'text' must not be null"),
    ({"text": "good", "text_pair": None}, "'text_pair' must not be null"),
])
async def test_explicit_nulls_are_refused_not_ignored(client, body, message):
    r = await client.post("/predict/sentiment", json=body)
    assert r.status_code == 422 and r.json()["detail"] == message


@pytest.mark.parametrize("version", [True, "1", [1]])
async def test_activate_takes_only_integers(client, version):
    r = await client.put("/adapters/sentiment/active", json={"version": version}, headers=AUTH)
    assert r.status_code == 422 and "version" in r.json()["detail"]
    assert (await client.put("/adapters/sentiment/active", json={"version": 1.0}, headers=AUTH)).status_code == 200


async def test_unknown_paths_answer_the_error_model(client):
    r = await client.get("/no/such/thing")
    assert r.status_code == 404 and r.json() == {"detail": "no such path: /no/such/thing"}

"""deploy/kserve/ (a ServingRuntime and an InferenceService) is what KServe accepts and fits the server.

kubernetes-validate knows no KServe kinds, so the manifests are validated against a vendored subset of
KServe's own CRD schemas: each CRD's `openAPIV3Schema` (kserve/kserve, config/crd/full/, the commit is in
each file's `$comment`) pruned to the fields the manifests use, with the CRD's types, formats, patterns and
required fields, and unknown fields refused as the API server's strict field validation refuses them
(`tests/cluster/kserve_schemas.py` explains and regenerates them). A field KServe has but the subset lacks
fails here too: regenerate the subset. The runtime's container is also validated strictly as a Kubernetes
container (kubernetes-validate, inside a Pod), so its probes, resources and security context are checked to
the letter. No cluster is needed.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
import yaml

from service.api.routes_oip import router as oip_router
from tests.cluster.kserve_schemas import manifests, vendored
from tests.conftest import REPO

K8S_VERSION = "1.30.0"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = vendored(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def runtime_container() -> dict[str, Any]:
    (container,) = manifests()["ServingRuntime"]["spec"]["containers"]
    return container


def test_manifests_validate_against_kserves_crd_schemas():
    docs = manifests()
    assert set(docs) == {"ServingRuntime", "InferenceService"}
    for kind, doc in docs.items():
        crd = vendored(kind)["x-crd"]
        assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}" and crd["kind"] == kind
        assert DNS_LABEL.match(doc["metadata"]["name"])
        assert schema_errors(doc) == [], kind


def test_the_runtime_container_is_a_valid_kubernetes_container():
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "adapter-service"},
           "spec": {"containers": [runtime_container()]}}
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize(
    "kind, mutate, words",
    [
        ("ServingRuntime", lambda d: d["spec"].update(protocolVersion="v2"), "'protocolVersion' was unexpected"),
        ("ServingRuntime", lambda d: d["spec"].pop("containers"), "'containers' is a required property"),
        ("ServingRuntime", lambda d: d["spec"]["supportedModelFormats"][0].update(autoSelect="yes"),
         "is not of type 'boolean'"),
        ("ServingRuntime", lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
         "is not of type 'integer'"),
        ("ServingRuntime", lambda d: d["spec"]["containers"][0]["resources"]["requests"].update(cpu="two"),
         "does not match"),
        ("InferenceService", lambda d: d["spec"]["predictor"].update(minReplicas="1"), "is not of type 'integer'"),
        ("InferenceService", lambda d: d["spec"]["predictor"].update(scaleMetric="latency"), "is not one of"),
        ("InferenceService", lambda d: d["spec"]["predictor"]["model"]["modelFormat"].pop("name"),
         "'name' is a required property"),
        ("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(protocolVersions=["v2"]),
         "'protocolVersions' was unexpected"),
    ],
)
def test_the_schema_check_catches_mistakes(kind, mutate, words):
    doc = copy.deepcopy(manifests()[kind])
    mutate(doc)
    errors = schema_errors(doc)
    assert any(words in e for e in errors), errors


def test_the_runtime_serves_the_inference_service_with_the_v2_protocol():
    docs = manifests()
    runtime, isvc = docs["ServingRuntime"]["spec"], docs["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == docs["ServingRuntime"]["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2" and runtime["protocolVersions"] == ["v2"]
    assert "storageUri" not in model  # the shipped adapters are in the image
    mode = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert mode in {"RawDeployment", "Standard"}  # no scale-to-zero: the backbone takes seconds to load
    assert 1 <= isvc["spec"]["predictor"]["minReplicas"] <= isvc["spec"]["predictor"]["maxReplicas"]


def test_the_runtime_container_fits_the_image_and_the_server():
    c = runtime_container()
    assert c["name"] == "kserve-container"  # the container KServe looks for
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    (k8s_container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"] == k8s_container["image"]  # the image built from the Dockerfile
    dockerfile = (REPO / "Dockerfile").read_text()
    (port,) = c["ports"]  # KServe routes to the first port
    assert port["containerPort"] == 8000 and re.search(r"^EXPOSE 8000$", dockerfile, re.M)
    env = {e["name"]: e for e in c["env"]}
    assert env["ADAPTER_SERVICE_PORT"]["value"] == "8000" and env["ADAPTER_SERVICE_HOST"]["value"] == "0.0.0.0"
    k8s_env = {e["name"]: e for e in k8s_container["env"]}
    assert env["ADAPTER_SERVICE_ADMIN_TOKEN"]["valueFrom"] == k8s_env["ADAPTER_SERVICE_ADMIN_TOKEN"]["valueFrom"]
    # the probes are the protocol's health routes, served by the app on the container's port
    v2_paths = {getattr(route, "path", None) for route in oip_router.routes}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert c["startupProbe"]["httpGet"]["path"] in v2_paths and {"/v2/health/ready", "/v2/health/live"} <= v2_paths
    user = re.findall(r"^USER (\d+)", dockerfile, re.M)[-1]
    assert c["securityContext"]["runAsNonRoot"] is True and str(c["securityContext"]["runAsUser"]) == user
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])

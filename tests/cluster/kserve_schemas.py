"""The parts of KServe's CRD schemas that deploy/kserve/ uses, vendored as JSON under tests/cluster/kserve/.

kubernetes-validate knows only built-in kinds, and KServe's full CRDs are large (the InferenceService one is
~2 MB of YAML), so `tests/cluster/kserve/*.json` holds each CRD's `openAPIV3Schema` pruned to the fields our
manifests set: every kept object keeps the CRD's own types, formats, enums, patterns and `required` lists,
and gets `additionalProperties: false` unless the CRD preserves unknown fields, which is what the API server's
strict field validation (kubectl's default) does with a field the CRD does not declare.

Regenerate after a manifest starts using another field (with a KServe checkout, e.g. `fetch` of
kserve/kserve):

    .venv/bin/python -m tests.cluster.kserve_schemas /path/to/kserve
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "deploy" / "kserve"
VENDORED = Path(__file__).parent / "kserve"
CRDS = {  # kind -> (CRD file in the KServe repository, served version)
    "ServingRuntime": ("config/crd/full/serving.kserve.io_servingruntimes.yaml", "v1alpha1"),
    "InferenceService": ("config/crd/full/serving.kserve.io_inferenceservices.yaml", "v1beta1"),
}
# schema keywords kept as the CRD states them (descriptions and defaults are dropped)
KEEP = {"type", "format", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
        "required", "nullable", "anyOf", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"}


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> document, for every manifest in deploy/kserve/."""
    docs = [doc for path in sorted(MANIFESTS.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def vendored(kind: str) -> dict[str, Any]:
    return json.loads((VENDORED / f"{kind.lower()}.json").read_text())


def merged(docs: list[Any]) -> Any:
    """One value with every field any of `docs` sets (list items merged into one)."""
    if docs and all(isinstance(d, dict) for d in docs):
        keys = dict.fromkeys(k for d in docs for k in d)
        return {k: merged([d[k] for d in docs if k in d]) for k in keys}
    if docs and all(isinstance(d, list) for d in docs):
        return [merged([x for d in docs for x in d])] if any(docs) else []
    return docs[0] if docs else None


def prune(schema: dict[str, Any], doc: Any) -> dict[str, Any]:
    """`schema` cut down to what `doc` uses."""
    out = {k: v for k, v in schema.items() if k in KEEP}
    if isinstance(doc, dict) and "properties" in schema:
        out["properties"] = {k: prune(schema["properties"][k], v) for k, v in doc.items() if k in schema["properties"]}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = prune(schema["additionalProperties"], merged(list(doc.values())))
    if isinstance(doc, list) and "items" in schema:
        out["items"] = prune(schema["items"], merged(doc))
    return out


def main(kserve: Path) -> None:
    commit = subprocess.run(["git", "-C", str(kserve), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    VENDORED.mkdir(exist_ok=True)
    for kind, doc in manifests().items():
        path, version = CRDS[kind]
        text = subprocess.run(["git", "-C", str(kserve), "show", f"HEAD:{path}"], capture_output=True, text=True,
                              check=True).stdout
        crd = yaml.safe_load(text)
        (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = prune(v["schema"]["openAPIV3Schema"], doc)
        out = {"$comment": f"kserve/kserve@{commit} {path} ({crd['spec']['group']}/{version}) openAPIV3Schema, "
                           "pruned to the fields deploy/kserve/ uses by tests/cluster/kserve_schemas.py",
               "x-crd": {"group": crd["spec"]["group"], "version": version, "kind": kind,
                         "source": f"https://github.com/kserve/kserve/blob/{commit}/{path}"}, **schema}
        (VENDORED / f"{kind.lower()}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Imports point one way: api -> runtime -> modeling -> bundles -> kinds -> settings/errors; cluster -> bundles
(and the runtime, which owns the cluster wiring, -> cluster); training -> modeling, bundles, kinds; host_memory
(process allocator tuning) sits beside settings/errors. kinds (what each head type means) needs no other
layer; modeling never imports FastAPI or redis."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

ALLOWED = {
    "kinds": {"kinds", "settings", "errors"},
    "bundles": {"bundles", "kinds", "settings", "errors"},
    "modeling": {"modeling", "bundles", "kinds", "settings", "errors"},
    "runtime": {"runtime", "modeling", "bundles", "kinds", "settings", "errors", "host_memory", "cluster"},  # cluster: runtime.py only
    "cluster": {"cluster", "bundles", "kinds", "settings", "errors"},
    "training": {"training", "modeling", "bundles", "kinds", "settings", "errors", "host_memory", "runtime"},  # runtime: Engine re-scoring
    "api": {"api", "runtime", "modeling", "bundles", "kinds", "settings", "errors", "host_memory", ""},  # "": service.__version__
}
FORBIDDEN_THIRD_PARTY = {"modeling": {"fastapi", "starlette", "redis", "uvicorn"},
                         "bundles": {"fastapi", "starlette", "redis", "uvicorn", "transformers"},
                         "kinds": {"fastapi", "starlette", "redis", "uvicorn", "transformers"}}


def imports_of(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import in service/<package>/, lazy ones included."""
    out = []
    for path in sorted((REPO / "service" / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((path.name, node.module))
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_point_one_way(package):
    bad = []
    for file, module in imports_of(package):
        parts = module.split(".")
        if parts[0] == "service":
            target = parts[1] if len(parts) > 1 else ""
            if target not in ALLOWED[package]:
                bad.append(f"{file} imports {module}")
        elif parts[0] in FORBIDDEN_THIRD_PARTY.get(package, set()):
            bad.append(f"{file} imports {module}")
    assert bad == []


def test_only_the_runtime_object_wires_the_cluster():
    users = {file for file, module in imports_of("runtime") if module.startswith("service.cluster")}
    assert users <= {"runtime.py"}

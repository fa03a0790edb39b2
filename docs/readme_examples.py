"""Fill the README's example blocks with real output from a live server.

    .venv/bin/python docs/readme_examples.py

Starts `adapter-service serve` (admin token `change-me`) on a COPY of adapters_store/ (uploads and deletes in
the examples must not touch the shipped store), runs every example command with the shell, and writes each
command and its output between the `<!-- README-EXAMPLE: name -->` markers of README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
URL = "127.0.0.1:8000"
CURL = "curl -s"
JSON_H = "-H 'content-type: application/json'"


def post(path: str, body: dict) -> str:
    return f"{CURL} -X POST {URL}{path} {JSON_H} -d '{json.dumps(body)}'"


EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company "
          "of the engineer Gustave Eiffel and built between 1887 and 1889.")

EXAMPLES: dict[str, list[str]] = {
    "quickstart": [post("/predict/sst2", {"text": "a gripping, beautifully shot film"})],
    "predict": [
        post("/predict/sst2", {"texts": ["a gripping, beautifully shot film", "two hours I will never get back"]}),
        post("/predict/ag_news", {"text": "The central bank raised interest rates by half a point on Tuesday."}),
        post("/predict/mrpc", {"text": "The company said profits rose 10 percent.",
                               "text_pair": "Profits increased by 10 percent, the firm said."}),
        post("/predict/stsb", {"text": "A man is playing a guitar.", "text_pair": "A person plays an instrument."}),
        post("/predict/conll2003", {"text": "Angela Merkel met Emmanuel Macron in Berlin on Monday."}),
        post("/predict/squad", {"questions": ["Where is the Eiffel Tower?", "Who designed the Eiffel Tower?",
                                              "When was the Eiffel Tower built?"],
                                "contexts": [EIFFEL] * 3}),
        post("/embed", {"texts": ["hello world"]}) + " | head -c 120; echo",
    ],
    "errors": [
        post("/predict/nope", {"text": "x"}),
        post("/predict/sst2", {"text": ""}),
        post("/predict/sst2", {"question": "why?", "context": "because"}),
        post("/predict/conll2003", {"text": "a", "text_pair": "b"}),
    ],
    "manage": [
        "export ADAPTER_SERVICE_ADMIN_TOKEN=change-me",
        f"{CURL} {URL}/adapters",
        f"{CURL} {URL}/adapters/sst2 | python3 -c 'import json,sys; d=json.load(sys.stdin); "
        "print(json.dumps({**d, \"versions\": [{k: v for k, v in x.items() if k != \"manifest\"} | "
        "{\"metrics\": x[\"manifest\"][\"metrics\"]} for x in d[\"versions\"]]}, indent=1))'",
        f"{CURL} -X POST {URL}/adapters -F file=@adapters_store/sst2/v1.safetensors",
        f"{CURL} -X POST {URL}/adapters -H \"Authorization: Bearer $ADAPTER_SERVICE_ADMIN_TOKEN\" "
        "-F file=@adapters_store/sst2/v1.safetensors",
        f"{CURL} -X PUT {URL}/adapters/sst2/active -H \"Authorization: Bearer $ADAPTER_SERVICE_ADMIN_TOKEN\" "
        f"{JSON_H} -d '{{\"version\": 1}}'",
        f"{CURL} -X POST {URL}/adapters -H \"Authorization: Bearer $ADAPTER_SERVICE_ADMIN_TOKEN\" "
        "-F file=@README.md",
        f"{CURL} -o /dev/null -w '%{{http_code}}\\n' -X DELETE {URL}/adapters/mrpc "
        "-H \"Authorization: Bearer $ADAPTER_SERVICE_ADMIN_TOKEN\"",
        post("/predict/mrpc", {"text": "a", "text_pair": "b"}),
    ],
    "health": [
        f"{CURL} {URL}/healthz",
        f"{CURL} {URL}/readyz",
        f"{CURL} {URL}/metrics | grep -E '^adapter_service_(requests_total|batch_size_(sum|count)|cache_(hits|misses)_total|queue_depth)'",
    ],
    "oip": [  # after "health": its metrics show the examples above only
        f"{CURL} {URL}/v2/health/ready",
        post("/v2/models/sst2/infer", {"id": "42", "inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES",
             "data": ["a gripping, beautifully shot film", "two hours I will never get back"]}]}),
        post("/v2/models/squad/infer", {"id": "43", "inputs": [
            {"name": "question", "shape": [1], "datatype": "BYTES", "data": ["Who designed the Eiffel Tower?"]},
            {"name": "context", "shape": [1], "datatype": "BYTES", "data": [EIFFEL]}],
            "outputs": [{"name": "answer"}, {"name": "score"}]}),
        post("/v2/models/sst2/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
    ],
}


def run(cmd: str, env: dict[str, str]) -> str:
    if cmd.startswith("export "):
        key, _, value = cmd[len("export "):].partition("=")
        env[key] = value
        return ""
    out = subprocess.run(cmd, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout.strip()
    with contextlib.suppress(ValueError):  # pretty-print a single JSON document
        text = json.dumps(json.loads(text), indent=1, ensure_ascii=False)
    return text


def block(cmds: list[str], env: dict[str, str]) -> str:
    parts = []
    for cmd in cmds:
        out = run(cmd, env)
        parts.append(f"$ {cmd}" + (f"\n{out}" if out else ""))
    return "```console\n" + "\n\n".join(parts) + "\n```"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="readme-"))
    store = work / "adapters_store"
    shutil.copytree(REPO / "adapters_store", store)
    env = {**os.environ, "ADAPTER_SERVICE_STORE_DIR": str(store), "ADAPTER_SERVICE_ADMIN_TOKEN": "change-me",
           "ADAPTER_SERVICE_LOG_LEVEL": "warning"}
    server = subprocess.Popen([str(REPO / ".venv/bin/adapter-service"), "serve"], env=env, cwd=work,
                              stdout=(work / "server.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://{URL}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            sys.exit("server did not become ready:\n" + (work / "server.log").read_text())
        shell_env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SERVICE_")}
        readme = (REPO / "README.md").read_text()
        for name, cmds in EXAMPLES.items():
            marker = f"<!-- README-EXAMPLE: {name} -->"
            pattern = re.compile(re.escape(marker) + r"\n(```console\n.*?\n```\n)?", re.S)
            if not pattern.search(readme):
                sys.exit(f"README.md has no marker {marker}")
            filled = f"{marker}\n{block(cmds, shell_env)}\n"
            readme = pattern.sub(lambda _m, text=filled: text, readme, count=1)
        (REPO / "README.md").write_text(readme)
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()

"""Render the load-balancer template (`deploy/nginx/adapter-service.conf.template`) outside Docker.

The template is an http-level nginx snippet with `${ADAPTER_LB_*}` placeholders. In docker-compose the
official nginx image fills them from the environment (envsubst, filtered to `ADAPTER_LB_`); tests and the
hot-swap bench fill them here, from the very same file, and wrap the snippet in a minimal main config
that runs unprivileged from one folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "adapter-service.conf.template"
_PLACEHOLDER = re.compile(r"\$\{(ADAPTER_LB_[A-Z0-9_]+)\}")


def upstream_servers(addresses: Sequence[str], *, max_fails: int = 3, fail_timeout: str = "5s") -> str:
    """`ADAPTER_LB_UPSTREAMS` for replicas at `host:port`: one `server` entry each, on one line."""
    return " ".join(f"server {a} max_fails={max_fails} fail_timeout={fail_timeout};" for a in addresses)


def render_site(*, listen: str, upstreams: str, max_body: str = "64m", template: Path = TEMPLATE) -> str:
    """The template with its placeholders filled, as the nginx image's envsubst would fill them."""
    values = {"ADAPTER_LB_LISTEN": listen, "ADAPTER_LB_UPSTREAMS": upstreams, "ADAPTER_LB_MAX_BODY": max_body}

    def fill(match: re.Match) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise KeyError(f"{template} uses ${{{match.group(1)}}}, which the renderer does not know") from None

    return _PLACEHOLDER.sub(fill, template.read_text())


def standalone_config(site: Path, workdir: Path, *, worker_processes: int = 1) -> str:
    """A main nginx.conf around `site` that keeps pid, logs and temp files in `workdir` (foreground,
    for a supervising process). Under root, workers stay root so they can use `workdir`."""
    temp = Path(workdir) / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}daemon off;
worker_processes {worker_processes};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/access.log;
{temp_paths}
    include {site};
}}
"""

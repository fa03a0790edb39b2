"""What route handlers reach through `request.app.state.svc`: the live runtime of one app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from service.api.metrics import Metrics
from service.bundles.store import AdapterStore
from service.errors import NotReady
from service.runtime.adapters import AdapterManager
from service.runtime.batcher import Batcher
from service.runtime.engine import Engine
from service.runtime.registry import TaskRegistry
from service.settings import ServiceSettings


@dataclass
class Services:
    settings: ServiceSettings
    metrics: Metrics
    admin_token: str
    api_key: str | None
    started_at: float = field(default_factory=time.time)
    # set once the backbone is loaded and the runtime is wired (None while starting)
    store: AdapterStore | None = None
    engine: Engine | None = None
    registry: TaskRegistry | None = None
    batcher: Batcher | None = None
    manager: AdapterManager | None = None
    cluster: Any = None  # service.cluster sync object when a Redis registry is configured

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.batcher is not None and self.batcher.running


def services(request: Request) -> Services:
    """The app's runtime, or NotReady (503) while it is starting or stopping."""
    svc: Services = request.app.state.svc
    if not svc.ready:
        raise NotReady("the service is starting; retry shortly")
    return svc

"""What route handlers reach through `request.app.state.svc`: the runtime of one app and its HTTP extras."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from service.api.keys import KeyRing
from service.api.metrics import Metrics
from service.bundles.store import AdapterStore
from service.errors import NotReady
from service.runtime.adapters import AdapterManager
from service.runtime.batcher import Batcher
from service.runtime.engine import Engine
from service.runtime.registry import TaskRegistry
from service.runtime.runtime import Runtime
from service.settings import ServiceSettings


@dataclass
class Services:
    settings: ServiceSettings
    metrics: Metrics
    admin_token: str
    keys: KeyRing
    runtime: Runtime
    started_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.runtime.ready

    # The runtime's parts; each raises NotReady (503) until the runtime has started.
    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    @property
    def registry(self) -> TaskRegistry:
        return self.runtime.registry

    @property
    def batcher(self) -> Batcher:
        return self.runtime.batcher

    @property
    def manager(self) -> AdapterManager:
        return self.runtime.manager

    @property
    def store(self) -> AdapterStore | None:
        return self.runtime.store


def services(request: Request) -> Services:
    """The app's runtime, or NotReady (503) while it is starting or stopping."""
    svc: Services = request.app.state.svc
    if not svc.ready:
        raise NotReady("the service is starting; retry shortly")
    return svc

"""The runtime is assembled from settings and started and stopped as one, and sets no process-wide state."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from service.errors import NotReady
from service.runtime.runtime import Runtime, RuntimeState
from service.settings import ServiceSettings
from tests.conftest import make_bundle, make_manifest


def test_runtime_lifecycle_and_no_process_wide_state(tiny_backbone, store):
    store.put("t", make_bundle(make_manifest(tiny_backbone.ref, task="t")))
    runtime = Runtime(ServiceSettings(admin_token="x", torch_threads=7, forward_workers=2), backbone=tiny_backbone,
                      store=store)
    with pytest.raises(NotReady):
        runtime.engine  # noqa: B018 - not started yet
    threads, handlers = torch.get_num_threads(), list(logging.getLogger().handlers)

    async def go():
        await runtime.start()
        assert runtime.state is RuntimeState.READY and runtime.ready
        assert set(runtime.registry.snapshot()) == {"t"}
        manifest = runtime.registry.get("t").manifest
        rows = runtime.engine.encode(manifest, ["hello"])
        (res,) = await runtime.batcher.submit(runtime.engine.requests("t", 1, manifest, rows))
        assert res.error is None and "label" in res.prediction
        assert runtime.batcher.workers == 2
        await runtime.stop()
        assert runtime.state is RuntimeState.STOPPED and not runtime.ready

    asyncio.run(go())
    assert torch.get_num_threads() == threads  # the serve command sets threads, not the runtime
    assert logging.getLogger().handlers == handlers

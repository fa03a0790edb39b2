"""TaskRegistry: two refreshes of one task racing (the upload's own refresh on the API thread, the change
event's on the cluster-sync thread) must leave the registry on the store's newest state, never on the
older read: nothing else would correct it, since the event that announced the newer write has been
handled already."""

from __future__ import annotations

import threading

from service.bundles.manifest import BackboneRef
from service.bundles.store import LocalAdapterStore
from service.runtime.registry import TaskRegistry
from tests.conftest import make_bundle, make_manifest

REF = BackboneRef(id="tiny", fingerprint="ab" * 32, model_type="bert", hidden_size=32, num_layers=2)


class SlowInfoStore(LocalAdapterStore):
    """A real local store whose `get_info` holds the thread named `held` until `release` is set: the moment
    between a refresh's two reads, where another write and refresh can slip in."""

    def __init__(self, root):
        super().__init__(root)
        self.held = ""
        self.reached = threading.Event()
        self.release = threading.Event()

    def get_info(self, task, version):
        if threading.current_thread().name == self.held:
            self.reached.set()
            assert self.release.wait(10)
        return super().get_info(task, version)


def test_a_refresh_that_read_an_older_version_never_overwrites_a_newer_one(tmp_path):
    store = SlowInfoStore(tmp_path / "store")
    store.put("sst2", make_bundle(make_manifest(REF, task="sst2"), seed=1))
    registry = TaskRegistry(store)
    registry.refresh("sst2")

    store.put("sst2", make_bundle(make_manifest(REF, task="sst2"), seed=2))
    store.held = "api"
    api = threading.Thread(target=registry.refresh, args=("sst2",), name="api")  # reads v2, then waits
    api.start()
    assert store.reached.wait(10)
    store.put("sst2", make_bundle(make_manifest(REF, task="sst2"), seed=3))  # another replica's upload
    sync = threading.Thread(target=registry.refresh, args=("sst2",), name="sync")  # its event: reads v3
    sync.start()
    sync.join(0.5)  # done by now, unless the registry makes it wait for the refresh in progress
    store.release.set()
    api.join(10)
    sync.join(10)

    assert store.get_active("sst2") == 3
    assert registry.get("sst2").version == 3

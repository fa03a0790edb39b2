"""The slot pool's shared/exclusive lock: routed forwards share it, a capacity growth takes it alone and is
not starved by forwards that keep overlapping."""

from __future__ import annotations

import threading
import time

from service.modeling.slot_pool import SharedExclusiveLock


def test_shared_holders_run_together_and_exclusive_waits_for_them():
    lock = SharedExclusiveLock()
    events: list[str] = []
    inside = threading.Barrier(2, timeout=5)

    def reader(name: str) -> None:
        with lock.shared():
            inside.wait()  # both readers inside at once, or this times out
            time.sleep(0.1)
            events.append(f"{name} out")

    def writer() -> None:
        time.sleep(0.03)
        with lock.exclusive():
            events.append("writer in")

    threads = [threading.Thread(target=reader, args=(n,)) for n in ("r1", "r2")] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert sorted(events[:2]) == ["r1 out", "r2 out"] and events[2] == "writer in"


def test_a_waiting_exclusive_holder_is_not_starved_by_overlapping_shared_holders():
    lock = SharedExclusiveLock()
    stop = threading.Event()
    got_exclusive = threading.Event()

    def reader() -> None:  # back-to-back shared holds that overlap the other reader's
        while not stop.is_set():
            with lock.shared():
                time.sleep(0.01)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    time.sleep(0.05)

    def writer() -> None:
        with lock.exclusive():
            got_exclusive.set()

    w = threading.Thread(target=writer)
    w.start()
    try:
        assert got_exclusive.wait(timeout=5)
    finally:
        stop.set()
        for t in [*readers, w]:
            t.join(timeout=5)

"""The on-disk blob cache alone: a byte budget with least-recently-used eviction that survives a restart,
checksums on every read, and OS trouble as a miss rather than a failure."""

from __future__ import annotations

import hashlib
import os

from service.cluster.blob_cache import DiskBlobCache


def blob(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([i % 256]) * size
    return hashlib.sha256(data).hexdigest(), data


def test_least_recently_used_goes_first_within_the_byte_budget(tmp_path):
    cache = DiskBlobCache(tmp_path, max_bytes=3000)
    (a, da), (b, db), (c, dc), (d, dd) = (blob(i) for i in range(4))
    for sha, data in ((a, da), (b, db), (c, dc)):
        cache.put(sha, data)
    assert cache.get(a) == da  # a is now the most recently used
    cache.put(d, dd)
    assert b not in cache and not (tmp_path / b).exists()
    assert [cache.get(x) for x in (a, c, d)] == [da, dc, dd]
    assert cache.nbytes == 3000
    cache.put(*blob(9, size=4000))  # larger than the whole budget: not kept, nothing evicted
    assert cache.nbytes == 3000 and cache.get(blob(9, size=4000)[0]) is None


def test_recency_and_contents_survive_a_restart(tmp_path):
    cache = DiskBlobCache(tmp_path, max_bytes=3000)
    (a, da), (b, db), (c, dc), (d, dd) = (blob(i) for i in range(4))
    for n, (sha, data) in enumerate(((a, da), (b, db), (c, dc))):
        cache.put(sha, data)
        os.utime(tmp_path / sha, (1000 + n, 1000 + n))
    assert cache.get(a) == da  # touched: newest on disk
    (tmp_path / f".{d}.tmp-deadbeef").write_bytes(b"half")  # a crashed write
    restarted = DiskBlobCache(tmp_path, max_bytes=3000)
    assert restarted.nbytes == 3000 and not (tmp_path / f".{d}.tmp-deadbeef").exists()
    restarted.put(d, dd)  # b is now the oldest
    assert b not in restarted and all(x in restarted for x in (a, c, d))


def test_a_file_that_does_not_match_its_name_is_dropped(tmp_path):
    cache = DiskBlobCache(tmp_path, max_bytes=10_000)
    sha, data = blob(1)
    cache.put(sha, data)
    (tmp_path / sha).write_bytes(data[:-1])  # torn
    assert cache.get(sha) is None
    assert not (tmp_path / sha).exists() and sha not in cache and cache.corrupt == 1
    assert cache.nbytes == 0
    cache.put(sha, data)
    assert cache.get(sha) == data


def test_a_file_removed_behind_its_back_is_a_miss(tmp_path):
    cache = DiskBlobCache(tmp_path, max_bytes=10_000)
    sha, data = blob(2)
    cache.put(sha, data)
    (tmp_path / sha).unlink()
    assert cache.get(sha) is None and cache.nbytes == 0 and cache.misses == 1

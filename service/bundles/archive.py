"""Adapter folders uploaded as one archive (.zip, .tar, .tar.gz): read in memory, refusing anything unsafe.

An archive holds one folder's files (at its top level, or inside one directory). Refused, with a message:
absolute paths or `..` in member names, links and any other non-regular member, more than `MAX_MEMBERS`
members (directories included), a member or a total past the byte limit (counted while decompressing, so a
member that lies about its size is caught too; a gzip stream is inflated under a cap before tar reads a
header), and nested folders. Nothing is written to disk.
"""

from __future__ import annotations

import io
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable

from service.errors import BundleInvalid, BundleTooLarge

MAX_MEMBERS = 32
ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"


def is_archive(data: bytes) -> bool:
    """Whether `data` looks like a zip, gzip or (ustar) tar archive rather than a bundle."""
    return data[:4] == ZIP_MAGIC or data[:2] == GZIP_MAGIC or data[257:262] == b"ustar"


def _bad(message: str) -> BundleInvalid:
    return BundleInvalid("bad_archive", message)


def _safe_name(name: str) -> str:
    """The member's path, normalised; refused when it could point outside the folder."""
    if not name or "\\" in name or name.startswith("/") or ":" in name.split("/")[0]:
        raise _bad(f"archive member {name!r} has an absolute or non-POSIX path")
    norm = posixpath.normpath(name)
    if norm.startswith("..") or "/../" in f"/{norm}/":
        raise _bad(f"archive member {name!r} points outside the folder")
    return norm


HEADER_ALLOWANCE = 1024 * 1024
"""Bytes a decompressed tar may hold beyond its members' contents (its headers)."""


def _gunzip(data: bytes, limit: int) -> bytes:
    """A gzip stream decompressed, refused past `limit` bytes (a small upload can expand a thousandfold)."""
    inflate = zlib.decompressobj(wbits=31)
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _bad(f"not a readable gzip stream ({exc})") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise BundleTooLarge(len(out), limit)
    return out


def read_adapter_archive(data: bytes, *, max_bytes: int) -> dict[str, bytes]:
    """The files of the one folder an archive holds: {file name: bytes}."""
    members: list[tuple[str, bytes]] = []
    total = 0
    seen = 0

    def count() -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_MEMBERS:
            raise _bad(f"more than {MAX_MEMBERS} members in the archive")

    def add(name: str, read: Callable[[int], bytes], size_hint: int) -> None:
        nonlocal total
        if size_hint > max_bytes:
            raise BundleTooLarge(size_hint, max_bytes)
        content = read(max_bytes - total + 1)
        total += len(content)
        if total > max_bytes:
            raise BundleTooLarge(total, max_bytes)
        members.append((_safe_name(name), content))

    try:
        if data[:4] == ZIP_MAGIC:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    count()
                    if info.is_dir():
                        _safe_name(info.filename.rstrip("/"))
                        continue
                    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded (a plain file)
                    if kind not in (0, stat.S_IFREG):
                        raise _bad(f"archive member {info.filename!r} is not a regular file (a link?)")
                    with zf.open(info) as fh:
                        add(info.filename, fh.read, info.file_size)
        else:
            raw = _gunzip(data, max_bytes + HEADER_ALLOWANCE) if data[:2] == GZIP_MAGIC else data
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
                for member in tf:
                    count()
                    if member.isdir():
                        _safe_name(member.name)
                        continue
                    if not member.isfile():
                        raise _bad(f"archive member {member.name!r} is not a regular file (a link or a device?)")
                    extracted = tf.extractfile(member)
                    if extracted is None:
                        raise _bad(f"archive member {member.name!r} cannot be read")
                    add(member.name, extracted.read, member.size)
    except (BundleInvalid, BundleTooLarge):
        raise
    except Exception as exc:  # zipfile/tarfile/zlib raise many types on hostile input (encrypted, unknown method)
        raise _bad(f"not a readable zip or tar archive ({type(exc).__name__}: {exc})") from None
    if not members:
        raise _bad("the archive holds no files")
    folders = {posixpath.dirname(name) for name, _ in members}
    if len(folders) != 1 or folders.pop().count("/") > 0:
        raise _bad("the archive must hold one folder's files (at its top level or in one directory), "
                   f"found {sorted(name for name, _ in members)[:5]}")
    files: dict[str, bytes] = {}
    for name, content in members:
        base = posixpath.basename(name)
        if base in files:
            raise _bad(f"the archive holds {base!r} twice")
        files[base] = content
    return files

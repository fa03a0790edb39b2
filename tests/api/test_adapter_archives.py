"""PEFT LoRA folders uploaded over HTTP as .zip / .tar.gz archives: converted server-side with the same
validation as a bundle, served like any task; every unsafe or malformed archive is a 4xx with a message
and leaves the store and the live tasks as they were."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
import torch
from peft import TaskType

from tests.api.conftest import AUTH
from tests.unit.test_peft_import import _peft_logits, _peft_model, _saved


@pytest.fixture(scope="module")
def peft_folder(tiny_model_dirs, tmp_path_factory) -> tuple:
    """A PEFT LoRA classifier (3 classes) on the tiny BERT the API fixtures serve, and its saved files."""
    model = _peft_model(tiny_model_dirs["bert"], TaskType.SEQ_CLS, 3, dict(r=4, lora_alpha=8,
                                                                          target_modules=["query", "value"]))
    return model, _saved(model, tmp_path_factory.mktemp("peft"))


def _zip(files: dict[str, bytes], folder: str = "my-lora") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}" if folder else name, data)
    return buf.getvalue()


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


async def _upload(client, data: bytes, **form):
    return await client.post("/adapters", headers=AUTH, files={"file": ("adapter.zip", data)}, data=form)


@pytest.mark.anyio
@pytest.mark.parametrize("packer", ["zip", "tar.gz", "zip-top-level"])
async def test_an_uploaded_peft_archive_is_served_as_peft_predicts(client, peft_folder, packer):
    model, files = peft_folder
    data = {"zip": lambda: _zip(files), "zip-top-level": lambda: _zip(files, folder=""),
            "tar.gz": lambda: _tar([_file(f"my-lora/{n}", d) for n, d in files.items()])}[packer]()
    r = await _upload(client, data, task="reviews", labels="bad,neutral,good")
    assert r.status_code == 201, r.text
    assert r.json()["task"] == "reviews" and r.json()["head_type"] == "classification"
    texts = ["great film", "John Smith flew from Paris to Berlin on Monday."]
    got = await client.post("/predict/reviews", json={"texts": texts})
    assert got.status_code == 200, got.text
    engine = client.app.state.svc.engine
    rows = engine.encode(engine.store.get_info("reviews", 1).manifest, texts)
    for row, pred in zip(rows, got.json()["predictions"]):
        probs = torch.softmax(_peft_logits(model, row), -1)
        assert pred["label"] == ["bad", "neutral", "good"][int(probs.argmax())]
        assert pred["score"] == pytest.approx(float(probs.max()), abs=1e-4)


def _zip_with_symlink(files: dict[str, bytes]) -> bytes:
    import stat

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/adapter_config.json", files["adapter_config.json"])
        link = zipfile.ZipInfo("a/adapter_model.safetensors")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _gzip_bomb() -> bytes:
    """~40 KB of gzip that inflates to 40 MB (a tar header whose long name is all zeros)."""
    import gzip

    return gzip.compress(b"\0" * (40 * 1024 * 1024), compresslevel=9)


def _directory(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


def _corrupt_zip(files: dict[str, bytes]) -> bytes:
    data = bytearray(_zip(files))
    start = data.index(b"adapter_config.json") + len("adapter_config.json")  # first member's deflate data
    data[start + 4 : start + 40] = b"\xff" * 36
    return bytes(data)


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


@pytest.mark.anyio
@pytest.mark.parametrize(("what", "build", "form", "status", "message"), [
    ("no task field", lambda f: _zip(f), {}, 422, "needs the form field 'task'"),
    ("bad task name", lambda f: _zip(f), {"task": "Bad Name"}, 422, "invalid task name"),
    ("traversal", lambda f: _zip({"../../etc/adapter_config.json": f["adapter_config.json"]}, folder=""),
     {"task": "t"}, 422, "points outside the folder"),
    ("absolute path", lambda f: _tar([_file("/tmp/adapter_config.json", f["adapter_config.json"])]),
     {"task": "t"}, 422, "absolute"),
    ("symlink", lambda f: _tar([_file("a/adapter_config.json", f["adapter_config.json"]),
                                _symlink("a/adapter_model.safetensors", "/etc/passwd")]),
     {"task": "t"}, 422, "not a regular file"),
    ("zip symlink", lambda f: _zip_with_symlink(f), {"task": "t"}, 422, "not a regular file"),
    ("pickled weights", lambda f: _zip({"adapter_config.json": f["adapter_config.json"],
                                        "adapter_model.bin": b"\x80\x04fake"}), {"task": "t"}, 422, "pickle"),
    ("missing config", lambda f: _zip({"adapter_model.safetensors": f["adapter_model.safetensors"]}),
     {"task": "t"}, 422, "adapter_config.json missing"),
    ("two folders", lambda f: _zip({"a/adapter_config.json": f["adapter_config.json"],
                                    "b/adapter_model.safetensors": f["adapter_model.safetensors"]}, folder=""),
     {"task": "t"}, 422, "one folder"),
    ("wrong label count", lambda f: _zip(f), {"task": "t", "labels": "a,b"}, 422, "2 labels given"),
    ("oversize member", lambda f: _zip({**f, "README.md": b"x" * (3 * 1024 * 1024)}), {"task": "t"}, 413, ""),
    ("not an archive", lambda f: b"PK\x03\x04" + b"\x00" * 64, {"task": "t"}, 422, "not a readable zip"),
    ("form fields with a bundle", None, {"task": "t"}, 422, "for adapter archives"),
    ("gzip bomb", lambda f: _gzip_bomb(), {"task": "t"}, 413, ""),
    ("many directories", lambda f: _tar([_directory(f"d{i}/") for i in range(40)]), {"task": "t"}, 422,
     "more than 32 members"),
    ("corrupt deflate data", lambda f: _corrupt_zip(f), {"task": "t"}, 422, "not a readable"),
])
async def test_unsafe_or_malformed_archives_are_refused_and_change_nothing(client, peft_folder, what, build, form,
                                                                            status, message):
    _, files = peft_folder
    before = (await client.get("/adapters")).json()
    if build is None:  # a plain bundle (the shipped kind of upload) with archive-only form fields
        from service.bundles.codec import encode_bundle
        from tests.conftest import make_manifest
        from tests.synthetic import random_tensors

        ref = client.app.state.svc.engine.backbone.ref
        manifest = make_manifest(ref, task="t")
        data = encode_bundle(manifest, random_tensors(manifest, seed=0))
    else:
        data = build(files)
    r = await _upload(client, data, **form)
    assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
    assert message in r.json()["detail"], f"{what}: {r.json()['detail']}"
    assert (await client.get("/adapters")).json() == before

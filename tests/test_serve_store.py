"""The adapter store and safe archive extraction: versions, rollback, hostile uploads, tenants."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import adapterkit as ak  # noqa: E402
from adapterkit.serve.errors import BadUpload, Conflict, InvalidAdapter, NotFound, PayloadTooLarge  # noqa: E402
from adapterkit.serve.store import AdapterStore  # noqa: E402
from adapterkit.serve.tenants import Principal, Tenants, parse_keys  # noqa: E402

from .serving import archive, load_minilm, make_adapter, tar_bytes  # noqa: E402


@pytest.fixture(scope="module")
def builder():
    return ak.adapt(load_minilm())


@pytest.fixture(scope="module")
def folders(builder, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(builder, "a", root / "a", seed=1),
        "b": make_adapter(builder, "b", root / "b", seed=2, labels=["x", "y", "z"]),
        "prompt": make_adapter(builder, "prompt", root / "prompt", config=ak.PromptTuning(num_virtual_tokens=2), labels=None),
    }


@pytest.fixture
def store(tmp_path, builder):
    return AdapterStore(tmp_path / "store", fingerprint=builder.fingerprint())


def test_versions_rollback_delete(store, folders):
    assert store.add("acme", "s", folders["a"]) == 1
    assert store.add("acme", "s", folders["b"]) == 2
    assert store.resolve("acme", "s") == 2
    record = store.record("acme", "s")
    assert record["versions"] == [1, 2] and record["labels"] == ["x", "y", "z"] and record["method"] == "lora"
    assert record["size_bytes"] > 1000
    assert store.rollback("acme", "s") == (2, 1)
    assert store.resolve("acme", "s") == 1
    assert store.versions("acme", "s") == [1]  # the withdrawn version is deleted
    with pytest.raises(Conflict):
        store.rollback("acme", "s")
    assert store.add("acme", "s", folders["b"]) == 3  # numbers are never reused
    assert store.rollback("acme", "s") == (3, 1)
    assert [(r["tenant"], r["name"], r["version"]) for r in store.list()] == [("acme", "s", 1)]
    assert store.list("globex") == []
    assert store.delete("acme", "s") == [1]
    with pytest.raises(NotFound):
        store.resolve("acme", "s")
    with pytest.raises(NotFound):
        store.delete("acme", "s")


def test_resolve_sees_changes_made_by_another_store_object(store, folders):
    other = AdapterStore(store.root, fingerprint=store.fingerprint)
    store.add("acme", "s", folders["a"])
    assert other.resolve("acme", "s") == 1
    store.add("acme", "s", folders["b"])
    assert other.resolve("acme", "s") == 2


@pytest.mark.parametrize("fmt, arcname", [("tar.gz", None), ("tar", ""), ("zip", None), ("zip", "")])
def test_unpack_archives(store, folders, tmp_path, fmt, arcname):
    path = archive(folders["a"], tmp_path / f"up.{fmt}", fmt=fmt, arcname=arcname)
    with store.staging() as staging:
        root = store.unpack(path, staging)
        assert (root / "adapter.json").is_file() and (root / "adapter.safetensors").is_file()
        assert store.reserve("acme", "up", root) == 1
    assert not any((store.root / ".staging").iterdir())


def _manifest_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _hostile(folders) -> dict[str, bytes]:
    good = _manifest_files(folders["a"])
    traversal = {f"../evil/{k}": v for k, v in good.items()}
    absolute = {f"/tmp/evil/{k}": v for k, v in good.items()}
    pickled = {**good, "model.bin": b"\x80\x04K\x01."}
    symlink = tar_bytes(good, links={"link": "/etc/passwd"})
    whole = tar_bytes(good)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        for k, v in good.items():
            zf.writestr(f"../{k}", v)
    zlink = io.BytesIO()
    with zipfile.ZipFile(zlink, "w") as zf:
        for k, v in good.items():
            zf.writestr(k, v)
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    device = io.BytesIO()
    with tarfile.open(fileobj=device, mode="w") as tar:
        info = tarfile.TarInfo("dev")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    hardlink = io.BytesIO()
    with tarfile.open(fileobj=hardlink, mode="w") as tar:
        info = tarfile.TarInfo("adapter.json")
        info.type = tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    duplicate = io.BytesIO()
    with tarfile.open(fileobj=duplicate, mode="w") as tar:
        for content in (good["adapter.json"], b"{}"):
            info = tarfile.TarInfo("adapter.json")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return {
        "traversal": tar_bytes(traversal), "absolute": tar_bytes(absolute), "pickle": tar_bytes(pickled),
        "symlink": symlink, "hardlink": hardlink.getvalue(), "device": device.getvalue(),
        "zip_traversal": zbuf.getvalue(), "zip_symlink": zlink.getvalue(),
        "truncated": whole[: len(whole) // 2], "garbage": b"this is not an archive" * 10,
        "no_manifest": tar_bytes({"readme.txt": b"hello"}),
        "duplicate": duplicate.getvalue(),
    }


@pytest.mark.parametrize("case", ["traversal", "absolute", "pickle", "symlink", "hardlink", "device", "zip_traversal",
                                  "zip_symlink", "truncated", "garbage", "no_manifest", "duplicate"])
def test_hostile_archives_are_refused(store, folders, tmp_path, case):
    path = tmp_path / "upload.bin"
    path.write_bytes(_hostile(folders)[case])
    with store.staging() as staging, pytest.raises(BadUpload):
        store.unpack(path, staging)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    assert store.list() == []


def test_archive_limits(store, folders, tmp_path):
    many = tar_bytes({f"f{i}.txt": b"x" for i in range(100)})
    path = tmp_path / "many.tar"
    path.write_bytes(many)
    with store.staging() as staging, pytest.raises(PayloadTooLarge):
        store.unpack(path, staging)
    small = AdapterStore(store.root, fingerprint=store.fingerprint, max_bytes=1000)
    path = archive(folders["a"], tmp_path / "a.tar")
    with small.staging() as staging, pytest.raises(PayloadTooLarge):
        small.unpack(path, staging)


def test_invalid_adapters_are_refused(store, folders, tmp_path):
    wrong = AdapterStore(tmp_path / "other", fingerprint="0123456789abcdef")
    with pytest.raises(InvalidAdapter, match="fingerprint"):
        wrong.add("acme", "a", folders["a"])
    with pytest.raises(InvalidAdapter, match="routed per row"):
        store.add("acme", "p", folders["prompt"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter.json").write_bytes((folders["a"] / "adapter.json").read_bytes())
    (broken / "adapter.safetensors").write_bytes((folders["a"] / "adapter.safetensors").read_bytes()[:500])
    with pytest.raises(InvalidAdapter, match="truncated"):
        store.add("acme", "a", broken)
    (broken / "adapter.json").write_text("{not json")
    with pytest.raises(InvalidAdapter):
        store.add("acme", "a", broken)
    assert store.list() == [] and not (store.root / "acme" / "a").exists()


def test_copy_in_stays_inside_its_root(store, folders, tmp_path):
    inside = store.root / "acme" / "incoming" / "x"
    inside.parent.mkdir(parents=True)
    os.symlink(folders["a"], inside)  # a link that leads out of the tenant's part of the store
    with store.staging() as staging, pytest.raises(NotFound):
        store.copy_in(inside, staging, allowed=store.root / "acme")
    with store.staging() as staging, pytest.raises(NotFound):
        store.copy_in(store.root / "acme" / ".." / "globex", staging, allowed=store.root / "acme")


def test_flat_adapter_folders_are_adopted(store, folders):
    target = store.root / "flat1"
    target.mkdir()
    for f in folders["a"].iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    assert store.adopt_flat() == ["flat1"]
    assert store.resolve("default", "flat1") == 1
    assert store.adopt_flat() == []


def test_keys_and_principals(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-acme-0001": {"tenant": "acme"}, "key-admin-001": {"admin": True}}))
    tenants = Tenants(keys)
    acme = tenants.lookup("key-acme-0001")
    assert acme == Principal("acme", False) and tenants.lookup("key-admin-001").admin
    assert acme.resolve("sent") == ("acme", "sent")
    with pytest.raises(NotFound):
        acme.resolve("globex/sent")
    with pytest.raises(NotFound):
        acme.resolve("bad name!")
    assert Principal("default", True).resolve("globex/sent") == ("globex", "sent")
    for bad in ({}, {"short": {"tenant": "a"}}, {"long-enough-key": {"tenant": "a__b"}}, {"long-enough-key": "x"}):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_keys_file_is_reread_when_it_changes(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"key-acme-0001": {"tenant": "acme"}}))
    tenants = Tenants(keys, reload_seconds=0)
    assert tenants.lookup("key-acme-0001").tenant == "acme"
    keys.write_text(json.dumps({"key-globex-001": {"tenant": "globex"}}))
    os.utime(keys, (1, 1))  # a different mtime, however fast the rewrite
    assert tenants.lookup("key-globex-001").tenant == "globex"
    with pytest.raises(Exception, match="unknown"):
        tenants.lookup("key-acme-0001")
    keys.write_text("{half written")
    os.utime(keys, (2, 2))
    assert tenants.lookup("key-globex-001").tenant == "globex"  # the last good keys stay


def test_version_numbers_survive_a_delete_and_a_publish_after_a_delete_fails(store, folders):
    assert store.add("acme", "s", folders["a"]) == 1
    assert store.add("acme", "s", folders["a"]) == 2
    store.delete("acme", "s")
    assert store.add("acme", "s", folders["b"]) == 3  # never v1 again: v1's weights are gone
    with store.staging() as staging:
        version = store.reserve("acme", "s", store.copy_in(folders["a"], staging))
    store.delete("acme", "s")  # a DELETE between reserve and publish
    with pytest.raises(Conflict, match="deleted while"):
        store.publish("acme", "s", version)
    with pytest.raises(NotFound):
        store.resolve("acme", "s")


def test_quotas_and_kept_versions(tmp_path, builder, folders):
    from adapterkit.serve.errors import QuotaExceeded
    from adapterkit.serve.store import Quota

    store = AdapterStore(tmp_path / "q", fingerprint=builder.fingerprint(),
                         quota=Quota(max_adapters=2, keep_versions=2, max_bytes=50 * 1024**2))
    store.add("acme", "one", folders["a"])
    store.add("acme", "two", folders["a"])
    with pytest.raises(QuotaExceeded, match="2 adapters"):
        store.add("acme", "three", folders["a"])
    store.add("globex", "three", folders["a"])  # another tenant's quota
    for _ in range(3):
        store.add("acme", "one", folders["b"])
    assert store.versions("acme", "one") == [3, 4] and store.record("acme", "one")["versions"] == [3, 4]
    small = AdapterStore(tmp_path / "small", fingerprint=builder.fingerprint(), quota=Quota(max_bytes=1000))
    with pytest.raises(QuotaExceeded, match="bytes on disk"):
        small.add("acme", "one", folders["a"])
    assert small.names("acme") == []


def test_start_up_sweeps_what_a_crashed_owner_left_whatever_its_age(tmp_path, builder, folders):
    root = tmp_path / "crashed"
    crashed = AdapterStore(root, fingerprint=builder.fingerprint())
    crashed.add("acme", "s", folders["a"])
    staging = root / ".staging" / crashed.owned()
    staging.mkdir(parents=True)
    spooled = crashed.spool / crashed.owned("upload-")
    spooled.write_bytes(b"x" * 1000)
    with crashed.staging() as folder:
        orphan = crashed.reserve("acme", "s", crashed.copy_in(folders["b"], folder))  # killed before publish
    legacy = [root / ".trash" / "old", root / ".spool" / "upload-1"]  # no owner named: nobody's
    for path in legacy:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    assert crashed.record("acme", "s")["versions"] == [1]  # a version that never went live is not listed

    alive = AdapterStore(root, fingerprint=builder.fingerprint())  # another process, while the first lives
    mine = alive.spool / alive.owned("upload-")
    mine.write_bytes(b"x")
    assert staging.exists() and spooled.exists() and crashed.path("acme", "s", orphan).exists()
    assert not any(p.exists() for p in legacy)

    crashed.close()  # the first process dies: a restart at once removes all it left, young as it is
    restarted = AdapterStore(root, fingerprint=builder.fingerprint())
    assert not staging.exists() and not spooled.exists() and not crashed.path("acme", "s", orphan).exists()
    assert mine.exists() and restarted.resolve("acme", "s") == 1  # the living owner's upload stays
    assert not list((root / ".inflight").glob("*")) and not (root / ".owners" / f"{crashed.owner}.lock").exists()
    for s in (alive, restarted):
        s.close()


def test_quota_counts_only_referenced_versions(tmp_path, builder, folders):
    from adapterkit.serve.errors import QuotaExceeded
    from adapterkit.serve.store import Quota

    one = sum(f.stat().st_size for f in folders["a"].iterdir() if f.name in ("adapter.json", "adapter.safetensors"))
    store = AdapterStore(tmp_path / "q", fingerprint=builder.fingerprint(),
                         quota=Quota(max_bytes=int(3.5 * one), keep_versions=2))
    for _ in range(6):  # upload, roll back, again: withdrawn versions are deleted and take no room
        store.add("acme", "s", folders["a"])
        store.add("acme", "s", folders["a"])
        store.rollback("acme", "s")
    assert len(store.versions("acme", "s")) == 1
    with store.staging() as folder:  # a version in flight (not yet live) is not counted either
        store.reserve("acme", "s", store.copy_in(folders["a"], folder))
    store.add("acme", "t", folders["a"])
    store.add("acme", "u", folders["a"])
    with pytest.raises(QuotaExceeded):
        store.add("acme", "w", folders["a"])
    store.close()


def test_uploads_with_non_finite_weights_or_bad_fields_are_refused(store, folders, tmp_path):
    from safetensors.torch import load_file, save_file

    for case in ("nan", "labels"):
        bad = tmp_path / case
        bad.mkdir()
        manifest = json.loads((folders["a"] / "adapter.json").read_text())
        tensors = load_file(folders["a"] / "adapter.safetensors")
        if case == "nan":
            key = next(iter(tensors))
            tensors[key] = tensors[key].clone().fill_(float("inf"))
        else:
            manifest["labels"] = {"neg": 0}
        save_file(tensors, bad / "adapter.safetensors")
        (bad / "adapter.json").write_text(json.dumps(manifest))
        with pytest.raises(InvalidAdapter, match="NaN or infinite" if case == "nan" else "'labels'"):
            store.add("acme", case, bad)


def test_archives_keep_only_the_adapter_and_no_big_extras(store, folders, tmp_path):
    good = _manifest_files(folders["a"])
    plain = io.BytesIO()
    with zipfile.ZipFile(plain, "w") as zf:  # writestr(name, data): no file-type bits in the mode
        for k, v in good.items():
            zf.writestr(k, v)
        zf.writestr("README.md", b"notes")
    path = tmp_path / "plain.zip"
    path.write_bytes(plain.getvalue())
    with store.staging() as staging:
        root = store.unpack(path, staging)
        assert sorted(p.name for p in root.iterdir()) == ["adapter.json", "adapter.safetensors"]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in good.items():
            zf.writestr(k, v)
        zf.writestr("padding.bin.txt", b"\0" * (64 << 20))  # 64 MB that compresses to ~64 kB
    path = tmp_path / "bomb.zip"
    path.write_bytes(bomb.getvalue())
    assert path.stat().st_size < 1 << 20
    with store.staging() as staging, pytest.raises(PayloadTooLarge, match="only adapter.safetensors may be larger"):
        store.unpack(path, staging)


def test_a_padded_tensor_file_is_refused_before_extraction(store, folders, tmp_path):
    good = _manifest_files(folders["a"])
    padded = tar_bytes({**good, "adapter.safetensors": good["adapter.safetensors"] + b"\0" * (4 << 20)})
    path = tmp_path / "padded.tar"
    path.write_bytes(padded)
    with store.staging() as staging, pytest.raises(BadUpload, match="header declares"):
        store.unpack(path, staging)
    assert not list((store.root / ".staging").rglob("adapter.safetensors"))


def test_an_upload_must_list_its_sites_and_live_never_goes_back(store, folders, tmp_path):
    manifest = json.loads((folders["a"] / "adapter.json").read_text())
    del manifest["sites"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter.json").write_text(json.dumps(manifest))
    (bare / "adapter.safetensors").write_bytes((folders["a"] / "adapter.safetensors").read_bytes())
    with pytest.raises(InvalidAdapter, match="'sites' is required"):
        store.add("acme", "bare", bare)
    with store.staging() as staging:
        older = store.reserve("acme", "race", store.copy_in(folders["a"], staging))
    with store.staging() as staging:
        newer = store.reserve("acme", "race", store.copy_in(folders["b"], staging))
    store.publish("acme", "race", newer)
    with pytest.raises(Conflict, match="newer version"):
        store.publish("acme", "race", older)
    assert store.resolve("acme", "race") == newer


def test_a_first_upload_that_never_went_live_is_swept(tmp_path, builder, folders):
    root = tmp_path / "first"
    store = AdapterStore(root, fingerprint=builder.fingerprint())
    with store.staging() as staging:
        version = store.reserve("acme", "new", store.copy_in(folders["a"], staging))  # killed before publish
    path = store.path("acme", "new", version)
    store.close()  # the process dies
    AdapterStore(root, fingerprint=builder.fingerprint()).close()
    assert not path.exists() and not store.folder("acme", "new").exists()

"""The adapter store on disk: tenants, names, immutable versions, the live pointer, rollback.

    <store>/<tenant>/<name>/v<N>/adapter.json, adapter.safetensors   one version, never changed
    <store>/<tenant>/<name>/state.json   {"live": N, "history": [versions that were live before]}

A new version is checked (safe archive, readable safetensors + manifest, this base's fingerprint,
a method that can be routed per row) in a staging folder, moved to v<N>, and only then made live
by an atomic rewrite of state.json; readers see the old version or the new, never a half.
Adapter folders placed directly in the store (`<store>/<name>/adapter.json`) are adopted at start
as versions of tenant "default".

Version numbers are never reused, not even after a delete (`.versions.json` keeps the last one
given out), so a version number always names the same weights. Each tenant has a quota (adapters,
bytes of the versions that state.json refers to), and only the newest `keep_versions` versions of an
adapter are kept for rollback. A rollback withdraws the live version: its folder is deleted.

Nothing stays on disk that nothing refers to. Each store object (each server process) owns a lock
file, `.owners/<owner>.lock`, flocked for as long as it lives, and names what it writes while an
upload is under way after itself: staging folders, spooled uploads and the markers of versions
reserved but not yet published (`.inflight/`). At start, whatever belongs to no live owner goes:
a crash followed by a quick restart leaves nothing behind, and another process's upload is kept.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FORMAT_VERSION
from ..errors import AdapterConfigError, AdapterFileError
from ..io.files import MANIFEST, TENSORS, read_adapter
from ..io.install import check_adapter
from ..io.storage import PICKLE_SUFFIXES, atomic_write, fsync_dir
from ..methods import is_model_level
from ..routes import finite_number
from .archive import MAX_BYTES, adapter_root, extract_adapter_archive
from .errors import BadRequest, BadUpload, Conflict, InvalidAdapter, NotFound, QuotaExceeded, not_found
from .tenants import DEFAULT_TENANT, valid_name

STATE = "state.json"
COUNTERS = ".versions.json"
SPOOL, STAGING, TRASH, OWNERS, INFLIGHT = ".spool", ".staging", ".trash", ".owners", ".inflight"


@dataclass(frozen=True)
class Quota:
    """What one tenant may keep in the store."""

    max_adapters: int = 1000
    max_bytes: int = 20 << 30
    #: versions kept per adapter (the live one and the newest before it, for rollback)
    keep_versions: int = 5


class AdapterStore:
    def __init__(self, root: str | os.PathLike, fingerprint: str | None = None, max_bytes: int = MAX_BYTES,
                 quota: Quota | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.quota = quota or Quota()
        self._lock = threading.RLock()
        # (tenant, name) -> (state.json's stamp, live version, traffic split or None)
        self._live: dict[tuple[str, str], tuple[tuple[int, int, int], int, Split | None]] = {}
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        (self.root / OWNERS).mkdir(exist_ok=True)
        self._owner_file: Any = open(self.root / OWNERS / f"{self.owner}.lock", "a")  # noqa: SIM115 - held for life
        fcntl.flock(self._owner_file, fcntl.LOCK_EX)
        self.sweep()

    def close(self) -> None:
        """Give up ownership: what this store left in flight is swept by the next one to start."""
        if not self._owner_file.closed:
            (self.root / OWNERS / f"{self.owner}.lock").unlink(missing_ok=True)
            fcntl.flock(self._owner_file, fcntl.LOCK_UN)
            self._owner_file.close()

    @property
    def spool(self) -> Path:
        """Where uploads are written while they arrive (name the files with `owned()`)."""
        folder = self.root / SPOOL
        folder.mkdir(exist_ok=True)
        return folder

    def owned(self, label: str = "") -> str:
        """A fresh entry name that says this store owns it (the sweep keeps it while the store lives)."""
        return f"{self.owner}.{label}{uuid.uuid4().hex}"

    def _alive(self, owner: str) -> bool:
        """Whether a store object that owns `owner`'s lock file still holds it."""
        if owner == self.owner:
            return True
        path = self.root / OWNERS / f"{owner}.lock"
        try:
            handle = open(path, "a")  # noqa: SIM115
        except OSError:
            return False
        with handle:
            try:  # a lock on another open file is refused while its holder lives (this process's too)
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def sweep(self) -> list[str]:
        """Remove every entry that no live store owns: what an interrupted upload, publish or delete
        left behind, whatever its age. Returns what went."""
        removed: list[str] = []
        alive: dict[str, bool] = {}

        def owned_by_the_living(entry: Path) -> bool:
            owner = entry.name.split(".", 1)[0]
            if owner not in alive:
                alive[owner] = "." in entry.name and self._alive(owner)
            return alive[owner]

        def remove(path: Path) -> None:
            _remove(path)
            removed.append(str(path.relative_to(self.root)))

        with self._locked():
            for area in (STAGING, SPOOL, INFLIGHT):
                for entry in (self.root / area).glob("*"):
                    if not owned_by_the_living(entry):
                        remove(entry)
            for entry in (self.root / TRASH).glob("*"):  # deleted adapters: nothing else refers to them
                remove(entry)
            in_flight = {tuple(e.name.split(".")[1:]) for e in (self.root / INFLIGHT).glob("*")}
            for tenant, name in self._all_folders():
                for version in sorted(set(self.versions(tenant, name)) - set(self._kept(tenant, name))):
                    if (tenant, name, str(version)) not in in_flight:
                        remove(self.path(tenant, name, version))
                folder = self.folder(tenant, name)
                if not (folder / STATE).exists() and not self.versions(tenant, name):
                    remove(folder)
            for lock in (self.root / OWNERS).glob("*.lock"):
                if not self._alive(lock.stem):
                    remove(lock)
        return removed

    # --- layout and reading ------------------------------------------------------------------

    def folder(self, tenant: str, name: str) -> Path:
        return self.root / tenant / name

    def path(self, tenant: str, name: str, version: int) -> Path:
        return self.folder(tenant, name) / f"v{version}"

    def state(self, tenant: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder(tenant, name) / STATE).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def resolve(self, tenant: str, name: str, caller: str | None = None) -> int:
        """The version of an adapter that serves a request: the live one, or under a traffic split
        the one `caller` falls on (the same caller always on the same version; no caller: drawn at
        random). NotFound if the tenant has no adapter by that name.

        Read from disk on every call (so processes sharing a store agree), but parsed again only
        when state.json was replaced: a stat per request instead of a read and a JSON parse.
        """
        try:
            st = os.stat(self.folder(tenant, name) / STATE)
        except OSError:
            raise not_found(tenant, name) from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._live.get((tenant, name))
        if cached is None or cached[0] != stamp:
            state = self.state(tenant, name)
            if state is None or not isinstance(state.get("live"), int):
                raise not_found(tenant, name)
            split = state.get("split")
            cached = (stamp, state["live"], _split_of(split) if isinstance(split, dict) and split else None)
            self._live[(tenant, name)] = cached
        _, live, split = cached
        return live if split is None else split.pick(tenant, name, caller)

    def live(self, tenant: str, name: str) -> int:
        """The live version (the one a rollback withdraws), whatever a split sends callers to."""
        self.resolve(tenant, name)
        return self._live[(tenant, name)][1]

    def split(self, tenant: str, name: str, weights: dict[int, float]) -> dict[str, Any]:
        """Split an adapter's traffic between its kept versions by weight (summing to 1); the state."""
        if not weights:
            raise BadRequest("a split names at least one version")
        for version, weight in weights.items():
            if not (finite_number(weight) and 0 <= weight <= 1):
                raise BadRequest(f"the weight of v{version} must be a number in [0, 1], not {weight!r}")
        if abs(sum(weights.values()) - 1) > 1e-6:
            raise BadRequest(f"the weights of a split sum to 1, not {sum(weights.values()):g}")
        with self._locked():
            self.resolve(tenant, name)
            kept = [v for v in self._kept(tenant, name) if self.path(tenant, name, v).is_dir()]
            missing = sorted(set(weights) - set(kept))
            if missing:
                raise NotFound(f"adapter {name!r} has no version {', '.join(f'v{v}' for v in missing)} to split "
                               f"traffic to; it keeps {', '.join(f'v{v}' for v in sorted(kept))}")
            state = self.state(tenant, name) or {}
            state["split"] = {str(v): float(w) for v, w in sorted(weights.items()) if w > 0}
            self._write_state(tenant, name, state)
            return state

    def promote(self, tenant: str, name: str, version: int) -> dict[str, Any]:
        """Make a kept version live and end any split: all traffic goes to it; the state."""
        with self._locked():
            live = self.live(tenant, name)
            state = self.state(tenant, name) or {}
            history = [v for v in state.get("history", []) if v != version]
            if version != live:
                if version not in history and not self.path(tenant, name, version).is_dir():
                    raise NotFound(f"adapter {name!r} has no version v{version} to promote")
                history.append(live)
            state = {"live": version, "history": history}
            self._write_state(tenant, name, state)
            return state

    def _all_folders(self) -> list[tuple[str, str]]:
        """Every (tenant, name) folder, with a state.json or not (a first upload that never went live)."""
        return [(t.name, n.name) for t in sorted(self.root.iterdir()) if t.is_dir() and valid_name(t.name)
                for n in sorted(t.iterdir()) if n.is_dir() and valid_name(n.name)]

    def _kept(self, tenant: str, name: str) -> list[int]:
        """The live version and the history: the versions that count (others are in flight or orphans)."""
        state = self.state(tenant, name) or {}
        live = state.get("live")
        return [v for v in [*state.get("history", []), live] if isinstance(v, int)]

    def versions(self, tenant: str, name: str) -> list[int]:
        folder = self.folder(tenant, name)
        if not folder.is_dir():
            return []
        found = [p.name[1:] for p in folder.iterdir() if p.is_dir() and p.name.startswith("v")]
        return sorted(int(v) for v in found if v.isdigit())

    def record(self, tenant: str, name: str) -> dict[str, Any]:
        live = self.live(tenant, name)
        path = self.path(tenant, name, live)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        config = manifest.get("config") or {}
        return {
            "tenant": tenant, "name": name, "version": live,
            "versions": sorted(set(self.versions(tenant, name)) & set(self._kept(tenant, name))),
            "method": config.get("method"), "labels": manifest.get("labels"), "params": manifest.get("params"),
            "split": (self.state(tenant, name) or {}).get("split"),
            "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0,
        }

    def names(self, tenant: str | None = None) -> list[tuple[str, str]]:
        tenants = [tenant] if tenant is not None else sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and valid_name(p.name)
        )
        out = []
        for t in tenants:
            folder = self.root / t
            if folder.is_dir():
                out += [(t, p.name) for p in sorted(folder.iterdir()) if valid_name(p.name) and (p / STATE).is_file()]
        return out

    # below this method `list` in the class body is the method: later annotations say builtins.list
    def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        records = []
        for t, n in self.names(tenant):
            with contextlib.suppress(NotFound):
                records.append(self.record(t, n))
        return records

    # --- checking -----------------------------------------------------------------------------

    def check(self, folder: Path) -> dict[str, Any]:
        """The manifest of a valid adapter folder for this base; InvalidAdapter/BadUpload otherwise."""
        pickles = sorted(p.name for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise BadUpload(f"pickle files are refused ({pickles}); adapters are safetensors + JSON")
        links = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink())
        if links:
            raise BadUpload(f"symbolic links are refused ({links})")
        try:
            manifest, tensors = read_adapter(folder)
            version = manifest.get("format_version", 0)
            if not 0 <= version <= FORMAT_VERSION:  # a library reads a newer file with a warning; a server refuses
                raise InvalidAdapter(f"manifest format_version {version} is not one this server reads "
                                     f"(versions 0 to {FORMAT_VERSION})")
            if manifest.get("kind") == "fusion":
                raise InvalidAdapter("a fusion file is not an adapter that can be routed per row")
            config = check_adapter(manifest, tensors, "the upload", fingerprint=self.fingerprint,
                                   base_name="this server's base", need_sites=True)
        except (AdapterFileError, AdapterConfigError, TypeError, ValueError) as err:
            raise InvalidAdapter(f"not a valid adapter: {err}") from None
        if is_model_level(config):
            raise InvalidAdapter(
                f"{config.method} adapters add tokens and cannot be routed per row; serve LoRA, bottleneck, IA3 or BitFit"
            )
        return manifest

    # --- staging new versions -----------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder inside the store (same filesystem, so a version moves in by rename)."""
        folder = self.root / STAGING / self.owned()
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def unpack(self, archive: Path, staging: Path) -> Path:
        """The checked adapter folder of an uploaded archive: its manifest and tensors, nothing else."""
        root = extract_adapter_archive(archive, staging / "upload", max_bytes=self.max_bytes)
        kept = staging / "adapter"
        kept.mkdir()
        for name in (MANIFEST, TENSORS):
            if (root / name).is_file():
                os.rename(root / name, kept / name)
        shutil.rmtree(staging / "upload", ignore_errors=True)
        self.check(kept)
        return kept

    def copy_in(self, source: Path, staging: Path, allowed: Path | None = None) -> Path:
        """Copy an adapter folder (inside `allowed`, if given) into staging: regular files only."""
        src = Path(source)
        # what the caller named: a path inside its part of the store, never where the store is
        shown = str(src.relative_to(allowed)) if allowed is not None and src.is_relative_to(allowed) else src.name
        if allowed is not None:
            resolved = src.resolve()
            if not resolved.is_relative_to(allowed.resolve()) or not resolved.is_dir():
                raise NotFound(f"no adapter folder {shown!r} in your part of the store")
            src = resolved
        try:
            src = adapter_root(src)
        except BadUpload:
            raise InvalidAdapter(f"{shown!r}: no {MANIFEST} in this folder") from None
        target = staging / "copy"
        target.mkdir()
        for item in src.iterdir():
            if item.is_symlink():
                raise BadUpload(f"{item.name}: symbolic links are refused")
            if item.is_file() and item.name in (MANIFEST, TENSORS):
                shutil.copyfile(item, target / item.name)
        self.check(target)
        return target

    # --- versions -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across threads and across processes sharing the store."""
        with self._lock, open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def reserve(self, tenant: str, name: str, folder: Path) -> int:
        """Move a checked folder in as the next version, not yet live; returns its number.

        The number is one more than any this adapter ever had, deleted ones included.
        """
        with self._locked():
            self._check_quota(tenant, name, folder)
            counters = self._counters()
            taken = self.versions(tenant, name) + self._kept(tenant, name) + [counters.get(f"{tenant}/{name}", 0)]
            version = max(taken, default=0) + 1
            counters[f"{tenant}/{name}"] = version
            atomic_write(self.root / COUNTERS, json.dumps(counters).encode())
            marker = self._marker(tenant, name, version)
            marker.parent.mkdir(exist_ok=True)
            marker.touch()
            target = self.path(tenant, name, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(folder, target)
            fsync_dir(target.parent)
            return version

    def _marker(self, tenant: str, name: str, version: int) -> Path:
        """The mark of a version this store reserved and has not yet published or discarded."""
        return self.root / INFLIGHT / f"{self.owner}.{tenant}.{name}.{version}"

    def publish(self, tenant: str, name: str, version: int) -> builtins.list[int]:
        """Make `version` live; the one live before goes on the history for rollback. Returns the
        versions pruned beyond the quota's `keep_versions`. Conflict if the version was deleted meanwhile."""
        with self._locked():
            if not self.path(tenant, name, version).is_dir():
                self._marker(tenant, name, version).unlink(missing_ok=True)
                raise Conflict(f"adapter {name!r} was deleted while this version was uploaded; upload it again")
            state = self.state(tenant, name) or {"live": None, "history": []}
            if isinstance(state.get("live"), int) and version < state["live"]:
                raise Conflict(f"adapter {name!r}: a newer version (v{state['live']}) went live meanwhile")
            history = list(state.get("history", []))
            if state.get("live") is not None and state["live"] != version:
                history.append(state["live"])
            keep = max(0, self.quota.keep_versions - 1)
            pruned = history[: len(history) - keep] if len(history) > keep else []
            state = {"live": version, "history": history[len(pruned):]}
            self._write_state(tenant, name, state)
            self._marker(tenant, name, version).unlink(missing_ok=True)
            for old in pruned:
                _remove(self.path(tenant, name, old))
            return pruned

    def _counters(self) -> dict[str, int]:
        try:
            data = json.loads((self.root / COUNTERS).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _check_quota(self, tenant: str, name: str, folder: Path) -> None:
        names = {n for t, n in self.names(tenant)}
        if name not in names and len(names) >= self.quota.max_adapters:
            raise QuotaExceeded(f"tenant {tenant!r} has {len(names)} adapters, its quota; delete one first")
        referenced = sum(_folder_bytes(self.path(tenant, n, v)) for t, n in self.names(tenant) for v in self._kept(t, n))
        used = referenced + _folder_bytes(folder)
        if used > self.quota.max_bytes:
            raise QuotaExceeded(
                f"tenant {tenant!r} would use {used} bytes on disk, over its quota of {self.quota.max_bytes}"
            )

    def discard(self, tenant: str, name: str, version: int) -> None:
        with self._locked():
            shutil.rmtree(self.path(tenant, name, version), ignore_errors=True)
            self._marker(tenant, name, version).unlink(missing_ok=True)
            folder = self.folder(tenant, name)
            if folder.is_dir() and not (folder / STATE).exists() and not self.versions(tenant, name):
                shutil.rmtree(folder, ignore_errors=True)

    def rollback(self, tenant: str, name: str) -> tuple[int, int]:
        """Make the previously live version live again and delete the withdrawn one; returns (from, to).
        (A server keeps serving the withdrawn weights from memory to requests already queued for them.)"""
        with self._locked():
            current = self.live(tenant, name)
            state = self.state(tenant, name) or {}
            history = [v for v in state.get("history", []) if self.path(tenant, name, v).is_dir()]
            if not history:
                raise Conflict(f"adapter {name!r} has no previous version to roll back to (live: v{current})")
            self._write_state(tenant, name, {"live": history[-1], "history": history[:-1]})
            _remove(self.path(tenant, name, current))  # withdrawn: nothing refers to it any more
            return current, history[-1]

    def delete(self, tenant: str, name: str) -> builtins.list[int]:
        """Remove an adapter with all its versions; returns the versions removed."""
        with self._locked():
            self.resolve(tenant, name)
            versions = self.versions(tenant, name)
            trash = self.root / TRASH / uuid.uuid4().hex
            trash.parent.mkdir(exist_ok=True)
            os.rename(self.folder(tenant, name), trash)
        shutil.rmtree(trash, ignore_errors=True)
        return versions

    def add(self, tenant: str, name: str, folder: str | os.PathLike) -> int:
        """Check an adapter folder and make it the live version (no model involved); for scripts."""
        with self.staging() as staging:
            copied = self.copy_in(Path(folder), staging)
            version = self.reserve(tenant, name, copied)
        self.publish(tenant, name, version)
        return version

    def adopt_flat(self, tenant: str = DEFAULT_TENANT) -> builtins.list[str]:
        """Adapter folders placed directly in the store become versions of `tenant` (once)."""
        adopted = []
        for child in sorted(self.root.iterdir()):
            if not (child.is_dir() and (child / MANIFEST).is_file() and valid_name(child.name)):
                continue
            if child.name == tenant or self.state(tenant, child.name) is not None:
                continue
            self.add(tenant, child.name, child)
            adopted.append(child.name)
        return adopted

    def _write_state(self, tenant: str, name: str, state: dict[str, Any]) -> None:
        atomic_write(self.folder(tenant, name) / STATE, json.dumps(state).encode())


@dataclass(frozen=True)
class Split:
    """A traffic split: (version, cumulative weight) in version order."""

    cumulative: tuple[tuple[int, float], ...]

    def pick(self, tenant: str, name: str, caller: str | None) -> int:
        """The version a caller falls on: a hash of (adapter, caller) as a point in [0, 1)."""
        if caller is None:
            point = random.random()
        else:
            digest = hashlib.sha256(f"{tenant}/{name}/{caller}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        for version, edge in self.cumulative:
            if point < edge:
                return version
        return self.cumulative[-1][0]


def _split_of(weights: dict[str, float]) -> Split:
    total, cumulative = 0.0, []
    for version, weight in sorted((int(v), float(w)) for v, w in weights.items()):
        total += weight
        cumulative.append((version, total))
    return Split(tuple(cumulative))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())

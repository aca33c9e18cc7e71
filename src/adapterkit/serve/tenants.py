"""API keys and tenants.

A keys file is JSON mapping each API key to who holds it:

    {"k-acme-1": {"tenant": "acme"},
     "k-globex": {"tenant": "globex"},
     "k-root":   {"admin": true}}

A tenant key lists, uses, uploads and deletes only its tenant's adapters. An admin key manages
all of them and names another tenant's adapter as "<tenant>/<name>" (a plain name means the
admin's own tenant, "default" unless the entry gives one). Without a keys file the server is
single-tenant: every caller is the admin of tenant "default".
The file is re-read when it changes, so keys can be added or revoked without a restart.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .errors import BadRequest, Unauthorized, not_found

DEFAULT_TENANT = "default"
#: tenant and adapter names: letters and digits, single '-' or '_' between them (so that
#: "<tenant>__<name>__v<N>" is unambiguous), at most 64 characters
NAME = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")


def valid_name(name: object) -> TypeGuard[str]:
    return isinstance(name, str) and len(name) <= 64 and bool(NAME.match(name))


def check_name(name: str, what: str = "adapter name") -> str:
    if not valid_name(name):
        raise BadRequest(
            f"{what} {name!r}: use letters and digits with single '-' or '_' between them (at most 64 characters)"
        )
    return name


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, and whether the key may manage every tenant."""

    tenant: str
    admin: bool = False

    def resolve(self, ref: str) -> tuple[str, str]:
        """(tenant, name) of an adapter reference; another tenant's adapter reads as not found."""
        tenant, _, name = ref.rpartition("/")
        tenant = tenant or self.tenant
        if not valid_name(name) or not valid_name(tenant):
            raise not_found(tenant, ref)
        if tenant != self.tenant and not self.admin:
            raise not_found(tenant, ref)
        return tenant, name

    def new_ref(self, ref: str) -> tuple[str, str]:
        """Like `resolve`, for a name about to be created: bad characters are a 400, not a 404."""
        tenant, _, name = ref.rpartition("/")
        tenant = tenant or self.tenant
        if tenant != self.tenant and not self.admin:
            raise not_found(tenant, ref)
        return check_name(tenant, "tenant name"), check_name(name)


SINGLE_TENANT = Principal(DEFAULT_TENANT, admin=True)


class Tenants:
    """API key -> Principal, from a keys file (re-read when it changes) or a dict."""

    def __init__(self, source: str | os.PathLike | dict[str, Any], reload_seconds: float = 1.0) -> None:
        self._path = None if isinstance(source, dict) else Path(source)
        self.reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._checked = 0.0
        self._keys = parse_keys(source) if isinstance(source, dict) else self._read()

    def _read(self) -> dict[str, Principal]:
        assert self._path is not None
        try:
            self._mtime = self._path.stat().st_mtime
            data = json.loads(self._path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"keys file {self._path}: cannot read it as JSON ({err})") from None
        return parse_keys(data, str(self._path))

    def lookup(self, key: str | None) -> Principal:
        if not key:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        self._maybe_reload()
        principal = self._keys.get(key)
        if principal is None:
            raise Unauthorized("unknown API key")
        return principal

    def _maybe_reload(self) -> None:
        if self._path is None or time.monotonic() - self._checked < self.reload_seconds:
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                changed = self._path.stat().st_mtime != self._mtime
            except OSError:
                return  # keep the last good keys if the file goes away for a moment
            if changed:
                try:
                    self._keys = self._read()
                except ValueError:
                    pass  # a half-written file: keep the last good keys


def parse_keys(data: Any, where: str = "keys") -> dict[str, Principal]:
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected a JSON object mapping API keys to {{'tenant': ...}} or {{'admin': true}}")
    keys = {}
    for key, entry in data.items():
        if not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"{where}: API keys must be strings of at least 8 characters")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: the entry of a key must be an object, got {entry!r}")
        admin = entry.get("admin") is True
        tenant = entry.get("tenant", DEFAULT_TENANT if admin else None)
        if not valid_name(tenant):
            raise ValueError(f"{where}: a key needs 'tenant' (letters, digits, single - or _) or 'admin': true")
        keys[key] = Principal(tenant, admin)
    return keys

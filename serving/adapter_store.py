"""The content-addressed adapter store on local disk, its human-name aliases, and peer transfer bundles.

Layout under `$LONGTAIL_HOME/adapters/`:
    <adapterId>/adapter_config.json        canonical JSON (sorted keys, compact), so the bytes hash to the id
    <adapterId>/adapter_model.safetensors  the file exactly as imported
    index.sqlite                           adapters (facts found at import) and aliases (name -> id)

An adapter is validated in full (see `serving.peft_format`) before it enters the store
and its bytes are checked against its id before they leave it, so a folder damaged or
swapped on disk is caught on read. Re-importing the same bytes is a no-op.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import struct
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from longtail.serving.base_models import longtail_home
from longtail.serving.peft_format import (
    CONFIG_NAME,
    DEFAULT_MAX_BYTES,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    AdapterRejected,
    AdapterWeights,
    ModuleShapes,
    _adapter_folder,
    _parse_config_file,
    _strict_json,
    adapter_id_from_parts,
    canonical_config_bytes,
    load_adapter,
)

ADAPTER_ID_PATTERN = re.compile(r"0x[0-9a-f]{64}")
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
BUNDLE_MAGIC = b"LTADPT1\n"
# Bundle: magic, u32 little-endian length of the canonical config, the config, the safetensors bytes.
_BUNDLE_PREFIX = struct.Struct("<8sI")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY,
    file_bytes INTEGER NOT NULL,
    tensor_bytes INTEGER NOT NULL,
    max_rank INTEGER NOT NULL,
    num_modules INTEGER NOT NULL,
    targets TEXT NOT NULL,
    base_model_id TEXT,
    source TEXT NOT NULL,
    imported_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT PRIMARY KEY,
    adapter_id TEXT NOT NULL REFERENCES adapters(adapter_id) ON DELETE CASCADE
);
"""


class AdapterStoreError(RuntimeError):
    """Base class for store failures other than a rejected adapter."""


class AdapterNotFound(AdapterStoreError, LookupError):
    """No adapter with this id or alias is in the local store."""

    def __init__(self, name_or_id: str):
        self.name_or_id = name_or_id
        super().__init__(f"no adapter {name_or_id!r} in the local store")


class AliasTaken(AdapterStoreError):
    """A human name already points at another adapter."""

    def __init__(self, name: str, current_id: str, wanted_id: str):
        self.name, self.current_id, self.wanted_id = name, current_id, wanted_id
        super().__init__(f"alias {name!r} already names {current_id}; remove it first to point it at {wanted_id}")


class IntegrityError(AdapterStoreError):
    """Bytes on disk or from a peer do not hash to the id they claim."""

    def __init__(self, expected_id: str, actual_id: str, where: str):
        self.expected_id, self.actual_id, self.where = expected_id, actual_id, where
        super().__init__(f"{where}: bytes hash to {actual_id}, not the expected {expected_id}")


class FetchFailed(AdapterStoreError):
    """No remote source could deliver an adapter's bytes."""


@dataclass(frozen=True)
class StoredAdapter:
    """What the store knows about one adapter, without loading its tensors."""

    adapter_id: str
    names: tuple[str, ...]
    path: Path
    file_bytes: int  # size of adapter_model.safetensors on disk
    tensor_bytes: int  # size of the factors in fp32 (what one copy costs in host memory at fp32)
    max_rank: int
    num_modules: int
    targets: tuple[str, ...]
    base_model_id: str | None
    source: str
    imported_at: float

    def to_json(self) -> dict:
        return {"adapter_id": self.adapter_id, "names": list(self.names), "path": str(self.path),
                "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes, "max_rank": self.max_rank,
                "num_modules": self.num_modules, "targets": list(self.targets),
                "base_model_id": self.base_model_id, "source": self.source, "imported_at": self.imported_at}


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing (and optionally re-validating) one stored adapter."""

    adapter_id: str
    ok: bool
    reason: str

    def to_json(self) -> dict:
        return {"adapter_id": self.adapter_id, "ok": self.ok, "reason": self.reason}


def is_adapter_id(value: str) -> bool:
    return ADAPTER_ID_PATTERN.fullmatch(value) is not None


def _check_alias(name: str) -> None:
    if is_adapter_id(name) or ALIAS_PATTERN.fullmatch(name) is None:
        raise AdapterStoreError(f"alias {name!r} must be 1-128 characters of letters, digits and ._:/@+- "
                                "starting with a letter or digit, and must not look like an adapter id")


class AdapterStore:
    """Adapters on local disk, addressed by id, named by aliases; safe to share between threads and processes."""

    def __init__(self, home: Path | str | None = None, *, max_rank: int = 256, max_bytes: int = DEFAULT_MAX_BYTES):
        self.home = Path(home).expanduser() if home is not None else longtail_home()
        self.root = self.home / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._index_path = self.root / "index.sqlite"
        self._lock = threading.Lock()
        # (adapter_id) -> stat signature of the weights file when it last hashed to its id.
        self._verified: dict[str, tuple[int, int, int]] = {}
        with self._connect() as db:
            db.executescript(_SCHEMA)

    # ------------------------------------------------------------ index

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._index_path, timeout=30, isolation_level=None)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_mode = WAL")
        return db

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        db = self._connect()
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def _record(self, row: tuple, names: tuple[str, ...]) -> StoredAdapter:
        adapter_id, file_bytes, tensor_bytes, max_rank, num_modules, targets, base_id, source, imported_at = row
        return StoredAdapter(adapter_id, names, self.path_of(adapter_id), file_bytes, tensor_bytes, max_rank,
                             num_modules, tuple(json.loads(targets)), base_id, source, imported_at)

    def path_of(self, adapter_id: str) -> Path:
        if not is_adapter_id(adapter_id):
            raise AdapterNotFound(adapter_id)
        return self.root / adapter_id

    def resolve(self, name_or_id: str) -> str:
        """The adapter id for an alias or id held in the store."""
        if is_adapter_id(name_or_id.lower()):
            rows = self._query("SELECT adapter_id FROM adapters WHERE adapter_id = ?", (name_or_id.lower(),))
        else:
            rows = self._query("SELECT adapter_id FROM aliases WHERE name = ?", (name_or_id,))
        if not rows:
            raise AdapterNotFound(name_or_id)
        return rows[0][0]

    def __contains__(self, name_or_id: str) -> bool:
        try:
            self.resolve(name_or_id)
        except AdapterNotFound:
            return False
        return True

    def get(self, name_or_id: str) -> StoredAdapter:
        adapter_id = self.resolve(name_or_id)
        rows = self._query("SELECT * FROM adapters WHERE adapter_id = ?", (adapter_id,))
        names = tuple(r[0] for r in self._query("SELECT name FROM aliases WHERE adapter_id = ? ORDER BY name",
                                                (adapter_id,)))
        return self._record(rows[0], names)

    def list(self) -> list[StoredAdapter]:
        names: dict[str, list[str]] = {}
        for name, adapter_id in self._query("SELECT name, adapter_id FROM aliases ORDER BY name"):
            names.setdefault(adapter_id, []).append(name)
        rows = self._query("SELECT * FROM adapters ORDER BY imported_at, adapter_id")
        return [self._record(row, tuple(names.get(row[0], ()))) for row in rows]

    def set_alias(self, name: str, name_or_id: str, *, replace: bool = False) -> None:
        """Point a human name at an adapter; an existing name moves only with `replace`."""
        _check_alias(name)
        adapter_id = self.resolve(name_or_id)
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            current = db.execute("SELECT adapter_id FROM aliases WHERE name = ?", (name,)).fetchall()
            if current and current[0][0] != adapter_id and not replace:
                db.execute("ROLLBACK")
                raise AliasTaken(name, current[0][0], adapter_id)
            db.execute("INSERT OR REPLACE INTO aliases (name, adapter_id) VALUES (?, ?)", (name, adapter_id))
            db.execute("COMMIT")
        finally:
            db.close()

    def remove_alias(self, name: str) -> None:
        if not self._query("SELECT 1 FROM aliases WHERE name = ?", (name,)):
            raise AdapterNotFound(name)
        self._query("DELETE FROM aliases WHERE name = ?", (name,))

    # ------------------------------------------------------------ import

    def add(self, source: Path | str, shapes: ModuleShapes, *, name: str | None = None,
            base_model_id: str | None = None, replace_alias: bool = False, origin: str | None = None) -> StoredAdapter:
        """Validate a PEFT folder against the base and copy it into the store (a no-op when already held)."""
        if name is not None:
            _check_alias(name)
        folder = _adapter_folder(Path(source).expanduser())
        weights = load_adapter(folder, shapes, max_rank=self.max_rank, max_bytes=self.max_bytes)
        if not self._holds(weights.adapter_id):
            config = _parse_config_file(folder / CONFIG_NAME)
            self._install(weights, canonical_config_bytes(config), folder / WEIGHTS_NAME,
                          base_model_id, origin or str(folder))
        if name is not None:
            self.set_alias(name, weights.adapter_id, replace=replace_alias)
        return self.get(weights.adapter_id)

    def _holds(self, adapter_id: str) -> bool:
        rows = self._query("SELECT 1 FROM adapters WHERE adapter_id = ?", (adapter_id,))
        return bool(rows) and (self.path_of(adapter_id) / WEIGHTS_NAME).is_file()

    def _install(self, weights: AdapterWeights, config_bytes: bytes, weights_file: Path | None,
                 base_model_id: str | None, origin: str, weights_bytes: bytes | None = None) -> None:
        """Write the two files into a staging folder, then rename it into place, so a crash leaves no half adapter."""
        target = self.path_of(weights.adapter_id)
        with self._lock:
            if not (target / WEIGHTS_NAME).is_file():
                self._stage(weights, config_bytes, weights_file, origin, weights_bytes, target)
            targets = sorted({m.module for m in weights.modules})
            self._query(
                # An upsert, not INSERT OR REPLACE: a replace deletes the row first and would cascade to aliases.
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(adapter_id) DO UPDATE SET "
                "file_bytes = excluded.file_bytes, source = excluded.source",
                (weights.adapter_id, (target / WEIGHTS_NAME).stat().st_size, weights.nbytes, weights.max_rank,
                 len(weights.modules), json.dumps(targets), base_model_id, origin, time.time()),
            )

    def _stage(self, weights: AdapterWeights, config_bytes: bytes, weights_file: Path | None, origin: str,
               weights_bytes: bytes | None, target: Path) -> None:
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
            (staging / CONFIG_NAME).write_bytes(config_bytes)
            if weights_bytes is not None:
                (staging / WEIGHTS_NAME).write_bytes(weights_bytes)
            else:
                shutil.copyfile(weights_file, staging / WEIGHTS_NAME)
            for file in staging.iterdir():
                with file.open("rb") as handle:
                    os.fsync(handle.fileno())
            staged_id = adapter_id_from_parts(json.loads(config_bytes), staging / WEIGHTS_NAME)
            if staged_id != weights.adapter_id:
                # The source changed between validation and copy: keep nothing.
                raise IntegrityError(weights.adapter_id, staged_id, f"copy of {origin}")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except OSError as error:
            # A full disk (ENOSPC) or a read-only store: this adapter is refused, what the store holds is untouched.
            raise AdapterStoreError(f"cannot store adapter {weights.adapter_id}: {error.strerror or error}") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------ read

    def verify_files(self, adapter_id: str) -> None:
        """Re-hash the stored files unless they are unchanged since they last matched the id."""
        folder = self.path_of(adapter_id)
        weights_file = folder / WEIGHTS_NAME
        try:
            stat = weights_file.stat()
            config_stat = (folder / CONFIG_NAME).stat()
        except FileNotFoundError:
            raise IntegrityError(adapter_id, "<missing files>", str(folder)) from None
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns ^ config_stat.st_mtime_ns)
        if self._verified.get(adapter_id) == signature:
            return
        try:
            actual = adapter_id_from_parts(_parse_config_file(folder / CONFIG_NAME), weights_file)
        except AdapterRejected as error:
            raise IntegrityError(adapter_id, f"<unreadable: {error.reason}>", str(folder)) from None
        if actual != adapter_id:
            raise IntegrityError(adapter_id, actual, str(folder))
        self._verified[adapter_id] = signature

    def load(self, name_or_id: str, shapes: ModuleShapes, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> AdapterWeights:
        """The adapter's factors, after checking the files still hash to its id."""
        adapter_id = self.resolve(name_or_id)
        self.verify_files(adapter_id)
        return load_adapter(self.path_of(adapter_id), shapes, max_rank=self.max_rank, max_bytes=self.max_bytes,
                            device=device, dtype=dtype, adapter_id=adapter_id)

    def verify(self, name_or_id: str, shapes: ModuleShapes | None = None) -> VerifyResult:
        """Re-hash the files (always, ignoring the cache); with `shapes`, validate them against that base too."""
        adapter_id = self.resolve(name_or_id)
        self._verified.pop(adapter_id, None)
        try:
            self.verify_files(adapter_id)
            if shapes is not None:
                load_adapter(self.path_of(adapter_id), shapes, max_rank=self.max_rank, max_bytes=self.max_bytes,
                             adapter_id=adapter_id)
        except (IntegrityError, AdapterRejected) as error:
            return VerifyResult(adapter_id, False, str(error))
        return VerifyResult(adapter_id, True, "files hash to the id" + (" and fit the base" if shapes else ""))

    def remove(self, name_or_id: str) -> StoredAdapter:
        """Delete an adapter's files, index row and aliases."""
        record = self.get(name_or_id)
        with self._lock:
            self._query("DELETE FROM aliases WHERE adapter_id = ?", (record.adapter_id,))
            self._query("DELETE FROM adapters WHERE adapter_id = ?", (record.adapter_id,))
            shutil.rmtree(record.path, ignore_errors=True)
            self._verified.pop(record.adapter_id, None)
        return record

    # ------------------------------------------------------------ peer transfer

    def open_bundle(self, name_or_id: str) -> bytes:
        """The adapter as one verified byte string for a peer: magic, config length, config, safetensors."""
        adapter_id = self.resolve(name_or_id)
        self.verify_files(adapter_id)
        folder = self.path_of(adapter_id)
        config_bytes = (folder / CONFIG_NAME).read_bytes()
        return _BUNDLE_PREFIX.pack(BUNDLE_MAGIC, len(config_bytes)) + config_bytes + (folder / WEIGHTS_NAME).read_bytes()

    def import_bundle(self, data: bytes, expected_id: str, shapes: ModuleShapes, *, name: str | None = None,
                      base_model_id: str | None = None, origin: str = "bundle") -> StoredAdapter:
        """Accept a peer's bundle only if it hashes to `expected_id` and passes full validation."""
        expected_id = expected_id.lower()
        if not is_adapter_id(expected_id):
            raise AdapterStoreError(f"{expected_id!r} is not an adapter id (0x + 64 hex digits)")
        config_bytes, weights_bytes = split_bundle(data, self.max_bytes)
        actual = adapter_id_from_parts(_strict_json(config_bytes, "bundle config", origin), weights_bytes)
        if actual != expected_id:
            raise IntegrityError(expected_id, actual, origin)
        if not self._holds(expected_id):
            with tempfile.TemporaryDirectory(prefix=".bundle-", dir=self.root) as scratch:
                folder = Path(scratch)
                (folder / CONFIG_NAME).write_bytes(config_bytes)
                (folder / WEIGHTS_NAME).write_bytes(weights_bytes)
                weights = load_adapter(folder, shapes, max_rank=self.max_rank, max_bytes=self.max_bytes,
                                       adapter_id=expected_id)
                self._install(weights, config_bytes, None, base_model_id, origin, weights_bytes=weights_bytes)
        if name is not None:
            self.set_alias(name, expected_id)
        return self.get(expected_id)

    def fetch(self, adapter_id: str, sources: Iterable[RemoteSource], shapes: ModuleShapes) -> StoredAdapter:
        """Bring an adapter from the first remote source that delivers bytes hashing to its id."""
        if self._holds(adapter_id):
            return self.get(adapter_id)
        failures = []
        for source in sources:
            try:
                return self.import_bundle(source.fetch(adapter_id), adapter_id, shapes, origin=source.describe())
            except (FetchFailed, IntegrityError, AdapterRejected) as error:
                failures.append(f"{source.describe()}: {error}")
        raise FetchFailed(f"no source delivered {adapter_id}: " + ("; ".join(failures) or "no sources configured"))


def split_bundle(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, bytes]:
    """(canonical config bytes, safetensors bytes) from a bundle, checking its framing and canonical config."""
    if len(data) < _BUNDLE_PREFIX.size:
        raise AdapterRejected(f"bundle is {len(data)} bytes, shorter than its {_BUNDLE_PREFIX.size}-byte prefix")
    magic, config_len = _BUNDLE_PREFIX.unpack_from(data)
    if magic != BUNDLE_MAGIC:
        raise AdapterRejected(f"bundle starts with {magic!r}, not {BUNDLE_MAGIC!r}")
    if config_len > MAX_CONFIG_BYTES or _BUNDLE_PREFIX.size + config_len > len(data):
        raise AdapterRejected(f"bundle declares a {config_len}-byte config that does not fit its {len(data)} bytes")
    if len(data) > max_bytes + MAX_CONFIG_BYTES + _BUNDLE_PREFIX.size:
        raise AdapterRejected(f"bundle is {len(data)} bytes, over the size limit")
    config_bytes = bytes(data[_BUNDLE_PREFIX.size:_BUNDLE_PREFIX.size + config_len])
    config = _strict_json(config_bytes, "bundle config", None)
    if not isinstance(config, dict) or canonical_config_bytes(config) != config_bytes:
        raise AdapterRejected("bundle config is not in canonical form (sorted keys, compact JSON)")
    return config_bytes, bytes(data[_BUNDLE_PREFIX.size + config_len:])


@runtime_checkable
class RemoteSource(Protocol):
    """Somewhere an adapter's bundle can come from: a peer over libp2p, an HTTP URL, a mirror."""

    def fetch(self, adapter_id: str) -> bytes:
        """The bundle bytes for `adapter_id` (verified by the store, not here); raises FetchFailed."""
        ...

    def describe(self) -> str:
        ...


class HttpSource:
    """Fetch bundles over HTTP(S) from a URL template such as `http://peer:8000/v1/adapters/{adapter_id}/bundle`."""

    def __init__(self, url_template: str, *, timeout_s: float = 30.0,
                 max_bytes: int = DEFAULT_MAX_BYTES + MAX_CONFIG_BYTES + _BUNDLE_PREFIX.size):
        if "{adapter_id}" not in url_template:
            url_template = url_template.rstrip("/") + "/{adapter_id}/bundle"
        if not url_template.startswith(("http://", "https://")):
            raise ValueError(f"HttpSource needs an http(s) URL, got {url_template!r}")
        self.url_template = url_template
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes  # the whole bundle: config, framing and weights

    def describe(self) -> str:
        return self.url_template

    def fetch(self, adapter_id: str) -> bytes:
        """The bundle within `timeout_s` for the whole transfer (connect, headers, body), not per read: a peer
        that drips a byte every few seconds is cut at the deadline. No redirects are followed."""
        if not is_adapter_id(adapter_id):
            raise FetchFailed(f"{adapter_id!r} is not an adapter id")
        url = self.url_template.format(adapter_id=adapter_id)
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        deadline = time.monotonic() + self.timeout_s
        cut = threading.Event()
        connection = None

        def cut_at_deadline() -> None:
            # Shutting the socket down wakes the blocked read on the fetching thread with EOF or an error.
            cut.set()
            sock = getattr(connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout_s, cut_at_deadline)
        watchdog.daemon = True
        try:
            connection = kind(parts.hostname, parts.port, timeout=self.timeout_s)
            watchdog.start()
            connection.request("GET", path or "/", headers={"Accept": "application/octet-stream"})
            response = connection.getresponse()
            if response.status != 200:
                raise FetchFailed(f"{url} answered HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
                raise FetchFailed(f"{url} offers {declared[:32]} bytes, over the {self.max_bytes}-byte limit")
            body = bytearray()
            # Read one byte past the limit so an undeclared oversized body is caught without buffering it all.
            while len(body) <= self.max_bytes:
                chunk = response.read(min(1 << 16, self.max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
                if time.monotonic() > deadline:
                    cut.set()
                    break
            if declared is not None and not cut.is_set() and len(body) < int(declared):
                raise FetchFailed(f"{url} ended after {len(body)} of {declared} bytes")
        except FetchFailed:
            raise
        except (http.client.HTTPException, OSError, ValueError) as error:  # garbage status line, cut chunk, reset
            if cut.is_set():
                raise FetchFailed(f"{url} did not deliver within {self.timeout_s:g} s") from None
            raise FetchFailed(f"{url} failed: {type(error).__name__}: {error}") from None
        finally:
            watchdog.cancel()
            if connection is not None:
                connection.close()
        if cut.is_set():
            raise FetchFailed(f"{url} did not deliver within {self.timeout_s:g} s")
        if len(body) > self.max_bytes:
            raise FetchFailed(f"{url} sent more than {self.max_bytes} bytes")
        return bytes(body)

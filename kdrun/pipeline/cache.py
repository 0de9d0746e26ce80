"""Content-addressed artefacts (trained teachers and baselines): built once, shared by every run that needs them.

An entry is ``<root>/<kind>/<key>/`` holding its model file ``model.<suffix of the built file>`` (``model.safetensors``;
entries of earlier kdrun versions have ``model.pt``) and ``meta.json`` (key fields, metrics, the model file's name and
checksum, creation time). The key is a hash of everything that determines the artefact and nothing else. Entries appear
by renaming a finished temp folder, under a per-key file lock, so parallel jobs build each artefact once and
a reader never sees half of one. The lock is an OS lock (``flock``): a killed holder releases it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kdrun.core import distributed
from kdrun.core.io import file_sha256, fsync_path

log = logging.getLogger(__name__)

# Bump when a change to the code alters what training produces: every older entry stops matching.
TRAINING_CODE_VERSION = "train-v2"
MODEL_STEM = "model"
LEGACY_MODEL_FILE = "model.pt"  # what entries whose meta.json names no model file hold (earlier kdrun versions)
META_FILE = "meta.json"
WAIT_LOG_EVERY_S = 60.0


def cache_key(fields: Mapping[str, Any]) -> str:
    """A short, stable hash of the (JSON-serialisable) fields that determine an artefact."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Entry:
    kind: str
    key: str
    dir: Path
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.dir / model_file_of(self.meta)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta["metrics"]


class ArtefactCache:
    """Trained models keyed by what determines them; ``fetch_or_build`` is the one way in."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def fetch_or_build(
        self, kind: str, fields: Mapping[str, Any], build: Callable[[], tuple[Path, dict[str, Any]]]
    ) -> tuple[Entry, bool]:
        """Return ``(entry, hit)``: the verified entry for ``fields``, built by ``build()`` if it is missing.

        ``build`` trains the artefact and returns ``(model file, metrics)``; the file is copied into the cache.
        Jobs asking for the same key wait for the one building it, then reuse its entry.

        In a run on several processes every rank calls this: rank 0 looks the entry up, and on a miss every rank
        runs ``build`` (they train together) while rank 0 alone stores the result; all get rank 0's entry.
        """
        if distributed.world_size() > 1:
            main = distributed.is_main()
            entry = distributed.broadcast(self._lookup(kind, fields) if main else None)
            if entry is not None:
                return entry, True
            built = build()
            entry = distributed.broadcast(self.fetch_or_build_here(kind, fields, lambda: built)[0] if main else None)
            return entry, False
        return self.fetch_or_build_here(kind, fields, build)

    def fetch_or_build_here(
        self, kind: str, fields: Mapping[str, Any], build: Callable[[], tuple[Path, dict[str, Any]]]
    ) -> tuple[Entry, bool]:
        """``fetch_or_build`` in this process alone."""
        with self._slot(kind, fields) as (key, folder):
            _remove_stale_temps(folder, key)
            entry = self._verified(kind, key)
            if entry is not None:
                log.info("cache hit: %s %s (%s)", kind, key, entry.dir)
                return entry, True
            log.info("cache miss: %s %s, building it", kind, key)
            model_file, metrics = build()
            entry = self._store(kind, key, dict(fields), Path(model_file), metrics)
            log.info("cached %s %s (%s)", kind, key, entry.dir)
            return entry, False

    def _lookup(self, kind: str, fields: Mapping[str, Any]) -> Entry | None:
        """The verified entry for ``fields``, or None; builds nothing."""
        with self._slot(kind, fields) as (key, _):
            return self._verified(kind, key)

    @contextmanager
    def _slot(self, kind: str, fields: Mapping[str, Any]) -> Iterator[tuple[str, Path]]:
        """``(key, folder)`` of the entry for ``fields``, held under its lock."""
        key = cache_key(fields)
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / f"{key}.lock", f"{kind} {key}"):
            yield key, folder

    def entries(self, kind: str) -> list[Entry]:
        """The complete, verified entries of one kind."""
        folder = self.root / kind
        keys = (
            sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            if folder.is_dir()
            else []
        )
        return [e for e in (self._verified(kind, k, repair=False) for k in keys) if e is not None]

    def _verified(self, kind: str, key: str, repair: bool = True) -> Entry | None:
        """The entry if it is whole; a damaged one is reported and (when ``repair``) moved out of the way."""
        folder = self.root / kind / key
        if not folder.exists():
            return None
        problem = None
        try:
            meta = json.loads((folder / META_FILE).read_text())
            name = model_file_of(meta)
            model = folder / name
            if meta.get("key") != key:
                problem = f"its meta.json names key {meta.get('key')!r}"
            elif not model.is_file():
                problem = f"{name} is missing"
            elif model.stat().st_size != meta["size"]:
                problem = f"{name} has {model.stat().st_size} bytes, expected {meta['size']} (truncated?)"
            elif file_sha256(model) != meta["sha256"]:
                problem = f"{name} fails its sha256 checksum"
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"its {META_FILE} is unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return Entry(kind, key, folder, meta)
        log.warning("cache entry %s is corrupt: %s; %s", folder, problem, "rebuilding it" if repair else "ignoring it")
        if repair:
            trash = folder.with_name(f".corrupt-{key}-{os.getpid()}-{time.time_ns()}")
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return None

    def _store(self, kind: str, key: str, fields: dict, model_file: Path, metrics: dict) -> Entry:
        folder = self.root / kind / key
        tmp = folder.with_name(f".tmp-{key}-{os.getpid()}")
        tmp.mkdir()
        name = MODEL_STEM + model_file.suffix
        try:
            shutil.copyfile(model_file, tmp / name)
            fsync_path(tmp / name)
            meta = {
                "key": key,
                "kind": kind,
                "file": name,
                "fields": fields,
                "metrics": metrics,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": os.uname().nodename,
                "pid": os.getpid(),
                "sha256": file_sha256(tmp / name),
                "size": (tmp / name).stat().st_size,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            fsync_path(tmp / META_FILE)
            if folder.exists():
                # Written meanwhile without our lock (the cache folder was recreated under a running job, or the
                # filesystem ignores flock): keep a whole entry, replace a damaged one.
                existing = self._verified(kind, key)
                if existing is not None:
                    log.warning("cache entry %s appeared while this job built it; using that one", folder)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return existing
            os.rename(tmp, folder)
            fsync_path(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(kind, key, folder, meta)


def model_file_of(meta: Mapping[str, Any]) -> str:
    """The name of an entry's model file, as its meta.json records it (a bare name inside the entry)."""
    name = meta.get("file", LEGACY_MODEL_FILE)
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise ValueError(f"its meta.json names the model file {name!r}")
    return name


@contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """Hold a file lock, logging now and then while another job holds it."""
    lock = FileLock(str(path))
    waited, timeout = 0.0, 1.0
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            waited += timeout
            timeout = WAIT_LOG_EVERY_S
            log.info("waiting for another job to finish building %s (%.0f s so far)", what, waited)
    try:
        yield
    finally:
        lock.release()


def _remove_stale_temps(folder: Path, key: str) -> None:
    """Temp folders of builds killed before they finished (we hold the key's lock, so none is in progress)."""
    for tmp in folder.glob(f".tmp-{key}-*"):
        shutil.rmtree(tmp, ignore_errors=True)

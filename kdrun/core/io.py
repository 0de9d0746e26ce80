"""Files written whole or not at all (temp file, fsync, rename, fsync of the folder), and safe reads.

Tensors that outlive a run (model files, cached teacher logits) are safetensors files: reading one never unpickles.
The training states of a stage in progress are ``torch.save`` files, read back with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from kdrun.core.errors import KdrunError


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temp path beside ``path`` for the caller to write; on success it is fsynced and renamed over ``path``.

    A reader (or a resume after a power loss) sees the old file or the whole new one, never a part. ``suffix``
    ends the temp name, for writers that choose the format by it (``.pt2``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem if suffix else path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        disk = next((c for c in _chain(e) if isinstance(c, OSError) and c.strerror), None)
        if disk is not None:  # a full disk surfaces from torch.save as a RuntimeError around the OSError
            raise KdrunError(
                f"could not write {path}: {disk.strerror} (errno {disk.errno}); "
                f"{'the previous file is intact' if path.exists() else 'nothing was written'}"
            ) from e
        raise
    fsync_path(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` into a binary file that replaces ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A safetensors file of ``tensors`` (CPU copies, so that none shares memory) and ``metadata``, atomically."""
    own = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    blob = safetensors.torch.save(own, metadata)
    atomic_write(path, lambda f: f.write(blob))


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte header length, then the JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_tensors(path: str | os.PathLike, key: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header metadata of a safetensors file (no code runs); failures are one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdrunError(f"{key}={path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise KdrunError(
            f"{key}={path} is not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from e


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) atomically."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, one trailing newline) atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def read_state(path: str | os.PathLike, key: str = "checkpoint", safe_types: Sequence[type] = ()) -> dict[str, Any]:
    """Load a dict saved with ``torch.save``, safely (tensors and plain containers only, and instances of the
    data-only ``safe_types``, e.g. ``argparse.Namespace``, built without running their code); failures are one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdrunError(f"{key}={path}: no such file")
    try:
        with torch.serialization.safe_globals(list(safe_types)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise KdrunError(
            f"{key}={path} was refused by torch.load(weights_only=True): it holds Python objects "
            f"that are not tensors or plain containers, and kdrun never runs pickled code ({_first_line(e, '')})"
        ) from e
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        raise KdrunError(
            f"{key}={path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from e
    if not isinstance(obj, dict):
        raise KdrunError(f"{key}={path} holds a {type(obj).__name__}, not a state_dict or a kdrun checkpoint")
    return obj


def _first_line(e: BaseException, empty: str | None = None) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else (type(e).__name__ if empty is None else empty)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Training curves that travel with a model: a trained stage's per-epoch ``history`` rows are kept in its model file
(and so in its cache entry, under the entry's checksum), and replayed into the TensorBoard of a run that reuses the
model from the cache or loads it from a checkpoint, so every run of a sweep shows every stage's curves."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from numbers import Real
from typing import Any

from kdrun.training.loop import write_epoch

log = logging.getLogger(__name__)

History = list[dict[str, float]]


def stored_history(meta: Mapping[str, Any], where: str) -> History | None:
    """The ``history`` rows of a model file's metadata; None when it has none (a plain state_dict, a file or cache
    entry written before histories were kept) or when they are not epoch rows (reported, never fatal)."""
    rows = meta.get("history")
    if rows is None:
        return None
    if isinstance(rows, list) and rows and all(_is_row(row) for row in rows):
        return rows
    log.warning("%s: its training history is not a list of epoch rows; its curves are not replayed", where)
    return None


def replay(writer: Any, name: str, rows: History | None, source: str) -> str | None:
    """Write ``rows`` into ``writer`` under ``name`` with the live loop's tags and steps; return the stage's
    ``history_source`` (``source``, e.g. ``"cache <key>"``), or None when there is nothing to replay."""
    if not rows:
        return None
    for row in rows:
        write_epoch(writer, name, row)
    if writer is not None:
        log.info("%s: %d epochs of training curves replayed into TensorBoard (%s)", name, len(rows), source)
    return source


def _is_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("epoch"), int)
        and all(isinstance(k, str) and isinstance(v, Real) and not isinstance(v, bool) for k, v in row.items())
    )

"""Training curves that travel with a model: a trained stage's per-epoch ``history`` rows are kept in its model file
(and so in its cache entry, under the entry's checksum), and replayed into the TensorBoard of a run that reuses the
model from the cache or loads it from a checkpoint, so every run of a sweep shows every stage's curves."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from kdrun.core.errors import KdrunError
from kdrun.core.io import read_state
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


def replay(writer: Any, name: str, rows: History | None, source: str, after: int = 0) -> str | None:
    """Write ``rows`` (those of epochs past ``after``) into ``writer`` under ``name`` with the live loop's tags and
    steps; return the stage's ``history_source`` (``source``, e.g. ``"cache <key>"``), or None without rows."""
    if not rows:
        return None
    new = [row for row in rows if row["epoch"] > after]
    for row in new:
        write_epoch(writer, name, row)
    if writer is not None:
        log.info("%s: %d epochs of training curves replayed into TensorBoard (%s)", name, len(new), source)
    return source


def logged_epochs(state_file: Path) -> int:
    """The epochs whose curves an earlier attempt of this run wrote while it trained the stage, before another job
    cached it: those of its saved training state (0 without one). A replay skips them."""
    if not state_file.is_file():
        return 0
    try:
        return int(read_state(state_file, "training checkpoint").get("epoch", 0))
    except KdrunError:  # unreadable: training would have refused it; replay every epoch
        return 0


def _is_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("epoch"), int)
        and all(isinstance(k, str) and isinstance(v, Real) and not isinstance(v, bool) for k, v in row.items())
    )

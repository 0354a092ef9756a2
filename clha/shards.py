"""Per-process result shards, shared by the evaluation stages (`clha/eval/shards.py`) and candidate sampling
(`clha/data/candidates.py`): each shard is a JSON file `{"fingerprint": ..., "rows": [{"index": i, ...}, ...]}`,
written atomically; a merge reads them all back and checks that every row appears exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple


class ShardError(RuntimeError):
    """Shards are missing, stale, or do not cover every row exactly once."""


def read_shard(path: Path) -> Optional[Dict[str, Any]]:
    """The shard's content, or None when it is missing, unreadable or not a shard."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def shard_is_current(path: Path, fp: str, indices: Iterable[int]) -> bool:
    """The shard exists, has this fingerprint and holds exactly the rows `indices`, in that order."""
    data = read_shard(path)
    return (data is not None and data.get("fingerprint") == fp
            and [row.get("index") for row in data["rows"] if isinstance(row, dict)] == list(indices))


def few(items: Sequence, k: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:k])) + (f" ... ({len(items)} in all)" if len(items) > k else "")


def merge_rows(paths: Iterable[Path], fp: str, n: int, where: str, noun: str = "rows",
               rerun_unreadable: str = "rerun", rerun_stale: str = "rerun") -> List[Dict[str, Any]]:
    """Rows 0..n-1 of the shards `paths`, ordered by index. ShardError (naming `where`) when a shard is unreadable
    or has another fingerprint, or when a row is missing, present twice or has an invalid index."""
    by_index: Dict[int, Dict[str, Any]] = {}
    duplicates: List[Any] = []
    bad: List[Any] = []
    for path in paths:
        data = read_shard(path)
        if data is None:
            raise ShardError(f"{path}: unreadable shard; {rerun_unreadable}")
        if data.get("fingerprint") != fp:
            raise ShardError(f"{path}: stale shard (made from other inputs or settings); {rerun_stale}")
        for row in data["rows"]:
            index = row.get("index") if isinstance(row, dict) else None
            if not isinstance(index, int) or not 0 <= index < n:
                bad.append(index)
            elif index in by_index:
                duplicates.append(index)
            else:
                by_index[index] = row
    missing = [i for i in range(n) if i not in by_index]
    if duplicates or missing or bad:
        raise ShardError(f"{where}: " + "; ".join(part for part in (
            f"{noun} present twice: {few(duplicates)}" if duplicates else "",
            f"{noun} missing: {few(missing)}" if missing else "",
            f"{noun} with an invalid index: {few(bad)}" if bad else "") if part))
    return [by_index[i] for i in range(n)]

"""Shards: in every stage, process `r` of `W` takes the examples `i % W == r` of each subset and writes one shard
`OUT/shards/<stage>/<subset>.rank<r>-of-<W>.json` (atomically) holding a fingerprint of everything its content
depends on. A rerun skips shards that are complete and current; merging orders rows by example index and fails
(`ShardError`) when an example is missing or present twice, or a shard is stale."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from clha.fileio import write_json
from clha.shards import ShardError, merge_rows, read_shard, shard_is_current  # noqa: F401 - re-exported

logger = logging.getLogger("clha.eval")

# Bumped when a stage's output for the same inputs changes meaning; part of every fingerprint.
FORMAT_VERSION = 1


def shard_share(n: int, rank: int, world_size: int) -> List[int]:
    """The example indices process `rank` of `world_size` handles: i % world_size == rank."""
    return list(range(rank, n, world_size))


def shard_dir(out_dir: str | os.PathLike, stage: str) -> Path:
    return Path(out_dir) / "shards" / stage


def shard_path(out_dir: str | os.PathLike, stage: str, subset: str, rank: int, world_size: int) -> Path:
    return shard_dir(out_dir, stage) / f"{subset}.rank{rank}-of-{world_size}.json"


_SHARD_NAME = re.compile(r"^(?P<subset>\w+)\.rank(?P<rank>\d+)-of-(?P<world>\d+)\.json$")


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]


def write_shard(path: Path, stage: str, subset: str, rank: int, world_size: int, fp: str,
                rows: List[Dict[str, Any]]) -> None:
    write_json(path, {"stage": stage, "subset": subset, "rank": rank, "world_size": world_size,
                      "fingerprint": fp, "format_version": FORMAT_VERSION, "rows": rows})


def remove_other_world_sizes(out_dir: str | os.PathLike, stage: str, subset: str, world_size: int) -> None:
    """Shards written by a run with another number of processes cannot be mixed with this run's; drop them."""
    folder = shard_dir(out_dir, stage)
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        m = _SHARD_NAME.match(f.name)
        if m and m["subset"] == subset and int(m["world"]) != world_size:
            logger.info("removing %s (written with %s processes, this run has %d)", f, m["world"], world_size)
            f.unlink(missing_ok=True)


def merge_shards(out_dir: str | os.PathLike, stage: str, subset: str, n: int, fp: str) -> List[Dict[str, Any]]:
    """Rows of all shards of (stage, subset), ordered by example index 0..n-1.

    Raises ShardError naming the files when a shard is missing, stale (another fingerprint) or unreadable, or
    when an example is missing or present twice.
    """
    folder = shard_dir(out_dir, stage)
    found: Dict[int, List[Tuple[int, Path]]] = {}
    if folder.is_dir():
        for f in folder.iterdir():
            m = _SHARD_NAME.match(f.name)
            if m and m["subset"] == subset:
                found.setdefault(int(m["world"]), []).append((int(m["rank"]), f))
    if not found:
        raise ShardError(f"no {stage} shards for subset {subset!r} in {folder}: run the {stage} stage first")
    if len(found) > 1:
        raise ShardError(f"{folder}: {subset} has {stage} shards of several process counts {sorted(found)}; "
                         f"rerun the {stage} stage")
    (world_size, shards), = found.items()
    ranks = sorted(rank for rank, _ in shards)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        raise ShardError(f"{folder}: {subset} {stage} shards of ranks {missing} (of {world_size}) are missing: "
                         f"rerun the {stage} stage to complete them")
    return merge_rows([f for _, f in sorted(shards)], fp, n, f"{folder}: subset {subset!r} ({stage})",
                      noun="examples", rerun_unreadable=f"rerun the {stage} stage with --force",
                      rerun_stale=f"rerun the {stage} stage")


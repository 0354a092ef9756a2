"""Reward-model training data: `PreferenceExample` (a prompt and its candidates in preference order, best first,
with stored rewards when known), built from ranked JSONL (`clha.data.format`; the file's candidate order is the
preference, its `reward` field the stored reward) or from raw HH-RLHF pairs (`clha.data.hh_raw`, human order),
restricted to prompt-grouped partitions (`clha.data.splits`) and, for raw test rows, joined with PRO-format stored
rewards by subset + line number (`clha.data.precomputed`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from clha.errors import InputError
from clha.fileio import data_files
from clha.rm.config import RewardTrainConfig, _csv, parse_shard

@dataclass
class PreferenceExample:
    """One prompt with candidates in preference order (index 0 is the best)."""

    prompt: List[str]                      # marker turns ending with the bare "<|assistant|>"
    responses: List[str]
    subset: str = "unknown"                # raw folder name (harmless-base, ...) when known
    key: str = ""                          # stable id: "<file>:<line>"
    line_num: Optional[int] = None         # 1-based line in the raw file (raw and PRO rows)
    stored_rewards: Optional[List[float]] = None   # one per candidate, when known (e.g. OpenAssistant)

    @property
    def n(self) -> int:
        return len(self.responses)

    @property
    def first_human_turn(self) -> str:
        from clha.data.format import first_human_turn

        return first_human_turn(self.prompt)

    def has_pairs(self) -> bool:
        """At least two candidates with different texts (identical candidates carry no preference)."""
        return len(set(self.responses)) > 1


def _subset_of_ranked(meta: Dict[str, Any], path: Path) -> str:
    """Subset of a ranked row: meta.source, else the folder in meta.path, else the file stem, else 'unknown'."""
    from clha.data.hh_raw import canonical_subset

    candidates = [meta.get("source"), meta.get("subset")]
    if isinstance(meta.get("path"), str):
        candidates.append(Path(meta["path"]).parent.name)
    candidates.append(path.stem)
    for cand in candidates:
        if isinstance(cand, str) and cand:
            try:
                return canonical_subset(cand)
            except InputError:
                continue
    return "unknown"


def _expand_files(spec: str, what: str) -> List[Path]:
    files: List[Path] = []
    for part in _csv(spec):
        files.extend(data_files(part, what))
    if not files:
        raise InputError("no file given", field=what)
    return files


def read_ranked_examples(spec: str, what: str = "train_file_path") -> List[PreferenceExample]:
    """Ranked JSONL rows (validated by `clha.data.format.parse_ranked`) as preference examples.

    The candidate order of a row is the preference; a row's `reward` (when present) becomes `stored_rewards`.
    """
    from clha.data.format import parse_ranked
    from clha.fileio import iter_jsonl

    examples: List[PreferenceExample] = []
    for path in _expand_files(spec, what):
        for line, obj in iter_jsonl(path):
            ex = parse_ranked(obj, str(path), line, require_reward=False)
            if len(set(map(tuple, ex.prefix))) != 1:
                raise InputError("candidates of one row must share the prompt", str(path), line, "prefix")
            line_num = ex.meta.get("line_num")
            examples.append(PreferenceExample(
                prompt=list(ex.prefix[0]), responses=list(ex.suffix), subset=_subset_of_ranked(ex.meta, path),
                key=f"{path.name}:{line}", line_num=line_num if isinstance(line_num, int) else None,
                stored_rewards=list(ex.reward) if obj.get("reward") is not None else None))
    return examples


def partition_config(cfg: RewardTrainConfig):
    from clha.data.splits import PartitionConfig

    if cfg.partition_fractions:
        return PartitionConfig.from_list([float(v) for v in _csv(cfg.partition_fractions)], cfg.partition_seed)
    return PartitionConfig(seed=cfg.partition_seed)


def read_raw_partitions(raw_dir: str, partitions: Sequence[str], cfg: RewardTrainConfig,
                        pro_rewards_dir: Optional[str] = None) -> Tuple[List[PreferenceExample], Dict[str, int]]:
    """Raw HH-RLHF pairs (chosen first) of the named prompt-grouped partitions, in file order.

    With `pro_rewards_dir`, rows of raw TEST files get the stored rewards of the PRO-format row with the same
    subset and line number (the PRO files were made from the test files; train rows are never matched).
    Returns the examples and counts: pairs, with_stored_rewards, stored_text_mismatch (stored row whose
    candidate texts differ from the raw ones, e.g. the PRO preprocessing dropped later paragraphs).
    """
    from clha.data.hh_raw import read_raw_dir
    from clha.data.splits import PARTITIONS, partition_pairs

    unknown = [p for p in partitions if p not in PARTITIONS]
    if unknown or not partitions:
        raise InputError(f"unknown partition(s) {unknown or list(partitions)}; known: {', '.join(PARTITIONS)}",
                         field="partitions")
    pairs, _ = read_raw_dir(raw_dir, subsets=_csv(cfg.subsets) or None, splits=_csv(cfg.raw_splits) or ("test",))
    parts = partition_pairs(pairs, partition_config(cfg))
    stored = None
    if pro_rewards_dir:
        from clha.data.precomputed import PrecomputedRewards

        stored = PrecomputedRewards(pro_rewards_dir)
    counts = {"pairs": 0, "with_stored_rewards": 0, "stored_text_mismatch": 0}
    examples: List[PreferenceExample] = []
    for name in partitions:
        for p in parts[name]:
            ex = PreferenceExample(prompt=list(p.prompt), responses=[p.chosen, p.rejected], subset=p.subset,
                                   key=f"{p.file}:{p.line_num}", line_num=p.line_num)
            if stored is not None and p.split == "test" and stored.has_subset(p.subset):
                row = stored.row(p.subset, p.line_num)
                if row is not None:
                    ex.stored_rewards = stored.lookup(p.subset, p.line_num)
                    counts["with_stored_rewards"] += 1
                    if row.get("suffix") != ex.responses:
                        counts["stored_text_mismatch"] += 1
            counts["pairs"] += 1
            examples.append(ex)
    return examples, counts


def shard_examples(examples: Sequence[PreferenceExample], shard: int, num_shards: int, seed: int
                   ) -> List[PreferenceExample]:
    """Prompt-grouped shard `shard` of `num_shards` (same grouping key as clha.data.splits, another salt)."""
    from clha.data.splits import group_unit, normalise_prompt

    salt = f"rm-shard-{seed}"
    return [ex for ex in examples
            if int(group_unit(normalise_prompt(ex.first_human_turn), salt) * num_shards) == shard]


def sample_examples(examples: Sequence[PreferenceExample], limit: Optional[int], seed: int
                    ) -> List[PreferenceExample]:
    """A seeded sample of at most `limit` examples, in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = sorted(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False).tolist())
    return [examples[i] for i in keep]


def load_training_examples(cfg: RewardTrainConfig) -> Tuple[List[PreferenceExample], Dict[str, Any]]:
    if cfg.train_file_path:
        examples, info = read_ranked_examples(cfg.train_file_path), {"source": cfg.train_file_path}
    else:
        examples, counts = read_raw_partitions(cfg.raw_data_dir, _csv(cfg.train_partitions), cfg,
                                               cfg.pro_rewards_dir if cfg.distill_weight > 0 else None)
        info = {"source": cfg.raw_data_dir, "partitions": cfg.train_partitions,
                **{f"partition_{k}": v for k, v in counts.items()}}
    if cfg.train_shard:
        k, total = parse_shard(cfg.train_shard)
        examples = shard_examples(examples, k, total, cfg.partition_seed)
        info["shard"] = cfg.train_shard
    usable = [ex for ex in examples if ex.has_pairs()]
    info["dropped_identical_candidates"] = len(examples) - len(usable)
    if cfg.distill_weight > 0 and cfg.pairwise_weight == 0:
        before = len(usable)
        usable = [ex for ex in usable if ex.stored_rewards is not None]
        info["dropped_without_stored_rewards"] = before - len(usable)
    usable = sample_examples(usable, cfg.max_train_examples, cfg.seed)
    if not usable:
        raise InputError("no usable training example (need >= 2 different candidates"
                         + (" and stored rewards" if cfg.pairwise_weight == 0 else "") + ")", field="train_file_path")
    info["examples"] = len(usable)
    info["per_subset"] = dict(sorted(_count_by(usable, lambda ex: ex.subset).items()))
    info["with_stored_rewards"] = sum(ex.stored_rewards is not None for ex in usable)
    return usable, info


def load_eval_examples(cfg: RewardTrainConfig) -> Tuple[List[PreferenceExample], Dict[str, Any]]:
    if cfg.eval_file:
        examples = read_ranked_examples(cfg.eval_file, "eval_file")
        if cfg.pro_rewards_dir:
            _attach_by_line(examples, cfg.pro_rewards_dir)
        info: Dict[str, Any] = {"source": cfg.eval_file}
    else:
        examples, counts = read_raw_partitions(cfg.raw_data_dir, _csv(cfg.eval_partitions), cfg,
                                               cfg.pro_rewards_dir)
        info = {"source": cfg.raw_data_dir, "partitions": cfg.eval_partitions,
                **{f"partition_{k}": v for k, v in counts.items()}}
    usable = [ex for ex in examples if ex.has_pairs()]
    info["dropped_identical_candidates"] = len(examples) - len(usable)
    usable = sample_examples(usable, cfg.max_eval_examples, seed=0)   # the same sample whatever the training seed
    if not usable:
        raise InputError("no usable held-out example", field="eval_file")
    info["examples"] = len(usable)
    info["per_subset"] = dict(sorted(_count_by(usable, lambda ex: ex.subset).items()))
    info["with_stored_rewards"] = sum(ex.stored_rewards is not None for ex in usable)
    return usable, info


def _attach_by_line(examples: List[PreferenceExample], pro_dir: str) -> None:
    """Ranked rows without their own rewards: take PRO-format rewards by subset + meta.line_num."""
    from clha.data.precomputed import PrecomputedRewards

    stored = PrecomputedRewards(pro_dir)
    for ex in examples:
        if ex.stored_rewards is None and ex.line_num is not None and ex.subset != "unknown" \
                and stored.has_subset(ex.subset) and stored.row(ex.subset, ex.line_num) is not None:
            ex.stored_rewards = stored.lookup(ex.subset, ex.line_num)


def _count_by(items: Iterable, key) -> Dict[str, int]:
    counts: Dict[str, int] = defaultdict(int)
    for item in items:
        counts[key(item)] += 1
    return dict(counts)

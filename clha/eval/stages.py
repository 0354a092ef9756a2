"""The three stages (generate -> reward -> score), each sharded over the processes of an accelerate launch
(`clha.eval.shards`), and `main`, the entry point of `eval_hh/evaluate.py`."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from clha.errors import InputError
from clha.eval.bleu import char_bleu, sigmoid, word_bleu
from clha.eval.config import EvalConfig, parse_config
from clha.eval.inputs import (Example, check_policy_path, check_reward_models, load_policy, load_subsets,
                              resolved_precision)
from clha.eval.report import build_report, render_markdown, write_outputs
from clha.eval.shards import (FORMAT_VERSION, ShardError, fingerprint, merge_shards, remove_other_world_sizes,
                              shard_is_current, shard_path, shard_share, write_shard)
from clha.loading import make_accelerator, resolve_dtype
from clha.threads import configure_threads

logger = logging.getLogger("clha.eval")

# Ranks wait for each other only at the end of the score stage; a long timeout costs nothing.
TIMEOUT_MINUTES = 180


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


def _pending(cfg: EvalConfig, stage: str, subset: str, n: int, fp: str, rank: int, world: int):
    """(share, shard path) if this rank still has work for (stage, subset), else None."""
    share = shard_share(n, rank, world)
    path = shard_path(cfg.out_dir, stage, subset, rank, world)
    if not cfg.force and shard_is_current(path, fp, share):
        logger.info("rank %d: %s %s: shard complete, skipped (%s)", rank, stage, subset, path.name)
        return None
    return share, path


def _start_stage(cfg: EvalConfig, acc, stage: str, subsets) -> None:
    """Drop the stage's shards written with another number of processes (main process), then wait for it."""
    if acc.is_main_process:
        for subset in subsets:
            remove_other_world_sizes(cfg.out_dir, stage, subset, acc.num_processes)
    acc.wait_for_everyone()


def run_generate(cfg: EvalConfig, acc) -> None:
    from clha.generation import generate_with_details

    subsets = load_subsets(cfg)
    check_reward_models(cfg)
    check_policy_path(cfg.model_path, cfg.gguf_file)
    rank, world = acc.process_index, acc.num_processes
    _start_stage(cfg, acc, "generate", subsets)
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
    _start_stage(cfg, acc, "reward", subsets)
    todo = []
    for subset, examples in subsets.items():
        gens = _merged_generations(cfg, subset, examples, acc.device)
        fp = reward_fingerprint(cfg, gens, examples, acc.device)
        pending = _pending(cfg, "reward", subset, len(examples), fp, rank, world)
        if pending:
            todo.append((subset, examples, gens, fp) + pending)
    if not todo:
        return
    from clha.rm.scoring import load_reward_model

    scorer = load_reward_model(cfg.eval_reward_model, device=acc.device, max_length=cfg.reward_max_length,
                               dtype=resolve_dtype(cfg.torch_dtype, acc.device))
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
    _start_stage(cfg, acc, "score", subsets)
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


# ---------------------------------------------------------------------------------------------------------- main
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
        acc = make_accelerator(timeout_minutes=TIMEOUT_MINUTES)
        if not acc.is_main_process:
            logging.getLogger().setLevel(logging.WARNING)
        {"generate": run_generate, "reward": run_reward, "score": run_score}[stage](cfg, acc)
    except (InputError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

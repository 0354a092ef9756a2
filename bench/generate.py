#!/usr/bin/env python
"""Evaluation throughput in one run: this project's generation and reward scoring vs the reference pipeline.

Generation, same model, same prompts, greedy, at most --max_new_tokens new tokens:
- reference (re-implemented from PRO/CLHA's eval_hh/infer_func_now.py): every prompt padded to the longest prompt
  of the whole set, fixed batches of 28 in input order, no length sorting, no early stop (each batch runs until all
  rows hit EOS or the token limit), responses found by removing the decoded prompt from the decoded text;
- this project (`clha.generation.generate_with_details`): prompts sorted by length and prefilled in groups of
  similar length; continuous batching (rows that produced EOS or "Human:"/"Assistant:" are replaced by the next
  prompts), a preallocated KV cache, responses sliced from ids.
Reported: wall time, prompts/s and useful new tokens/s (tokens of the final, cut responses, counted the same way for
both), how many token positions the model ran over, and how many responses are identical.

Reward scoring, same reward model and (prompt, reply) pairs (the chosen and rejected replies of the test files):
fixed batches in input order (the reference) vs `RewardScorer.score` (length-sorted batches). Reported: pairs/s.

`--dtype bfloat16` loads the causal LM in bf16 for both pipelines (default float32; the reward model stays in
float32). `--dtypes float32,bfloat16` (or `auto`: bfloat16 only where the CPU has bf16 instructions, what `make
bench` passes) times both pipelines in each dtype in this one run, then reports our bf16 pipeline against the
reference in float32 and against our float32 one, and how many of our bf16 responses equal our float32 ones.
`--compare_dtypes` measures instead what bf16 gives this project's generation on the CPU: the same model
loaded in float32 and in bfloat16, the same prompts, runs interleaved (fp32, bf16, fp32, bf16, ... --repeats times
each, default 2 in this mode); reported per dtype: new tokens/s by wall time and by this process's CPU time (the
median of the runs; CPU time is the fairer measure on a machine shared with other jobs), the bf16/fp32 ratio, how
many bf16 greedy responses equal the fp32 ones exactly, how many agree on their first --agree_tokens tokens (both
responses' first N tokens equal, shorter responses compared whole), the mean common token prefix, and (unless
--skip_reward) the mean reward of each set under the float32 reward model and the mean absolute per-prompt
difference.

    python bench/generate.py                         # tiny models built from a config (no downloads), 112 prompts
    python bench/generate.py --model DIR [--gguf_file F] --reward_model DIR --num_prompts 56 [--dtype bfloat16]
    python bench/generate.py --compare_dtypes --model DIR [--gguf_file F] --reward_model DIR --num_prompts 56
Results are printed and written to bench/results/generate.json (generate_dtypes.json with --compare_dtypes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from clha.data.format import render_prompt  # noqa: E402
from clha.data.tokenize import encode_prompt  # noqa: E402
from clha.generation import generate_with_details  # noqa: E402
from clha.threads import ENV_VAR as THREADS_ENV_VAR  # noqa: E402
from clha.threads import configure_threads  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "pro-format" / "hh_test"
SUBSET_FILES = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")


# ----------------------------------------------------------------------------------------------------- data
def load_pairs(data: Path, num: int):
    """(prompt turns, chosen, rejected) round-robin over the subset files of a PRO-format test folder, or over the
    raw HH-RLHF test files of a folder holding <subset>/test.jsonl(.gz)."""
    per_subset = []
    if any((data / f"{s}.json").is_file() for s in SUBSET_FILES):
        from clha.data.format import read_ranked

        for stem in SUBSET_FILES:
            if (data / f"{stem}.json").is_file():
                rows = read_ranked(data / f"{stem}.json", require_reward=False)[:num]
                per_subset.append([(r.prefix[0], r.suffix[0], r.suffix[-1]) for r in rows])
    else:
        from clha.data.hh_raw import RAW_SUBSETS, read_raw_file

        for subset in RAW_SUBSETS:
            for name in ("test.jsonl.gz", "test.jsonl"):
                if (data / subset / name).is_file():
                    rows = read_raw_file(data / subset / name, subset, "test")[:num]
                    per_subset.append([(p.prompt, p.chosen, p.rejected) for p in rows])
                    break
    if not per_subset:
        sys.exit(f"no HH-RLHF test files in {data} (PRO-format <subset>.json or raw <subset>/test.jsonl.gz)")
    pairs = []
    for k in range(num):
        for rows in per_subset:
            if k < len(rows) and len(pairs) < num:
                pairs.append(rows[k])
    return pairs


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_lm(args, dtype: torch.dtype):
    """(model, tokenizer): --model (optionally its --gguf_file) loaded in `dtype`, or the tiny Llama cast to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kw)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kw)
    else:
        from clha.testing.tiny import build_causal_lm, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_causal_lm(tokenizer, seed=0).to(dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_scorer(args):
    """The reward scorer (float32): --reward_model, or a tiny Llama classifier built from a config."""
    if args.reward_model:
        from clha.rm.scoring import load_reward_model

        return load_reward_model(args.reward_model, device="cpu", max_length=1024, dtype=torch.float32)
    from clha.rm.scoring import HFRewardScorer
    from clha.testing.tiny_reward import build_tiny_seqcls_reward_model

    rm, rm_tok = build_tiny_seqcls_reward_model(arch="llama", seed=1, max_positions=1024)
    return HFRewardScorer(rm, rm_tok, name="tiny-llama-rm", max_length=1024)


# ----------------------------------------------------------------------------------------------- pipelines
def reference_generate(model, tokenizer, prompt_texts, batch_size=28, max_new_tokens=128, block_size=512):
    """The reference's generate_pipeline: global padding, fixed batches in input order, prompt removed as text."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side, tok.truncation_side = "left", "left"
    budget = block_size - 128
    enc = tok(prompt_texts, max_length=budget, truncation=True, add_special_tokens=True)
    truncated = tok.batch_decode(enc["input_ids"], skip_special_tokens=True)
    enc = tok(truncated, max_length=budget, truncation=True, add_special_tokens=True, padding=True,
              return_tensors="pt")
    truncated = tok.batch_decode(enc["input_ids"], skip_special_tokens=True)
    texts = []
    with torch.no_grad():
        for start in range(0, len(prompt_texts), batch_size):
            out = model.generate(input_ids=enc["input_ids"][start:start + batch_size],
                                 attention_mask=enc["attention_mask"][start:start + batch_size],
                                 max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            texts += tok.batch_decode(out, skip_special_tokens=True)
    responses, not_found = [], 0
    for text, prompt in zip(texts, truncated):
        if prompt.rstrip() in text:             # the reference asserts this
            text = text.replace(prompt.rstrip(), "").strip()
        else:
            not_found += 1
        for stop in ("Human:", "human:", "Assistant:", "assistant:"):
            ix = text.find(stop)
            if ix >= 0:
                text = text[:ix].rstrip()
        responses.append(text)
    return responses, not_found


class PositionCounter:
    """Counts forward calls and the token positions they run over (batch x sequence length)."""

    def __init__(self, model):
        self.calls = self.positions = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is not None:
            self.calls += 1
            self.positions += int(ids.numel())

    def close(self):
        self.handle.remove()


def timed(fn, model, repeats):
    best, result, counts = None, None, None
    for _ in range(repeats):
        counter = PositionCounter(model)
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        counter.close()
        if best is None or elapsed < best:
            best, counts = elapsed, (counter.calls, counter.positions)
    return best, result, counts


def bench_generation(model, tokenizer, pairs, args):
    prompts = [p for p, _, _ in pairs]
    texts = [render_prompt(p) for p in prompts]
    # Warm-up (allocator, kernels), not timed.
    generate_with_details(model, tokenizer, prompts[:2], block_size=args.block_size, max_new_tokens=4)
    ref_s, (ref_out, not_found), ref_counts = timed(
        lambda: reference_generate(model, tokenizer, texts, args.ref_batch_size, args.max_new_tokens,
                                   args.block_size), model, args.repeats)
    our_s, our_gens, our_counts = timed(
        lambda: generate_with_details(model, tokenizer, prompts, block_size=args.block_size,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                      progress=False), model, args.repeats)
    ours = [g.response for g in our_gens]

    def useful_tokens(responses):
        return sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)

    prompt_lens = [len(encode_prompt(tokenizer, t, args.block_size)) for t in texts]
    stops = {k: sum(g.stop == k for g in our_gens) for k in ("eos", "stop_string", "length")}
    result = {
        "prompts": len(prompts), "prompt_tokens_min_mean_max": [min(prompt_lens), sum(prompt_lens) / len(prompt_lens),
                                                                 max(prompt_lens)],
        "reference": {"seconds": ref_s, "prompts_per_s": len(prompts) / ref_s,
                      "new_tokens": useful_tokens(ref_out), "new_tokens_per_s": useful_tokens(ref_out) / ref_s,
                      "forward_calls": ref_counts[0], "positions": ref_counts[1], "batch_size": args.ref_batch_size,
                      "prompt_not_found_in_text": not_found},
        "ours": {"seconds": our_s, "prompts_per_s": len(prompts) / our_s,
                 "new_tokens": useful_tokens(ours), "new_tokens_per_s": useful_tokens(ours) / our_s,
                 "forward_calls": our_counts[0], "positions": our_counts[1], "batch_size": args.batch_size,
                 "stops": stops},
        "identical_responses": sum(a == b for a, b in zip(ref_out, ours)),
    }
    result["ours"]["responses"] = ours
    result["speedup"] = ref_s / our_s
    result["new_tokens_speedup"] = result["ours"]["new_tokens_per_s"] / result["reference"]["new_tokens_per_s"]
    return result


def bench_reward(scorer, pairs, args):
    prompts = [p for p, _, _ in pairs for _ in (0, 1)]
    replies = [r for _, c, rj in pairs for r in (c, rj)]
    bs = args.reward_batch_size
    scorer.score(prompts[:2], replies[:2], batch_size=2, progress=False)      # warm-up

    def unsorted():
        out = []
        for start in range(0, len(prompts), bs):   # one call per input-order chunk: padded to the chunk's longest
            out += scorer.score(prompts[start:start + bs], replies[start:start + bs], batch_size=bs, progress=False)
        return out

    model = scorer.model
    ref_s, ref_scores, ref_counts = timed(unsorted, model, args.repeats)
    our_s, our_scores, our_counts = timed(lambda: scorer.score(prompts, replies, batch_size=bs, progress=False),
                                          model, args.repeats)
    max_diff = max(abs(a - b) for a, b in zip(ref_scores, our_scores))
    return {"pairs": len(prompts), "batch_size": bs,
            "reference": {"seconds": ref_s, "pairs_per_s": len(prompts) / ref_s, "positions": ref_counts[1]},
            "ours": {"seconds": our_s, "pairs_per_s": len(prompts) / our_s, "positions": our_counts[1]},
            "speedup": ref_s / our_s, "max_score_difference": max_diff}


# ------------------------------------------------------------------------------------------ fp32 vs bf16
def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_dtypes(args, pairs, scorer):
    """This project's generation in float32 and in bfloat16 on the same prompts (see the module docstring)."""
    prompts = [p for p, _, _ in pairs]
    models = {}
    for name in DTYPES:
        models[name], tokenizer = load_lm(args, DTYPES[name])
        # Warm-up (allocator, kernels of this dtype), not timed.
        generate_with_details(models[name], tokenizer, prompts[:2], block_size=args.block_size, max_new_tokens=4)
    runs = {name: [] for name in DTYPES}
    responses = {}
    for _ in range(args.repeats):
        for name, model in models.items():                  # interleaved: load changes hit both dtypes alike
            wall, cpu = time.perf_counter(), time.process_time()
            gens = generate_with_details(model, tokenizer, prompts, block_size=args.block_size,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                         progress=False)
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            texts = [g.response for g in gens]
            if name in responses and responses[name] != texts:
                print(f"warning: {name} responses differ between runs", file=sys.stderr)
            responses[name] = texts

    def token_ids(texts):
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    ids = {name: token_ids(responses[name]) for name in DTYPES}
    result = {"prompts": len(prompts), "batch_size": args.batch_size, "runs_per_dtype": args.repeats}
    for name in DTYPES:
        new_tokens = sum(len(x) for x in ids[name])
        wall_s = statistics.median(w for w, _ in runs[name])
        cpu_s = statistics.median(c for _, c in runs[name])
        result[name] = {"new_tokens": new_tokens, "wall_seconds": wall_s, "cpu_seconds": cpu_s,
                        "runs_wall_cpu_seconds": runs[name],
                        "new_tokens_per_wall_s": new_tokens / wall_s, "new_tokens_per_cpu_s": new_tokens / cpu_s}
    fp, bf = result["float32"], result["bfloat16"]
    result["ratio_bf16_over_fp32"] = {"wall": bf["new_tokens_per_wall_s"] / fp["new_tokens_per_wall_s"],
                                      "cpu": bf["new_tokens_per_cpu_s"] / fp["new_tokens_per_cpu_s"]}
    n, k = len(prompts), args.agree_tokens
    prefixes = [common_prefix(a, b) for a, b in zip(ids["float32"], ids["bfloat16"])]
    result["agreement"] = {
        "identical_responses": sum(a == b for a, b in zip(responses["float32"], responses["bfloat16"])),
        f"same_first_{k}_tokens": sum(a[:k] == b[:k] for a, b in zip(ids["float32"], ids["bfloat16"])),
        "mean_common_prefix_tokens": sum(prefixes) / n,
        "mean_response_tokens_fp32": fp["new_tokens"] / n}
    if scorer is not None:
        start = time.perf_counter()
        scores = {name: scorer.score(prompts, responses[name], batch_size=args.reward_batch_size, progress=False)
                  for name in DTYPES}
        diffs = [abs(a - b) for a, b in zip(scores["float32"], scores["bfloat16"])]
        result["reward"] = {"model": scorer.name, "seconds": time.perf_counter() - start,
                            "mean_float32": statistics.fmean(scores["float32"]),
                            "mean_bfloat16": statistics.fmean(scores["bfloat16"]),
                            "mean_abs_difference": statistics.fmean(diffs),
                            "mean_abs_difference_where_responses_differ":
                                statistics.fmean([d for d, a, b in zip(diffs, responses["float32"],
                                                                       responses["bfloat16"]) if a != b] or [0.0])}
    return result


def print_dtype_comparison(c, args):
    n, k = c["prompts"], args.agree_tokens
    print(f"fp32 vs bf16, this project's generation: {n} prompts, batch {c['batch_size']}, max {args.max_new_tokens} "
          f"new tokens, median of {c['runs_per_dtype']} interleaved runs each")
    print("| dtype | new tokens | wall s | new tokens/s (wall) | CPU s | new tokens/s (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in DTYPES:
        r = c[name]
        print(f"| {name} | {r['new_tokens']} | {r['wall_seconds']:.1f} | {r['new_tokens_per_wall_s']:.1f} | "
              f"{r['cpu_seconds']:.1f} | {r['new_tokens_per_cpu_s']:.1f} |")
    a = c["agreement"]
    print(f"bf16/fp32 new tokens/s: {c['ratio_bf16_over_fp32']['wall']:.2f}x (wall), "
          f"{c['ratio_bf16_over_fp32']['cpu']:.2f}x (CPU time)")
    print(f"agreement: identical responses {a['identical_responses']}/{n}; same first {k} tokens "
          f"{a[f'same_first_{k}_tokens']}/{n}; mean common prefix {a['mean_common_prefix_tokens']:.1f} tokens "
          f"(mean fp32 response {a['mean_response_tokens_fp32']:.1f} tokens)")
    if "reward" in c:
        r = c["reward"]
        print(f"reward ({r['model']}, float32): mean {r['mean_float32']:.4f} (fp32 responses) vs "
              f"{r['mean_bfloat16']:.4f} (bf16 responses); mean |difference| per prompt "
              f"{r['mean_abs_difference']:.4f} ({r['mean_abs_difference_where_responses_differ']:.4f} where the "
              f"responses differ); scoring took {r['seconds']:.1f} s")


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="causal LM folder or hub id (default: tiny Llama from a config)")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model")
    p.add_argument("--reward_model", default=None, help="reward model folder (default: tiny Llama classifier)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="PRO-format hh_test folder or raw hh-rlhf folder")
    p.add_argument("--num_prompts", type=int, default=112)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=28, help="this project's generation batch size")
    p.add_argument("--ref_batch_size", type=int, default=28, help="the reference's fixed batch (28)")
    p.add_argument("--reward_batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None,
                   help="time each side this many times, keep the fastest (default 1); with --compare_dtypes: runs "
                        "per dtype, interleaved, the median is reported (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default: {THREADS_ENV_VAR} when set, else torch's choice)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the causal LM for both pipelines (default float32; the reward model stays float32)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of causal-LM dtypes, each timed for both pipelines in this run (e.g. "
                        "float32,bfloat16), or 'auto': float32, plus bfloat16 where the CPU has bf16 instructions; "
                        "replaces --dtype")
    p.add_argument("--compare_dtypes", action="store_true",
                   help="instead: this project's generation in float32 vs bfloat16 (speed, agreement, reward)")
    p.add_argument("--agree_tokens", type=int, default=32,
                   help="--compare_dtypes: count responses whose first N tokens agree (default 32)")
    p.add_argument("--skip_reward", action="store_true")
    p.add_argument("--out", default=None,
                   help="result JSON (default bench/results/generate.json, generate_dtypes.json with --compare_dtypes)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.compare_dtypes else 1
    if args.repeats < 1 or args.agree_tokens < 1 or args.num_prompts < 1:
        p.error("--repeats, --agree_tokens and --num_prompts must be >= 1")
    if args.compare_dtypes and (args.dtype or args.dtypes):
        p.error("--compare_dtypes runs both dtypes; do not pass --dtype or --dtypes with it")
    if args.dtype and args.dtypes:
        p.error("give --dtype or --dtypes, not both (with make bench: BENCH_GEN_DTYPES=bfloat16)")
    try:
        args.dtype_list = parse_dtypes(args.dtypes) if args.dtypes else [args.dtype or "float32"]
    except ValueError as exc:
        p.error(str(exc))
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / ("generate_dtypes.json" if args.compare_dtypes
                                                     else "generate.json"))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.environ.get(THREADS_ENV_VAR):
        configure_threads()
    torch.manual_seed(0)

    pairs = load_pairs(Path(args.data), args.num_prompts)
    if args.compare_dtypes:
        scorer = None if args.skip_reward else load_scorer(args)
        report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                  "model": args.model or "tiny Llama (clha.testing.tiny, random init)", "gguf_file": args.gguf_file,
                  "reward_model": scorer.name if scorer else None, "data": args.data,
                  "max_new_tokens": args.max_new_tokens, "dtypes": list(DTYPES)}
        report["dtype_comparison"] = c = compare_dtypes(args, pairs, scorer)
        print_dtype_comparison(c, args)
        return write_report(report, args.out)
    scorer = load_scorer(args)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                         f"bf16 instructions: {cpu_has_bf16()}",
              "model": args.model or "tiny Llama (clha.testing.tiny, random init)", "gguf_file": args.gguf_file,
              "dtype": args.dtype_list[0], "dtypes": args.dtype_list, "reward_model": scorer.name, "data": args.data,
              "max_new_tokens": args.max_new_tokens}
    by_dtype = {}
    for name in args.dtype_list:
        model, tokenizer = load_lm(args, DTYPES[name])
        by_dtype[name] = bench_generation(model, tokenizer, pairs, args)
        del model
    report["generation"] = g = by_dtype[args.dtype_list[0]]
    if len(by_dtype) > 1:
        report["generation_by_dtype"] = by_dtype
        report["dtype_ratios"] = dtype_ratios(by_dtype)
    print(f"generation: {g['prompts']} prompts (prompt tokens min/mean/max "
          f"{g['prompt_tokens_min_mean_max'][0]}/{g['prompt_tokens_min_mean_max'][1]:.0f}/"
          f"{g['prompt_tokens_min_mean_max'][2]}), max {args.max_new_tokens} new tokens, {report['model']}")
    print("| dtype | pipeline | batch | seconds | prompts/s | new tokens/s | forward calls | positions run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, gd in by_dtype.items():
        for side in ("reference", "ours"):
            r = gd[side]
            print(f"| {name} | {side} | {r['batch_size']} | {r['seconds']:.2f} | {r['prompts_per_s']:.2f} | "
                  f"{r['new_tokens_per_s']:.1f} | {r['forward_calls']} | {r['positions']} |")
    for name, gd in by_dtype.items():
        print(f"{name}: speedup {gd['speedup']:.2f}x (new tokens/s {gd['new_tokens_speedup']:.2f}x); identical "
              f"responses {gd['identical_responses']}/{gd['prompts']}; our stops {gd['ours']['stops']}")
    if "dtype_ratios" in report:
        d = report["dtype_ratios"]
        print(f"ours in {d['fast']} vs the reference in {d['base']}: {d['ours_vs_reference_new_tokens']:.2f}x new "
              f"tokens/s; ours {d['fast']} vs ours {d['base']}: {d['ours_vs_ours_new_tokens']:.2f}x; our {d['fast']} "
              f"responses equal to our {d['base']} ones: {d['ours_identical']}/{g['prompts']}")
    if not args.skip_reward:
        report["reward"] = r = bench_reward(scorer, pairs, args)
        print(f"\nreward scoring: {r['pairs']} pairs, batch {r['batch_size']}, {scorer.name}")
        print(f"| batches | seconds | pairs/s |\n|---|---:|---:|\n"
              f"| input order (reference) | {r['reference']['seconds']:.2f} | {r['reference']['pairs_per_s']:.1f} |\n"
              f"| length-sorted (ours) | {r['ours']['seconds']:.2f} | {r['ours']['pairs_per_s']:.1f} |")
        print(f"speedup {r['speedup']:.2f}x; max score difference {r['max_score_difference']:.2e}")
    return write_report(report, args.out)


def cpu_has_bf16() -> bool:
    """Whether this CPU lists bf16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo; False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtypes(text: str):
    """--dtypes: 'auto' (float32, plus bfloat16 where the CPU has bf16 instructions) or a comma list of dtypes."""
    if text == "auto":
        return ["float32"] + (["bfloat16"] if cpu_has_bf16() else [])
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"--dtypes {text!r}: give 'auto' or distinct names from {', '.join(sorted(DTYPES))}")
    return names


def dtype_ratios(by_dtype):
    """With float32 and bfloat16 timed in one run: our bf16 pipeline against the reference in float32 and against
    our float32 one (new tokens/s), and how many of our bf16 responses equal our float32 ones."""
    base, fast = "float32", "bfloat16"                # the only two DTYPES: both are here when this is called
    b, f = by_dtype[base], by_dtype[fast]
    return {"base": base, "fast": fast,
            "ours_vs_reference_new_tokens": f["ours"]["new_tokens_per_s"] / b["reference"]["new_tokens_per_s"],
            "ours_vs_ours_new_tokens": f["ours"]["new_tokens_per_s"] / b["ours"]["new_tokens_per_s"],
            "ours_identical": sum(x == y for x, y in zip(b["ours"]["responses"], f["ours"]["responses"]))}


def write_report(report, path) -> int:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

    python bench/generate.py                         # tiny models built from a config (no downloads), 112 prompts
    python bench/generate.py --model DIR [--gguf_file F] --reward_model DIR --num_prompts 56
Results are printed and written to bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from clha.data.format import render_prompt  # noqa: E402
from clha.data.tokenize import encode_prompt  # noqa: E402
from clha.generation import generate_with_details  # noqa: E402

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


def load_models(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kw)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kw)
    else:
        from clha.testing.tiny import build_causal_lm, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_causal_lm(tokenizer, seed=0)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if args.reward_model:
        from clha.rm.scoring import load_reward_model

        scorer = load_reward_model(args.reward_model, device="cpu", max_length=1024)
    else:
        from clha.rm.scoring import HFRewardScorer
        from clha.testing.tiny_reward import build_tiny_seqcls_reward_model

        rm, rm_tok = build_tiny_seqcls_reward_model(arch="llama", seed=1, max_positions=1024)
        scorer = HFRewardScorer(rm, rm_tok, name="tiny-llama-rm", max_length=1024)
    return model, tokenizer, scorer


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
    result["speedup"] = ref_s / our_s
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
    p.add_argument("--repeats", type=int, default=1, help="time each side this many times, keep the fastest")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip_reward", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "generate.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pairs = load_pairs(Path(args.data), args.num_prompts)
    model, tokenizer, scorer = load_models(args)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "model": args.model or "tiny Llama (clha.testing.tiny, random init)", "gguf_file": args.gguf_file,
              "reward_model": scorer.name, "data": args.data, "max_new_tokens": args.max_new_tokens}
    report["generation"] = g = bench_generation(model, tokenizer, pairs, args)
    print(f"generation: {g['prompts']} prompts (prompt tokens min/mean/max "
          f"{g['prompt_tokens_min_mean_max'][0]}/{g['prompt_tokens_min_mean_max'][1]:.0f}/"
          f"{g['prompt_tokens_min_mean_max'][2]}), max {args.max_new_tokens} new tokens, {report['model']}")
    print("| pipeline | batch | seconds | prompts/s | new tokens/s | forward calls | positions run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("reference", "ours"):
        r = g[name]
        print(f"| {name} | {r['batch_size']} | {r['seconds']:.2f} | {r['prompts_per_s']:.2f} | "
              f"{r['new_tokens_per_s']:.1f} | {r['forward_calls']} | {r['positions']} |")
    print(f"speedup {g['speedup']:.2f}x; identical responses {g['identical_responses']}/{g['prompts']}; "
          f"our stops {g['ours']['stops']}")
    if not args.skip_reward:
        report["reward"] = r = bench_reward(scorer, pairs, args)
        print(f"\nreward scoring: {r['pairs']} pairs, batch {r['batch_size']}, {scorer.name}")
        print(f"| batches | seconds | pairs/s |\n|---|---:|---:|\n"
              f"| input order (reference) | {r['reference']['seconds']:.2f} | {r['reference']['pairs_per_s']:.1f} |\n"
              f"| length-sorted (ours) | {r['ours']['seconds']:.2f} | {r['ours']['pairs_per_s']:.1f} |")
        print(f"speedup {r['speedup']:.2f}x; max score difference {r['max_score_difference']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

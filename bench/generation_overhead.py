#!/usr/bin/env python
"""Per-step host overhead of `clha.generation`'s engines against plain `model.generate`, on a CPU proxy.

With a small model a decode step is bound by what the host does per step (Python, kernel launches, device syncs),
not by FLOPs: on one H200, Llama-135M in bf16 at batch 32 (bench/gpu_check.py's generation section) ran plain
`model.generate` about 3x faster than either engine. A tiny Llama on the CPU (hidden 64, 2 layers) has a forward
that costs little, so the host work of the generation loop shows. In one process, on the same model and prompts,
this times:
- plain `model.generate`: fixed batches in input order, greedy, no stopping criteria (bench/gpu_check.py's baseline);
- `clha.generation.generate_with_details(engine="hf")`: `model.generate` plus the stop-string criterion;
- `clha.generation.generate_with_details(engine="fast")`: the continuous-batching loop of `clha.fast_engine`;
- with `--baseline REV`, also both engines as `clha/generation.py` and `clha/fast_engine.py` were at git revision
  REV (loaded from `git show`, the rest of the package as it is now), for a before / after in the same process.
The setup is bench/gpu_check.py's generation section: its tokenizer, HH-style filler prompts (64 prompts of 32-256
word tokens), greedy decoding, EOS disabled so that every row runs to the token limit; the weights are redrawn
with a larger spread (`--weight_std`) so that the tiny model writes varied tokens instead of one token repeated.
Each variant runs once to warm up, then `--repeats` times in rotation (so background load hits all alike); the
median of each is reported: new tokens/s and milliseconds per decode step (decode forwards counted by a hook), by
wall clock and by process CPU time (`time.process_time`, less disturbed by other processes on a loaded machine);
the CPU time per decode step spent outside the model's forward (every forward timed by hooks: what the generation
loop itself costs); the ratios to plain generate. Every variant's responses are compared with the hf engine's
(they must be identical; the exit status is 1 otherwise).

    python bench/generation_overhead.py                                  # batch 32, 2 layers, hidden 64, 128 tokens
    python bench/generation_overhead.py --baseline HEAD --layers 4 --hidden 128
Results are printed and written to bench/results/generation_overhead.json (`--out`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import gpu_check  # noqa: E402  (the generation section's tokenizer proxy, prompt text and model builder)
from clha.data.format import ASSISTANT, PROMPTER, render_prompt  # noqa: E402
from clha.data.tokenize import encode_prompt  # noqa: E402
from clha.generation import cut_response  # noqa: E402
from clha.testing.tiny import build_tokenizer  # noqa: E402
from clha.threads import configure_threads  # noqa: E402

BLOCK_SIZE = 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="generation batch size (default 32)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64; heads = hidden // 16)")
    p.add_argument("--new_tokens", type=int, default=128, help="max new tokens per prompt (default 128)")
    p.add_argument("--prompts", type=int, default=64, help="number of prompts (default 64)")
    p.add_argument("--prompt_words", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"),
                   help="prompt length range in word tokens (default 32 256, as bench/gpu_check.py)")
    p.add_argument("--weight_std", type=float, default=0.15,
                   help="redraw every weight matrix with this std (seeded), so that greedy outputs vary from token to "
                        "token (bench/gpu_check.py's initialisation makes a tiny model repeat one token, here ':', "
                        "which every stop-string check must decode); 0 keeps that initialisation (default 0.15)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the median is reported")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also time the engines of clha/generation.py + clha/fast_engine.py at git revision REV")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "generation_overhead.json"))
    args = p.parse_args(argv)
    for name in ("batch", "layers", "hidden", "new_tokens", "prompts", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.weight_std < 0:
        p.error(f"--weight_std must be >= 0, got {args.weight_std}")
    if args.hidden % 16:
        p.error(f"--hidden must be a multiple of 16 (heads of size 16), got {args.hidden}")
    if not 1 <= args.prompt_words[0] <= args.prompt_words[1]:
        p.error(f"--prompt_words needs 1 <= MIN <= MAX, got {args.prompt_words}")
    return args


def load_baseline(rev: str):
    """`clha/generation.py` as at git revision `rev`, importing `clha/fast_engine.py` of the same revision (loaded
    as the module `clha_baseline.generation`; everything else comes from the package as it is now)."""
    tmp = Path(tempfile.mkdtemp(prefix="clha_baseline_"))
    pkg = tmp / "clha_baseline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("fast_engine", "generation"):
        try:
            text = subprocess.run(["git", "show", f"{rev}:clha/{name}.py"], cwd=REPO, check=True, text=True,
                                  capture_output=True).stdout
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"error: --baseline {rev}: git show {rev}:clha/{name}.py failed: {e.stderr.strip()}")
        text = text.replace("from clha.fast_engine import", "from clha_baseline.fast_engine import")
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.find_spec("clha_baseline.generation")
    module = importlib.util.module_from_spec(spec)
    sys.modules["clha_baseline.generation"] = module
    spec.loader.exec_module(module)
    return module


class StepCounter:
    """Counts the model's one-token (decode) forwards and the process CPU time spent inside all its forwards."""

    def __init__(self, model):
        self.steps, self.forward_cpu, self._start = 0, 0.0, 0.0
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]

    def reset(self):
        self.steps, self.forward_cpu = 0, 0.0

    def _before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            self.steps += 1
        self._start = time.process_time()

    def _after(self, module, args, output):
        self.forward_cpu += time.process_time() - self._start

    def remove(self):
        for handle in self.handles:
            handle.remove()


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = configure_threads()
    tok = build_tokenizer()
    shape = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 16, num_key_value_heads=args.hidden // 16,
                 vocab_size=len(tok), max_position_embeddings=BLOCK_SIZE + args.new_tokens + 8)
    model = gpu_check.build_llama(shape, tok, "cpu").eval()
    if args.weight_std > 0:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.copy_(torch.randn(param.shape, generator=gen) * args.weight_std)
    model.config.eos_token_id = None                # EOS disabled: every row runs to the token limit
    model.generation_config.eos_token_id = None
    gen_tok = gpu_check.NoEosTokenizer(tok)
    costs = {x: len(tok(" " + x, add_special_tokens=False)["input_ids"]) for x in gpu_check.WORDS}
    rng = random.Random(7)
    prompts = [[PROMPTER + gpu_check.word_text(rng, rng.randint(*args.prompt_words), costs), ASSISTANT]
               for _ in range(args.prompts)]
    encoded = [encode_prompt(tok, render_prompt(p), BLOCK_SIZE) for p in prompts]
    lengths = [len(e) for e in encoded]
    counter = StepCounter(model)

    def engine_fn(module, engine):
        def run(ps, new):
            gens = module.generate_with_details(model, gen_tok, ps, block_size=BLOCK_SIZE, max_new_tokens=new,
                                                batch_size=args.batch, progress=False, engine=engine)
            produced = sum(new if g.stop == "length" else len(tok(" " + g.response, add_special_tokens=False)
                                                              ["input_ids"]) for g in gens)
            return produced, [g.response for g in gens], [g.stop for g in gens]
        return run

    def plain(ps, new):
        rows = [encode_prompt(tok, render_prompt(p), BLOCK_SIZE) for p in ps]
        produced, responses = 0, []
        with torch.inference_mode():
            for i in range(0, len(rows), args.batch):
                ids, mask = gpu_check.left_pad(rows[i:i + args.batch], tok.pad_token_id)
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                     pad_token_id=tok.pad_token_id)
                produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
                responses += [cut_response(tok.decode(r, skip_special_tokens=True))
                              for r in out[:, ids.shape[1]:].tolist()]
        return produced, responses, None

    import clha.generation as current
    variants = {"plain model.generate": plain}
    if args.baseline:
        base = load_baseline(args.baseline)
        variants[f"hf engine @ {args.baseline}"] = engine_fn(base, "hf")
        variants[f"fast engine @ {args.baseline}"] = engine_fn(base, "fast")
    variants["hf engine"] = engine_fn(current, "hf")
    variants["fast engine"] = engine_fn(current, "fast")

    runs = {name: [] for name in variants}
    outputs = {}
    for name, fn in variants.items():               # warm-up: two prompts, four tokens
        fn(prompts[:2], 4)
    for rep in range(args.repeats):
        for name, fn in variants.items():
            counter.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            produced, responses, stops = fn(prompts, args.new_tokens)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[name].append(dict(wall_s=wall, cpu_s=cpu, forward_cpu_s=counter.forward_cpu, new_tokens=produced,
                                   decode_steps=counter.steps))
            outputs[name] = (responses, stops)
            print(f"  run {rep + 1}/{args.repeats} {name:<28} wall {wall:6.2f} s  cpu {cpu:6.2f} s  (in the "
                  f"model's forward {counter.forward_cpu:6.2f} s)  {counter.steps} steps", flush=True)
    counter.remove()

    # the engines must agree with each other (the current hf engine is the reference)
    reference = outputs["hf engine"]
    identical = {name: (out[0] == reference[0] and (out[1] is None or out[1] == reference[1]))
                 for name, out in outputs.items()}
    digest = {name: hashlib.sha256(json.dumps(out[0]).encode()).hexdigest()[:16] for name, out in outputs.items()}

    summary = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        outside = statistics.median(r["cpu_s"] - r["forward_cpu_s"] for r in rs)
        tokens, steps = rs[0]["new_tokens"], rs[0]["decode_steps"]
        summary[name] = dict(new_tokens=tokens, decode_steps=steps, wall_s=wall, cpu_s=cpu,
                             tokens_per_s_wall=tokens / wall, tokens_per_s_cpu=tokens / cpu,
                             ms_per_step_wall=1e3 * wall / max(steps, 1), ms_per_step_cpu=1e3 * cpu / max(steps, 1),
                             ms_per_step_outside_forward_cpu=1e3 * outside / max(steps, 1),
                             responses_identical_to_hf_engine=identical[name], responses_sha256=digest[name])
    plain_s = summary["plain model.generate"]
    for s in summary.values():
        s["vs_plain_tokens_per_s_wall"] = s["tokens_per_s_wall"] / plain_s["tokens_per_s_wall"]
        s["vs_plain_tokens_per_s_cpu"] = s["tokens_per_s_cpu"] / plain_s["tokens_per_s_cpu"]

    setup = dict(model=f"Llama hidden {args.hidden}, {args.layers} layers, {args.hidden // 16} heads, "
                       f"vocab {len(tok)}, float32, CPU", prompts=args.prompts,
                 prompt_tokens=[min(lengths), max(lengths)], weight_std=args.weight_std, new_tokens=args.new_tokens,
                 batch=args.batch, repeats=args.repeats, torch_threads=threads.threads,
                 baseline=args.baseline, torch=torch.__version__, python=platform.python_version(),
                 machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores")
    print(f"\n{setup['model']}; {args.prompts} prompts ({min(lengths)}-{max(lengths)} tokens), {args.new_tokens} new "
          f"tokens, batch {args.batch}, greedy, EOS disabled; {threads.threads} torch thread(s); median of "
          f"{args.repeats}")
    head = (f"| {'variant':<28} | tok/s cpu | tok/s wall | ms/step cpu | ms/step wall | outside forward "
            f"ms/step cpu | steps | vs plain (cpu) | vs plain (wall) | same output |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, s in summary.items():
        print(f"| {name:<28} | {s['tokens_per_s_cpu']:9,.0f} | {s['tokens_per_s_wall']:10,.0f} | "
              f"{s['ms_per_step_cpu']:11.2f} | {s['ms_per_step_wall']:12.2f} | "
              f"{s['ms_per_step_outside_forward_cpu']:27.2f} | {s['decode_steps']:5d} | "
              f"{s['vs_plain_tokens_per_s_cpu']:13.2f}x | {s['vs_plain_tokens_per_s_wall']:14.2f}x | "
              f"{'yes' if s['responses_identical_to_hf_engine'] else 'NO':<11} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(setup=setup, results=summary, runs=runs), indent=2) + "\n")
    tmp.replace(out)
    print(f"written: {out}")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

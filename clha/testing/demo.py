"""The built-in default job: a complete CLHA run on the CPU with nothing downloaded.

`make demo` (or `./train_hh.sh` with no arguments) runs it. Steps:
  1. generate a small preference task: questions about topics, answered either helpfully or rudely;
  2. build a byte-level BPE tokenizer, a tiny Llama policy and a tiny reward model from configs;
  3. train the reward model on (helpful > rude) pairs, then score and re-rank every training candidate
     with it (preprocessing step 2 in miniature), rewards stored as in the real data;
  4. SFT warm-up on a mix that is mostly rude, so the starting policy is poorly aligned;
  5. CLHA training with validation: greedy generation on held-out dev prompts, scored by the reward
     model, best_checkpoint kept;
  6. a closing summary: dev reward before and after, where the checkpoint and logs are, and a PNG of
     the loss and dev-reward curves.
The same trainer, losses and checkpoint format as a real run; only the data and the model sizes differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Dict, List, Tuple

from clha.data.format import ASSISTANT, PROMPTER, RankedExample, write_ranked

TOPICS = ["bread", "rain", "chess", "music", "trees", "the moon", "coffee", "rivers", "cats", "dogs", "tea",
          "bicycles", "history", "painting", "gardens", "the ocean", "mountains", "birds", "winter", "summer",
          "books", "soup", "trains", "stars", "math", "poetry", "bees", "apples", "clouds", "islands",
          "rockets", "owls", "cheese", "maps", "sailing", "violins", "deserts", "volcanoes", "kites", "honey"]
QUESTIONS = ["Can you tell me about {t}?", "What do you know about {t}?", "I want to learn about {t}.",
             "Please explain {t} to me.", "Do you like {t}?"]
HELPFUL = ["Sure! I am happy to help. {T} is a lovely topic, and there is a lot to learn about {t}.",
           "Of course. {T} is interesting, and I would be glad to tell you more about {t}."]
RUDE = ["No. Go away and ask someone else.", "I do not care about {t}. Stop asking me.",
        "That is a boring question. Leave me alone."]


def _prompt(question: str) -> List[str]:
    return [PROMPTER + question, ASSISTANT]


def make_task(seed: int) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(question, topic) pairs split into train and dev prompts (no prompt in both)."""
    rng = random.Random(seed)
    combos = [(q.format(t=t), t) for t in TOPICS for q in QUESTIONS]
    rng.shuffle(combos)
    n_dev = 40
    return combos[n_dev:], combos[:n_dev]


def _fill(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[0].upper() + topic[1:])


def corpus(train: List[Tuple[str, str]]) -> List[str]:
    texts = []
    for question, topic in train:
        for tpl in HELPFUL + RUDE:
            texts.append(f"\n\nHuman: {question}\n\nAssistant: {_fill(tpl, topic)}")
    return texts


def train_reward_model(scorer, pairs: List[Tuple[List[str], str, str]], steps: int, seed: int) -> None:
    """Fit the tiny reward model with the pairwise loss -log sigmoid(r_chosen - r_rejected)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = scorer.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(pairs, 16)
        prompts = [p for p, _, _ in batch] * 2
        responses = [c for _, c, _ in batch] + [r for _, _, r in batch]
        scores = scorer.forward_logits(prompts, responses)
        loss = -F.logsigmoid(scores[:16] - scores[16:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_data(out: Path, seed: int, log) -> Dict[str, str]:
    """Models, reward model and the three data files of the demo."""
    from clha.rm.scoring import load_reward_model
    from clha.testing.tiny import build_causal_lm, build_tokenizer
    from clha.testing.tiny_reward import save_tiny_seqcls_reward_model

    train, dev = make_task(seed)
    texts = corpus(train)
    tokenizer = build_tokenizer(texts, vocab_size=600)
    base = out / "base_model"
    model = build_causal_lm(tokenizer, seed=seed, hidden_size=96, layers=2, heads=4, max_positions=512)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    log(f"tiny policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters -> {base}")

    rm_dir = out / "reward_model"
    save_tiny_seqcls_reward_model(rm_dir, seed=seed, arch="llama")
    scorer = load_reward_model(str(rm_dir), device="cpu", max_length=128)
    pairs = []
    for question, topic in train:
        for good in HELPFUL:
            for bad in RUDE:
                pairs.append((_prompt(question), _fill(good, topic), _fill(bad, topic)))
    t0 = time.time()
    train_reward_model(scorer, pairs, steps=150, seed=seed)
    scorer.model.save_pretrained(rm_dir)
    log(f"reward model trained on {len(pairs)} pairs in {time.time() - t0:.0f}s -> {rm_dir}")

    rng = random.Random(seed)
    sft_rows, clha_rows = [], []
    for i, (question, topic) in enumerate(train):
        prompt = _prompt(question)
        # SFT warm-up: mostly rude, so the starting policy has room to improve.
        reply = _fill(rng.choice(HELPFUL if rng.random() < 0.3 else RUDE), topic)
        sft_rows.append(RankedExample([prompt], [reply], [0.0], 0, {"source": "demo", "line_num": i + 1}))
        for good in HELPFUL:
            bad1, bad2 = rng.sample(RUDE, 2)
            for cands in ((_fill(good, topic), _fill(bad1, topic)), (_fill(bad1, topic), _fill(bad2, topic))):
                clha_rows.append((prompt, list(cands), i + 1))
    # Step 2 in miniature: score every candidate with the reward model, re-rank best first.
    rewards = scorer.score([p for p, c, _ in clha_rows for _ in c], [x for _, c, _ in clha_rows for x in c])
    ranked = []
    for j, (prompt, cands, line) in enumerate(clha_rows):
        r = rewards[2 * j:2 * j + 2]
        order = sorted(range(2), key=lambda k: -r[k])
        ranked.append(RankedExample([prompt, prompt], [cands[k] for k in order], [r[k] for k in order], 0,
                                    {"source": "demo", "line_num": line}))
    dev_rows = [RankedExample([_prompt(q)] * 2, [_fill(HELPFUL[0], t), _fill(RUDE[0], t)], [0.0, 0.0], 0,
                              {"source": "demo", "line_num": i + 1}) for i, (q, t) in enumerate(dev)]
    paths = {"sft": out / "data" / "sft_train.json", "clha": out / "data" / "clha_train.json",
             "dev": out / "data" / "dev.json"}
    write_ranked(paths["sft"], sft_rows)
    write_ranked(paths["clha"], ranked)
    write_ranked(paths["dev"], dev_rows)
    gaps = [abs(e.reward[0] - e.reward[1]) for e in ranked]
    log(f"data: {len(sft_rows)} SFT rows, {len(ranked)} ranked pairs "
        f"(median reward gap {sorted(gaps)[len(gaps) // 2]:.2f}), {len(dev_rows)} dev prompts")
    return {k: str(v) for k, v in paths.items()} | {"base": str(base), "reward_model": str(rm_dir)}


def plot_curves(log_dir: Path, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line]
    val = [json.loads(line) for line in (log_dir / "validation.jsonl").read_text().splitlines() if line]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [m["step"] for m in metrics]
    ax1.plot(steps, [m["loss"] for m in metrics], label="total")
    ax1.plot(steps, [m["rank_loss"] for m in metrics], label="pairwise contrastive")
    ax1.plot(steps, [m["sft_loss"] for m in metrics], label="adaptive SFT (weighted)")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.set_title("CLHA training loss")
    ax1.legend()
    ax2.plot([v["step"] for v in val], [v["dev_reward"] for v in val], marker="o")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("mean sigmoid(reward)")
    ax2.set_title("dev reward (greedy generations)")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(out_dir: str = "demo_out", seed: int = 42, quick: bool = False) -> Dict:
    from clha.config import TrainConfig
    from clha.training.trainer import run_training

    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's matrices are tiny: one thread is as fast as two on an idle machine and an order of magnitude
        # faster on a busy one (no OpenMP threads spinning against other processes).
        torch.set_num_threads(1)
    out = Path(out_dir)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[demo {time.time() - start:5.0f}s] {msg}", flush=True)

    paths = build_data(out, seed, log)
    common = dict(block_size=256, per_device_train_batch_size=8, gradient_accumulation_steps=1, seed=seed,
                  model_name_or_path=None, do_train=True, lr_scheduler_type="constant", max_grad_norm=1.0,
                  save_epoch_checkpoints=False, per_device_eval_batch_size=40, max_new_tokens=40)
    sft = TrainConfig(**{**common, "model_name_or_path": paths["base"]}, loss_type="sft", training_stage_num=1,
                      train_file_path=paths["sft"], learning_rate=3e-3, num_train_epochs=100,
                      max_train_steps=40 if quick else 150, checkpointing_step=10_000,
                      output_dir=str(out / "checkpoints" / "sft"), log_path=str(out / "logs" / "sft"))
    log("SFT warm-up (mostly rude replies) ...")
    sft_summary = run_training(sft)
    sft_ckpt = Path(sft.output_dir) / f"step_{sft_summary['global_step']}"
    clha = TrainConfig(**{**common, "model_name_or_path": str(sft_ckpt)}, loss_type="clha", training_stage_num=2,
                       train_file_path=paths["clha"], validation_file_path=str(Path(paths["dev"]).parent),
                       validation_file_name=Path(paths["dev"]).name, do_validation=True,
                       # A strong imitation term (sft_weight 0.5, not 0.05): on this tiny policy the pairwise term
                       # alone mostly pushes the rude replies' tokens down, which wrecks its language (greedy replies
                       # shrink to fragments such as "course." + EOS). lr 1e-3 lets 30 steps reach a full reply.
                       reward_model=paths["reward_model"], learning_rate=1e-3, num_train_epochs=100,
                       max_train_steps=30 if quick else 100, checkpointing_step=10,
                       rank_margin=1.0, reward_gap_threshold=1.0, sft_weight=0.5,
                       output_dir=str(out / "checkpoints" / "clha"), log_path=str(out / "logs" / "clha"))
    log("CLHA training with validation ...")
    summary = run_training(clha)
    png = out / "logs" / "clha" / "curves.png"
    plot_curves(Path(clha.log_path), png)
    val = summary["validation"]
    before, after = val[0]["dev_reward"], summary["best_reward"]
    lines = [
        "",
        "CLHA demo finished in %.0f s" % (time.time() - start),
        f"  dev reward (mean sigmoid of the reward model) before CLHA: {before:.3f}",
        f"  dev reward after CLHA (best, step {summary['best_step']}):       {after:.3f}",
        f"  best checkpoint: {Path(clha.output_dir) / 'best_checkpoint'}",
        f"  logs:            {clha.log_path} (metrics.jsonl, validation.jsonl, tensorboard/)",
        f"  curves:          {png}",
        f"  dev generations: {clha.log_path}/dev_generations_step_{summary['best_step']}.jsonl",
    ]
    print("\n".join(lines), flush=True)
    result = {"before": before, "after": after, "best_step": summary["best_step"], "png": str(png),
              "seconds": time.time() - start}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the built-in CLHA demo on the CPU (no downloads).")
    parser.add_argument("--out_dir", default="demo_out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="fewer steps (used by the tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # accelerate warns that tied embeddings are stored once in the resumable state; that is expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    run(args.out_dir, args.seed, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

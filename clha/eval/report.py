"""The report of an evaluation: per subset and over all examples pooled, every number the mean of a column of
examples.jsonl (`METRICS`); written as report.json, report.md and reward_by_subset.png."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from clha.eval.config import EvalConfig
from clha.eval.inputs import RewardModels, resolved_precision
from clha.fileio import atomic_write, write_json, write_jsonl

logger = logging.getLogger("clha.eval")

# (key in report.json, column header, definition). Every value is the mean of that column of examples.jsonl.
METRICS: Tuple[Tuple[str, str, str], ...] = (
    ("reward", "Reward", "mean sigmoid(eval RM logit) x 100"),
    ("bleu", "BLEU", "nltk sentence_bleu defaults vs the human-chosen reply, over characters as the reference "
                     "code (comparable with the PRO/CLHA tables), x 100"),
    ("bleu_words", "BLEU (words)", "the same over word/punctuation tokens, x 100"),
    ("win", "Win vs chosen %", "the eval RM scores the response above the human-chosen reply (ties count half)"),
    ("chosen_reward", "Chosen reward", "Reward of the human-chosen reply itself, for reference"),
    ("response_words", "Words", "mean response length in whitespace-separated words"),
    ("at_limit", "At limit %", "responses that used all new tokens without EOS or a stop string"),
)


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    out: Dict[str, float] = {"n": len(rows)}
    for key, _, _ in METRICS:
        out[key] = math.fsum(r[key] for r in rows) / len(rows) if rows else float("nan")
    return out


def build_report(cfg: EvalConfig, models: RewardModels, rows: List[Dict[str, Any]], world: int,
                 device) -> Dict[str, Any]:
    """The report; `settings.dtype` / `settings.device` are what the stages ran in on `device` (never "auto")."""
    precision = resolved_precision(cfg, device)
    by_subset = {s: summarise([r for r in rows if r["subset"] == s]) for s in cfg.subsets}
    return {
        "name": cfg.run_name,
        "model_path": cfg.model_path,
        "eval_reward_model": models.eval,
        "train_reward_model": models.train,
        "train_reward_model_source": models.train_source,
        "same_reward_model": models.same,
        "settings": {"test_dir": cfg.test_dir, "subsets": list(cfg.subsets), "limit": cfg.limit,
                     "block_size": cfg.block_size, "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
                     "reward_max_length": cfg.reward_max_length, "dtype": precision["dtype"],
                     "dtype_requested": cfg.torch_dtype, "device": precision["device"], "num_processes": world,
                     "gguf_file": cfg.gguf_file},
        "subsets": by_subset,
        "overall": summarise(rows),
        "definitions": {key: text for key, _, text in METRICS},
        "overall_definition": "all examples pooled (sample-weighted), as the reference scripts",
    }


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def render_markdown(report: Dict[str, Any]) -> str:
    lines = [f"# HH-RLHF evaluation: {report['name']}", ""]
    s = report["settings"]
    train = report["train_reward_model"] or "unknown"
    lines += [f"- model: `{report['model_path']}`",
              f"- evaluation reward model: `{report['eval_reward_model']}`",
              f"- training reward model: `{train}` ({report['train_reward_model_source']})",
              f"- greedy decoding, at most {s['max_new_tokens']} new tokens, block size {s['block_size']}, "
              f"{s['num_processes']} process(es)" + (f", {s['dtype']} on {s['device']}" if "device" in s else "")
              + (f", first {s['limit']} examples per subset" if s["limit"] else ""),
              ""]
    if report["same_reward_model"]:
        lines += ["**Warning: the evaluation reward model is the training reward model "
                  "(--allow_same_reward_model); the rewards below are not an independent judgement.**", ""]
    header = ["subset", "n"] + [title for _, title, _ in METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, m in list(report["subsets"].items()) + [("**overall**", report["overall"])]:
        lines.append("| " + " | ".join([name, str(m["n"])] + [_fmt(m[k]) for k, _, _ in METRICS]) + " |")
    lines += [""] + [f"- {title}: {report['definitions'][key]}." for key, title, _ in METRICS]
    lines += [f"- overall: {report['overall_definition']}.", ""]
    return "\n".join(lines)


def plot_reward(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["subsets"]) + ["overall"]
    values = [report["subsets"][n]["reward"] for n in report["subsets"]] + [report["overall"]["reward"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, values, color=["#4C72B0"] * (len(names) - 1) + ["#DD8452"])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylabel("Reward (mean sigmoid x 100)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['name']}: reward by subset")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def write_outputs(out_dir: str | os.PathLike, report: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    out = Path(out_dir)
    write_jsonl(out / "examples.jsonl", rows)
    write_json(out / "report.json", report)
    with atomic_write(out / "report.md") as handle:
        handle.write(render_markdown(report))
    plot_reward(report, out / "reward_by_subset.png")
    logger.info("wrote %s/{report.md,report.json,examples.jsonl,reward_by_subset.png}", out)

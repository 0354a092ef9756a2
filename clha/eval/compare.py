"""Several evaluation runs side by side (`eval_hh/compare.py`): compare.md in the paper's layout ("BLEU / Reward" per
subset and overall) and compare.png."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from clha.errors import InputError
from clha.eval.report import _fmt
from clha.fileio import atomic_write

def load_report(run_dir: str | os.PathLike) -> Dict[str, Any]:
    path = Path(run_dir) / "report.json" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise InputError("no report.json: run the score stage first", path=path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON: {err.msg}", path=path, line=err.lineno) from None


def compare_markdown(reports: Sequence[Dict[str, Any]]) -> str:
    """The paper's layout: one row per run, "BLEU / Reward" per subset and overall; then win rates and lengths."""
    subsets = []
    for rep in reports:
        subsets += [s for s in rep["subsets"] if s not in subsets]
    header = ["run"] + subsets + ["overall"]

    def table(title: str, cell) -> List[str]:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for rep in reports:
            cells = [cell(rep["subsets"][s]) if s in rep["subsets"] else "-" for s in subsets]
            lines.append("| " + " | ".join([rep["name"]] + cells + [cell(rep["overall"])]) + " |")
        return lines + [""]

    out = ["# HH-RLHF evaluation: comparison", ""]
    out += table("BLEU / Reward", lambda m: f"{_fmt(m['bleu'])} / {_fmt(m['reward'])}")
    out += table("Win vs chosen % / mean words", lambda m: f"{_fmt(m['win'])} / {_fmt(m['response_words'])}")
    rms = {rep["eval_reward_model"] for rep in reports}
    if len(rms) > 1:
        out += [f"**Warning: the runs used different evaluation reward models ({', '.join(sorted(rms))}); their "
                "rewards are not comparable.**", ""]
    for rep in reports:
        if rep.get("same_reward_model"):
            out += [f"**Warning: {rep['name']} was judged by its own training reward model.**", ""]
    return "\n".join(out)


def plot_compare(reports: Sequence[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for rep in reports:
        groups += [s for s in rep["subsets"] if s not in groups]
    groups.append("overall")
    width = 0.8 / max(len(reports), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 3.8))
    for k, rep in enumerate(reports):
        values = [(rep["overall"] if g == "overall" else rep["subsets"].get(g, {})).get("reward", float("nan"))
                  for g in groups]
        xs = [i + (k - (len(reports) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=rep["name"])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("Reward (mean sigmoid x 100)")
    ax.set_title("Reward by subset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def compare_runs(run_dirs: Sequence[str], out_dir: str | os.PathLike) -> str:
    if not run_dirs:
        raise InputError("give at least one run folder (eval_hh/inference_res/<id>_<len>)")
    reports = [load_report(d) for d in run_dirs]
    names = [rep["name"] for rep in reports]
    for i, rep in enumerate(reports):   # make duplicate names distinguishable
        if names.count(rep["name"]) > 1:
            rep["name"] = f"{rep['name']} ({Path(run_dirs[i]).resolve().parent.name}/{Path(run_dirs[i]).name})"
    text = compare_markdown(reports)
    out = Path(out_dir)
    with atomic_write(out / "compare.md") as handle:
        handle.write(text)
    plot_compare(reports, out / "compare.png")
    return text


def compare_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Side-by-side table and chart of several evaluation runs.")
    p.add_argument("run_dirs", nargs="+", help="folders holding report.json (eval_hh/inference_res/<id>_<len>)")
    p.add_argument("--out_dir", default="eval_hh/inference_res/compare", help="where compare.md/.png go")
    args = p.parse_args(argv)
    try:
        print(compare_runs(args.run_dirs, args.out_dir))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"(written to {args.out_dir}/compare.md and compare.png)")
    return 0

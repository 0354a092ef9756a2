#!/usr/bin/env python
"""Draw the CLHA pipeline figure, resources/pipeline.png (boxes and arrows with matplotlib, nothing downloaded).

    python docs/make_pipeline_figure.py                 # writes resources/pipeline.png
    python docs/make_pipeline_figure.py --out fig.png   # elsewhere

Top row: the data (HH-RLHF -> preprocessing and reward-model ranking -> ranked lists). Middle row: one training
step (one packed forward pass -> the two loss terms -> the policy). Bottom row: evaluation (greedy generation ->
evaluation reward model and BLEU -> report). The words match docs/method.md; rerun after changing the method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "resources" / "pipeline.png"

# Colours by role: data, training, evaluation.
DATA, TRAIN, LOSS, EVAL = "#DCE9F5", "#FBE3C8", "#F6D2D2", "#DDEFD9"


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(13, 8))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 8)
    ax.axis("off")

    def box(x, y, w, h, title, body, colour):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=colour, edgecolor="#444444", linewidth=1.2))
        ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="top", fontsize=11.5, weight="bold")
        ax.text(x + w / 2, y + h - 0.55, body, ha="center", va="top", fontsize=9.5, linespacing=1.35)
        return (x, y, w, h)

    def side(bx, name):
        x, y, w, h = bx
        return {"right": (x + w, y + h / 2), "left": (x, y + h / 2), "top": (x + w / 2, y + h),
                "bottom": (x + w / 2, y)}[name]

    def arrow(p, q):
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=16, linewidth=1.5, color="#333333",
                                     shrinkA=1, shrinkB=1))

    def route(points):
        """A right-angled path through `points` (in the gaps between rows), with an arrow head at the end."""
        xs, ys = zip(*points[:-1])
        ax.plot(xs, ys, color="#333333", linewidth=1.5, solid_capstyle="round")
        arrow(points[-2], points[-1])

    ax.text(0.2, 7.85, "CLHA: contrastive learning for human alignment", fontsize=14, weight="bold", va="top")

    # --- data (top row) -------------------------------------------------------------------------------------
    raw = box(0.2, 5.6, 2.8, 1.6, "HH-RLHF", "raw dialogues, jsonl(.gz)\nchosen / rejected\nfour subsets", DATA)
    prep = box(3.6, 5.6, 4.0, 1.6, "Preprocessing + reward model",
               "split into turns, pair the candidates\n(step 1); score every candidate with\n"
               "the training reward model, re-rank\nbest first (step 2; test: step 3)", DATA)
    ranked = box(8.2, 5.6, 4.6, 1.6, "Ranked lists",
                 "prompt x, candidates y_1 > ... > y_n\nrewards r_1 ... r_n\n"
                 "(ranked JSONL: prefix, suffix,\nreward, sft_index, meta)", DATA)
    arrow(side(raw, "right"), side(prep, "left"))
    arrow(side(prep, "right"), side(ranked, "left"))

    # --- training (middle row) ------------------------------------------------------------------------------
    fwd = box(0.2, 3.0, 3.45, 1.9, "One packed forward pass",
              "each prompt once + its n responses\n(4D mask, position ids)\n"
              "s_k = mean log-prob of y_k\n(all B x n candidates)", TRAIN)
    pc = box(4.1, 3.9, 4.5, 1.1, "Rescored pairwise contrastive loss",
             "pairs with |r_k - r_l| > tau only\nmax(0, d*m - (s_k - s_{k+d}))", LOSS)
    sft = box(4.1, 2.65, 4.5, 1.1, "Reward-gated SFT",
              "imitate y_best only if r_best > 0\nweight sft_weight * (n-1)^2", LOSS)
    policy = box(9.2, 3.0, 3.6, 1.9, "Policy",
                 "L = L_pc + w * L_sft\naccelerate / DeepSpeed ZeRO-2\ncheckpoints, best_checkpoint", TRAIN)
    top_gap, bottom_gap = 5.3, 2.2
    rx, fx = side(ranked, "bottom")[0], side(fwd, "top")[0]
    route([(rx, 5.6), (rx, top_gap), (fx, top_gap), (fx, 4.9)])
    arrow(side(fwd, "right"), side(pc, "left"))
    arrow(side(fwd, "right"), side(sft, "left"))
    arrow(side(pc, "right"), side(policy, "left"))
    arrow(side(sft, "right"), side(policy, "left"))

    # --- evaluation (bottom row) ----------------------------------------------------------------------------
    gen = box(0.2, 0.3, 3.45, 1.5, "Generation", "greedy, at most 128 new tokens\non the four test subsets", EVAL)
    judge = box(4.1, 0.3, 4.5, 1.5, "Evaluation reward model + BLEU",
                "mean sigmoid(eval RM) x 100\n(a different RM than training)\nBLEU vs the human-chosen reply",
                EVAL)
    report = box(9.2, 0.3, 3.6, 1.5, "Report", "per subset and overall\nreport.md / report.json / plot", EVAL)
    px, gx = side(policy, "bottom")[0], side(gen, "top")[0]
    route([(px, 3.0), (px, bottom_gap), (gx, bottom_gap), (gx, 1.8)])
    arrow(side(gen, "right"), side(judge, "left"))
    arrow(side(judge, "right"), side(report, "left"))

    out.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" version string in the PNG: a rerun with the same matplotlib writes the same bytes.
    fig.savefig(out, dpi=110, bbox_inches="tight", pad_inches=0.15, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="PNG to write (default: resources/pipeline.png)")
    args = parser.parse_args(argv)
    draw(Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

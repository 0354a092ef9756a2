"""Reward-model metrics (plain Python / numpy): `pairwise_accuracy`, `spearman`, `evaluate_scores` (overall and per
subset, plus the stored rewards' own accuracy on the same rows), `ranking_agreement` (two reward models on the same
pairs)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from clha.rm.data import PreferenceExample

def pairwise_accuracy(scores: Sequence[float], responses: Optional[Sequence[str]] = None) -> Tuple[float, int]:
    """(correct, pairs) of one example whose candidates are in preference order.

    Every ordered pair (i < j) counts; a tie of scores counts one half; pairs of identical texts are skipped.
    """
    correct, pairs = 0.0, 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if responses is not None and responses[i] == responses[j]:
                continue
            pairs += 1
            if scores[i] > scores[j]:
                correct += 1.0
            elif scores[i] == scores[j]:
                correct += 0.5
    return correct, pairs


def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; ties get the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks); NaN when undefined."""
    if len(x) != len(y):
        raise ValueError(f"x ({len(x)}) and y ({len(y)}) must have the same length")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _accuracy_block(examples: Sequence[PreferenceExample], scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    correct = pairs = 0.0
    for ex, s in zip(examples, scores):
        c, p = pairwise_accuracy(s, ex.responses)
        correct += c
        pairs += p
    return {"accuracy": correct / pairs if pairs else float("nan"), "pairs": int(pairs)}


def _stored_block(examples: Sequence[PreferenceExample], scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    rows = [(ex, s) for ex, s in zip(examples, scores) if ex.stored_rewards is not None]
    if not rows:
        return {}
    flat_model = [v for _, s in rows for v in s]
    flat_stored = [v for ex, _ in rows for v in ex.stored_rewards]
    stored_acc = _accuracy_block([ex for ex, _ in rows], [ex.stored_rewards for ex, _ in rows])
    model_acc = _accuracy_block([ex for ex, _ in rows], [s for _, s in rows])
    return {"spearman_with_stored": spearman(flat_model, flat_stored),
            "stored_rows": len(rows),
            "accuracy_on_stored_rows": model_acc["accuracy"],
            "stored_reward_accuracy": stored_acc["accuracy"]}


def evaluate_scores(examples: Sequence[PreferenceExample], scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Pairwise accuracy against the preference order (overall and per subset) and, on rows with stored
    rewards, the Spearman correlation of the scores with them and the stored rewards' own accuracy."""
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} examples but {len(scores)} score lists")
    result: Dict[str, Any] = {**_accuracy_block(examples, scores), **_stored_block(examples, scores)}
    result["mean_score"] = float(np.mean([v for s in scores for v in s])) if scores else float("nan")
    by_subset: Dict[str, Any] = {}
    for subset in sorted({ex.subset for ex in examples}):
        idx = [i for i, ex in enumerate(examples) if ex.subset == subset]
        sub_ex, sub_scores = [examples[i] for i in idx], [scores[i] for i in idx]
        by_subset[subset] = {**_accuracy_block(sub_ex, sub_scores), **_stored_block(sub_ex, sub_scores)}
    result["per_subset"] = by_subset
    return result


def ranking_agreement(scores_a: Sequence[Sequence[float]], scores_b: Sequence[Sequence[float]],
                      examples: Optional[Sequence[PreferenceExample]] = None) -> Dict[str, float]:
    """How often two reward models order the candidate pairs the same way.

    `agreement`: fraction of ordered pairs on which sign(a_i - a_j) == sign(b_i - b_j) (a tie in exactly one model
    counts one half); `chance`: the agreement two independent models with these accuracies would have
    (acc_a * acc_b + (1 - acc_a)(1 - acc_b)), when `examples` give the preference order;
    `margin_spearman`: Spearman correlation of the two models' score differences.
    """
    agree = pairs = 0.0
    margins_a: List[float] = []
    margins_b: List[float] = []
    for k, (sa, sb) in enumerate(zip(scores_a, scores_b)):
        responses = examples[k].responses if examples is not None else None
        for i in range(len(sa)):
            for j in range(i + 1, len(sa)):
                if responses is not None and responses[i] == responses[j]:
                    continue
                da, db = sa[i] - sa[j], sb[i] - sb[j]
                pairs += 1
                sign_a, sign_b = np.sign(da), np.sign(db)
                agree += 1.0 if sign_a == sign_b else (0.5 if sign_a == 0 or sign_b == 0 else 0.0)
                margins_a.append(da)
                margins_b.append(db)
    out = {"pairs": int(pairs), "agreement": agree / pairs if pairs else float("nan"),
           "margin_spearman": spearman(margins_a, margins_b) if pairs >= 2 else float("nan")}
    if examples is not None:
        acc_a = _accuracy_block(examples, scores_a)["accuracy"]
        acc_b = _accuracy_block(examples, scores_b)["accuracy"]
        out.update(accuracy_a=acc_a, accuracy_b=acc_b, chance=acc_a * acc_b + (1 - acc_a) * (1 - acc_b))
    return out

#!/usr/bin/env python
"""The comparison's table, from the per-run JSON files that `experiments/compare.py` writes:

    python experiments/aggregate.py results/<experiment>          # -> README.md, summary.json, comparison.png

Pure functions (tested on hand-made results in tests/test_comparison.py) plus a small CLI. Statistics:

- Every method answers the same test prompts; a run's score on a subset is the mean over its prompts, a method's
  score is the mean over its seeds (base: one run). "Total" pools all prompts (sample-weighted, as the paper).
- 95% intervals: percentile bootstrap that resamples test prompts (within each subset) and seeds, both with
  replacement, `n_boot` times with a fixed RNG seed (the same resampled prompts for every method and statistic).
- Paired differences (CLHA minus another method): per prompt, CLHA's seed mean minus the other's seed mean;
  the bootstrap resamples the prompts once for both methods and each method's seeds independently.
- Win rate of a method against SFT, judged by eval_rm: over every prompt and every pair (method seed, SFT seed),
  100 when the method's reward is higher, 50 on a tie, 0 otherwise; averaged.
- Length: mean response words; truncation: share of responses that used all new tokens without EOS (%).
- Length preference of the judge: least-squares slope of eval_rm reward on response words over every response in
  the table, each prompt's mean removed first (so it compares responses to the same prompt), and the matching
  correlation. Length-adjusted reward = reward - slope x (words - mean words of all responses): a diagnostic of how
  much of a difference is length, assuming a linear preference shared by all methods; the slope's own uncertainty
  is not in its intervals.

Results are only combined when they share the protocol (policy, data, training and evaluation settings), the
reward-model fingerprints, the policy and data fingerprints, and (within a method) the method's settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clha.fileio import atomic_write  # noqa: E402

SUBSETS: Tuple[str, ...] = ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")
SUBSET_TITLES = {"harmless_base": "Harmless-base", "helpful_base": "Helpful-base", "helpful_online": "Helpful-online",
                 "helpful_rejection": "Helpful-rejection", "total": "Total"}
RESULT_FORMAT = "clha-comparison-run/1"
METHOD_ORDER = ("base", "sft", "dpo", "rrhf", "pro", "clha", "clha_nomask", "clha_nogate", "pro_n3", "clha_n3")
METHOD_TITLES = {"base": "Base (untrained)", "sft": "SFT", "dpo": "DPO", "rrhf": "RRHF", "pro": "PRO",
                 "clha": "CLHA", "clha_nomask": "CLHA w/o rescoring mask", "clha_nogate": "CLHA w/o adaptive gate",
                 "pro_n3": "PRO, rankings of 3", "clha_n3": "CLHA, rankings of 3"}
REFERENCE = "clha"          # the method the paired differences are taken from
WIN_AGAINST = "sft"         # the method the win rates are taken against
# Fields that must be equal in every run of one table.
SHARED_FIELDS = ("protocol", "reward_models", "policy_fingerprint", "data_fingerprint")
DEFAULT_BOOTSTRAP = 2000
DEFAULT_RNG_SEED = 0


class AggregationError(ValueError):
    """Results that cannot be combined (or read); the message names the files and the fields."""


# ============================================================================================== loading
def load_runs(runs_dir: Path) -> List[Dict[str, Any]]:
    """Every finished result in `runs_dir` (*.json; the hidden temporary files of unfinished writes are ignored)."""
    runs_dir = Path(runs_dir)
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AggregationError(f"{path}: unreadable result ({err}); delete it and rerun compare.py") from None
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise AggregationError(f"{path}: not a {RESULT_FORMAT} result")
        for field in ("method", "examples", "protocol", "reward_models"):
            if field not in data:
                raise AggregationError(f"{path}: field {field!r} missing")
        data["_path"] = str(path)
        runs.append(data)
    return runs


def _differences(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Dotted names of the leaves where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix or '(value)'}: {json.dumps(a)} vs {json.dumps(b)}"]


def _where(run: Dict[str, Any]) -> str:
    return str(run.get("_path") or run.get("run") or f"{run.get('method')} seed {run.get('seed')}")


def check_consistent(runs: Sequence[Dict[str, Any]]) -> None:
    """Refuse to combine runs made with different settings, reward models, policy, data or test prompts."""
    if not runs:
        return
    first = runs[0]
    for run in runs[1:]:
        for field in SHARED_FIELDS:
            diff = _differences(first.get(field), run.get(field), field)
            if diff:
                what = ("were judged or ranked by different reward models" if field == "reward_models"
                        else f"differ in {field}")
                raise AggregationError(
                    f"{_where(first)} and {_where(run)} {what}; they cannot share a table. Differences: "
                    + "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else "")
                    + ". Move the results of the other settings to another experiment folder, or rerun them.")
        if set(run["examples"]) != set(first["examples"]):
            missing = sorted(set(first["examples"]) ^ set(run["examples"]))
            raise AggregationError(f"{_where(first)} and {_where(run)} answer different test prompts "
                                   f"(e.g. {', '.join(missing[:5])}); paired statistics need the same prompts")
    by_method: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        other = by_method.setdefault(run["method"], run)
        diff = _differences(other.get("method_settings"), run.get("method_settings"), "method_settings")
        if diff:
            raise AggregationError(f"{_where(other)} and {_where(run)}: two {run['method']} runs with different "
                                   f"method settings ({'; '.join(diff)})")
    seen = {}
    for run in runs:
        key = (run["method"], run.get("seed"))
        if key in seen:
            raise AggregationError(f"{seen[key]} and {_where(run)}: the same method and seed twice")
        seen[key] = _where(run)


# ============================================================================================== statistics
def prompt_ids(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """The test prompts, subset by subset in the paper's order, then by index."""
    ids = list(runs[0]["examples"])

    def order(pid: str) -> Tuple[int, int]:
        subset, _, index = pid.partition("/")
        return (SUBSETS.index(subset) if subset in SUBSETS else len(SUBSETS), int(index) if index.isdigit() else 0)

    return sorted(ids, key=order)


def matrix(runs: Sequence[Dict[str, Any]], ids: Sequence[str], field: str) -> np.ndarray:
    """[seeds, prompts] values of one field (booleans become 0/100, as percentages)."""
    rows = []
    for run in runs:
        values = []
        for pid in ids:
            v = run["examples"][pid][field]
            values.append(100.0 if v is True else 0.0 if v is False else float(v))
        rows.append(values)
    return np.asarray(rows, dtype=np.float64)


def bootstrap(values: np.ndarray, strata: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
              seed: int = DEFAULT_RNG_SEED) -> Tuple[float, float, float]:
    """(point estimate, 2.5th, 97.5th percentile) of the mean of `values` [SA, SB, P] over all three axes.

    Each replicate draws SA indices of axis 0 and SB of axis 1 with replacement (seeds of two methods; SB = 1 for a
    single method) and, within every stratum (subset), as many prompts as it holds with replacement. The RNG is
    `numpy.random.default_rng(seed)`, so the same inputs give the same interval, and every statistic computed with
    the same seed and prompts resamples the same prompts.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"values must have shape [SA, SB, P], got {values.shape}")
    sa, sb, p = values.shape
    strata = np.asarray(list(strata))
    if strata.shape != (p,):
        raise ValueError(f"need one stratum label per prompt ({p}), got {strata.shape}")
    point = float(values.mean())
    rng = np.random.default_rng(seed)
    wa = rng.multinomial(sa, np.full(sa, 1.0 / sa), size=n_boot).astype(np.float64)        # [B, SA]
    wb = rng.multinomial(sb, np.full(sb, 1.0 / sb), size=n_boot).astype(np.float64)        # [B, SB]
    wp = np.zeros((n_boot, p))
    for label in dict.fromkeys(strata.tolist()):                                            # stable order
        cols = np.flatnonzero(strata == label)
        wp[:, cols] = rng.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=n_boot)
    over_a = np.einsum("ba,acp->bcp", wa, values)
    over_b = np.einsum("bc,bcp->bp", wb, over_a)
    stats = (over_b * wp).sum(axis=1) / (sa * sb * p)
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return point, float(lo), float(hi)


def mean_interval(x: np.ndarray, strata: Sequence[str], **kw) -> Tuple[float, float, float]:
    """Mean over seeds and prompts of x [S, P], with its bootstrap interval."""
    return bootstrap(np.asarray(x)[:, None, :], strata, **kw)


def paired_difference(xa: np.ndarray, xb: np.ndarray, strata: Sequence[str], **kw) -> Tuple[float, float, float]:
    """mean(xa) - mean(xb) for xa [SA, P], xb [SB, P] on the same prompts, resampled in pairs."""
    xa, xb = np.asarray(xa), np.asarray(xb)
    return bootstrap(xa[:, None, :] - xb[None, :, :], strata, **kw)


def win_values(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """[SA, SB, P]: 100 where a's value beats b's on a prompt, 50 on a tie, 0 otherwise."""
    xa, xb = np.asarray(xa)[:, None, :], np.asarray(xb)[None, :, :]
    return np.where(xa > xb, 100.0, np.where(xa == xb, 50.0, 0.0))


def win_rate(xa: np.ndarray, xb: np.ndarray, strata: Sequence[str], **kw) -> Tuple[float, float, float]:
    return bootstrap(win_values(xa, xb), strata, **kw)


# ============================================================================================== the summary
def length_preference(rewards: np.ndarray, words: np.ndarray) -> Optional[Dict[str, float]]:
    """How the judge's reward moves with response length, within prompts: rewards and words are [runs, prompts]
    (every run answers the same prompts). Each prompt's mean over runs is removed from both; the slope is the
    least-squares fit of reward on words through the origin of those deviations, the correlation theirs. None when
    the lengths never differ within a prompt (fewer than two runs, or equal lengths)."""
    r = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(words, dtype=np.float64)
    rd, wd = r - r.mean(axis=0), w - w.mean(axis=0)
    sxx, sxy, syy = float((wd * wd).sum()), float((rd * wd).sum()), float((rd * rd).sum())
    if r.shape[0] < 2 or sxx == 0.0:
        return None
    return {"slope_per_word": sxy / sxx, "within_prompt_correlation": sxy / math.sqrt(sxx * syy) if syy else 0.0,
            "mean_words": float(w.mean()), "responses": int(r.size)}


def shorter_counterpart(method: str, methods: Sequence[str]) -> Optional[str]:
    """The n = 2 method a longer-ranking one extends (clha_n3 -> clha), when it is among `methods`."""
    stem, sep, n = method.rpartition("_n")
    return stem if sep and n.isdigit() and int(n) > 2 and stem in methods else None


def group_by_method(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    known = [m for m in METHOD_ORDER if m in groups]
    ordered = {m: sorted(groups[m], key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
               for m in known + sorted(set(groups) - set(known))}
    return ordered


def summarise(runs: Sequence[Dict[str, Any]], n_boot: int = DEFAULT_BOOTSTRAP,
              seed: int = DEFAULT_RNG_SEED) -> Dict[str, Any]:
    """Every number of the results README, as plain JSON values: (mean, low, high) triples per cell."""
    check_consistent(runs)
    if not runs:
        raise AggregationError("no results to aggregate")
    ids = prompt_ids(runs)
    strata = [pid.partition("/")[0] for pid in ids]
    groups = group_by_method(runs)
    scopes = {s: [i for i, st in enumerate(strata) if st == s] for s in SUBSETS if s in strata}
    scopes["total"] = list(range(len(ids)))
    kw = dict(n_boot=n_boot, seed=seed)

    def per_scope(fn, *mats):
        return {scope: list(fn(*[m[:, cols] for m in mats], [strata[c] for c in cols], **kw))
                for scope, cols in scopes.items()}

    def adjusted_total(fn, *names):
        """fn over the length-adjusted rewards of these methods on all prompts; None without a length fit."""
        return list(fn(*[mats[n]["reward_length_adjusted"] for n in names], strata, **kw)) if length else None

    mats = {m: {f: matrix(rs, ids, f) for f in ("reward", "bleu", "words", "at_limit")} for m, rs in groups.items()}
    length = length_preference(np.vstack([mats[m]["reward"] for m in groups]),
                               np.vstack([mats[m]["words"] for m in groups]))
    if length:
        for m in groups:
            mats[m]["reward_length_adjusted"] = (mats[m]["reward"]
                                                 - length["slope_per_word"] * (mats[m]["words"] - length["mean_words"]))
    methods: Dict[str, Any] = {}
    for m, rs in groups.items():
        methods[m] = {
            "seeds": [r.get("seed") for r in rs],
            "per_seed": [{"seed": r.get("seed"), "reward": float(mats[m]["reward"][i].mean()),
                          "bleu": float(mats[m]["bleu"][i].mean())} for i, r in enumerate(rs)],
            "reward": per_scope(mean_interval, mats[m]["reward"]),
            "bleu": per_scope(mean_interval, mats[m]["bleu"]),
            "words": list(mean_interval(mats[m]["words"], strata, **kw)),
            "reward_length_adjusted": adjusted_total(mean_interval, m),
            "at_limit": list(mean_interval(mats[m]["at_limit"], strata, **kw)),
            "win_vs_sft": (list(win_rate(mats[m]["reward"], mats[WIN_AGAINST]["reward"], strata, **kw))
                           if WIN_AGAINST in mats and m != WIN_AGAINST else None),
            "method_settings": rs[0].get("method_settings"),
            "training": [_training_brief(r) for r in rs],
        }
    differences: Dict[str, Any] = {}
    if REFERENCE in mats:
        for m in groups:
            if m != REFERENCE:
                differences[m] = {
                    "reward": per_scope(paired_difference, mats[REFERENCE]["reward"], mats[m]["reward"]),
                    "bleu": per_scope(paired_difference, mats[REFERENCE]["bleu"], mats[m]["bleu"]),
                    "reward_length_adjusted": adjusted_total(paired_difference, REFERENCE, m),
                }
    longer: Dict[str, Any] = {}
    for m in groups:
        shorter = shorter_counterpart(m, list(groups))
        if shorter:
            longer[m] = {"against": shorter,
                         "reward": per_scope(paired_difference, mats[m]["reward"], mats[shorter]["reward"]),
                         "bleu": per_scope(paired_difference, mats[m]["bleu"], mats[shorter]["bleu"]),
                         "reward_length_adjusted": adjusted_total(paired_difference, m, shorter)}
    return {"n_prompts": {scope: len(cols) for scope, cols in scopes.items()}, "n_runs": len(runs),
            "longer_rankings": longer, "length_preference": length,
            "bootstrap": {"samples": n_boot, "rng_seed": seed}, "methods": methods,
            "differences_from": REFERENCE if REFERENCE in mats else None, "differences": differences,
            "win_against": WIN_AGAINST if WIN_AGAINST in mats else None}


def _training_brief(run: Dict[str, Any]) -> Dict[str, Any]:
    t = run.get("training") or {}
    return {"seed": run.get("seed"), "best_step": t.get("best_step"), "best_dev_reward": t.get("best_dev_reward"),
            "steps": t.get("steps"), "wall_s": t.get("wall_s"), "step_time_s": t.get("step_time_s"),
            "masked_pair_fraction": (t.get("mean") or {}).get("masked_pair_fraction"),
            "eval_wall_s": (run.get("evaluation") or {}).get("wall_s")}


# ============================================================================================== rendering
def _f(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(triple: Optional[Sequence[float]], signed: bool = False) -> str:
    if triple is None:
        return "-"
    point, lo, hi = triple
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


def render_tables(summary: Dict[str, Any]) -> List[str]:
    scopes = list(summary["n_prompts"])
    head = "| Method | runs | " + " | ".join(SUBSET_TITLES.get(s, s) for s in scopes) + " |"
    sep = "|---|---:|" + "---:|" * len(scopes)
    out = ["## BLEU / Reward (the paper's layout)", "",
           f"Mean over seeds; BLEU over characters against the human-chosen reply (x 100), Reward = mean "
           f"sigmoid(eval_rm logit) x 100. Prompts per subset: "
           + ", ".join(f"{SUBSET_TITLES.get(s, s)} {n}" for s, n in summary["n_prompts"].items()) + ".", "",
           head, sep]
    for m, d in summary["methods"].items():
        cells = [f"{_f(d['bleu'][s][0])} / {_f(d['reward'][s][0])}" for s in scopes]
        out.append(f"| {_title(m)} | {len(d['seeds'])} | " + " | ".join(cells) + " |")
    for metric, title in (("reward", "Reward"), ("bleu", "BLEU")):
        out += ["", f"## {title} with 95% intervals", "",
                "Bootstrap over test prompts (within subsets) and seeds.", "", head, sep]
        for m, d in summary["methods"].items():
            out.append(f"| {_title(m)} | {len(d['seeds'])} | " + " | ".join(_ci(d[metric][s]) for s in scopes) + " |")
    if summary["differences"]:
        ref = _title(summary["differences_from"])
        out += ["", f"## {ref} minus each method, paired per prompt (95% intervals)", "",
                f"Positive: {ref} scores higher. An interval that excludes 0 is a difference this sample resolves.",
                "", "| Method | " + " | ".join(f"Reward {SUBSET_TITLES.get(s, s)}" for s in scopes)
                + " | BLEU Total |", "|---|" + "---:|" * (len(scopes) + 1)]
        for m, d in summary["differences"].items():
            out.append(f"| {_title(m)} | " + " | ".join(_ci(d["reward"][s], signed=True) for s in scopes)
                       + f" | {_ci(d['bleu']['total'], signed=True)} |")
    if summary.get("longer_rankings"):
        out += ["", "## Longer rankings: rankings of n minus the same method on the human pair (n = 2), paired per "
                "prompt (95% intervals)", "",
                "Positive: the longer ranking scores higher. Both train on the same prompts; the longer one adds "
                "responses sampled from the untrained policy, ranked with the human pair by train_rm.", "",
                "| Method | against | " + " | ".join(f"Reward {SUBSET_TITLES.get(s, s)}" for s in scopes)
                + " | BLEU Total | Reward Total, length-adjusted |", "|---|---|" + "---:|" * (len(scopes) + 2)]
        for m, d in summary["longer_rankings"].items():
            out.append(f"| {_title(m)} | {_title(d['against'])} | "
                       + " | ".join(_ci(d["reward"][s], signed=True) for s in scopes)
                       + f" | {_ci(d['bleu']['total'], signed=True)} "
                       f"| {_ci(d.get('reward_length_adjusted'), signed=True)} |")
    length = summary.get("length_preference")
    if length:
        ref = summary.get("differences_from")
        out += ["", "## Reward and response length", "",
                f"eval_rm prefers {'longer' if length['slope_per_word'] > 0 else 'shorter'} responses: over the "
                f"{length['responses']:,} responses of this table, each "
                f"prompt's mean removed, reward and words correlate at {length['within_prompt_correlation']:.2f} "
                f"and the reward rises {10 * length['slope_per_word']:+.2f} points per 10 words (least squares). "
                f"Length-adjusted reward = reward - {length['slope_per_word']:.4f} x (words - "
                f"{length['mean_words']:.1f}), the mean length of all responses: what a method would score at that "
                "length if the judge's length preference were linear and the same for every method. A diagnostic, "
                "not a replacement for the reward: part of a length difference may be real quality, and the "
                "slope, estimated from these results (it moves as runs are added), is taken as known in the "
                "intervals.", "",
                "| Method | words | Reward Total | Length-adjusted reward Total"
                + (f" | {_title(ref)} minus method, length-adjusted |" if ref else " |"),
                "|---|---:|---:|---:|" + ("---:|" if ref else "")]
        for m, d in summary["methods"].items():
            diff = (summary["differences"].get(m) or {}).get("reward_length_adjusted") if ref else None
            out.append(f"| {_title(m)} | {_f(d['words'][0], 1)} | {_f(d['reward']['total'][0])} "
                       f"| {_ci(d['reward_length_adjusted'])}" + (f" | {_ci(diff, signed=True)} |" if ref else " |"))
    multi = {m: d for m, d in summary["methods"].items() if len(d.get("per_seed") or []) > 1}
    if multi:
        out += ["", "## Training seeds", "",
                "Total reward and BLEU of each training seed on the same test prompts, and the spread of the reward "
                "(largest minus smallest seed). The intervals above resample the seeds too, but from two or three "
                "seeds that part of them is rough: the spread shows how much a method's result moves with its "
                "training seed alone.", "",
                "| Method | seeds | Reward Total per seed | BLEU Total per seed | Reward spread |", "|---|---|---|---|---:|"]
        for m, d in multi.items():
            ps = d["per_seed"]
            rewards = [p["reward"] for p in ps]
            out.append(f"| {_title(m)} | {', '.join(str(p['seed']) for p in ps)} "
                       f"| {', '.join(_f(p['reward']) for p in ps)} | {', '.join(_f(p['bleu']) for p in ps)} "
                       f"| {_f(max(rewards) - min(rewards))} |")
    out += ["", "## Win rate against SFT, length, truncation, selection", "",
            "Win rate: how often eval_rm prefers the method's response to SFT's on the same prompt (every pair of "
            "seeds; ties count half). Dev reward: train_rm's mean sigmoid on the validation prompts at the selected "
            "checkpoint (step 0 is the untrained model).", "",
            "| Method | win vs SFT % | words | at token limit % | selected step per seed | dev reward (selected) |",
            "|---|---:|---:|---:|---|---|"]
    for m, d in summary["methods"].items():
        steps = ", ".join(str(t["best_step"]) for t in d["training"] if t["best_step"] is not None) or "-"
        dev = ", ".join(_f(t["best_dev_reward"], 3) for t in d["training"] if t["best_dev_reward"] is not None) or "-"
        out.append(f"| {_title(m)} | {_ci(d['win_vs_sft'])} | {_f(d['words'][0], 1)} | {_f(d['at_limit'][0], 1)} "
                   f"| {steps} | {dev} |")
    return out


def render_migrations(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """A protocol line per distinct `fingerprint_migration` record: results whose fingerprints were re-expressed
    under a later fingerprint definition, with what showed that the models and data are the same."""
    seen: Dict[str, List[str]] = {}
    for r in runs:
        m = r.get("fingerprint_migration")
        if m:
            seen.setdefault(json.dumps(m, sort_keys=True), []).append(r["run"])
    lines = []
    for text, names in seen.items():
        m = json.loads(text)
        changed = ", ".join(f"{k} `{v['from']}` -> `{v['to']}`" for k, v in sorted(m.get("fingerprints", {}).items()))
        lines.append(f"- Fingerprints re-expressed on {m.get('date', '?')} for {len(names)} run(s) ({changed}): "
                     f"{m.get('why', '')} Evidence: {m.get('evidence', '')}")
    return lines


def reused_evaluations(runs: Sequence[Dict[str, Any]]) -> str:
    """The sentence naming the runs whose result is the base run's evaluation (dev kept step 0, which held exactly
    the untrained policy), or '' when there are none."""
    names = sorted(r["run"] for r in runs if ((r.get("evaluation") or {}).get("reused_from") or {}).get("run"))
    if not names:
        return ""
    return (f" Dev kept step 0 for {', '.join(names)}; that checkpoint held exactly the untrained policy (weights, "
            "config, tokenizer), so the base run's evaluation is its result rather than a second evaluation of the "
            "same model.")


def render_protocol(runs: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> List[str]:
    first = runs[0]
    proto = first["protocol"]
    t, e, d, p = proto["train"], proto["eval"], proto["data"], proto["policy"]
    data = first.get("data_summary") or {}
    rms = first["reward_models"]
    commits = sorted({(r.get("git") or {}).get("commit", "unknown") + (" (uncommitted changes)" if (r.get("git") or {})
                      .get("dirty") else "") for r in runs})
    machines = sorted({f"{(r.get('machine') or {}).get('cpu', '?')}, {(r.get('machine') or {}).get('cpu_count', '?')} "
                       f"cores, torch {(r.get('machine') or {}).get('torch', '?')}"
                       + (f", GPUs: {', '.join(r['machine']['gpus'])}" if (r.get('machine') or {}).get('gpus') else "")
                       for r in runs})
    train_wall = [r["training"]["wall_s"] for r in runs if (r.get("training") or {}).get("wall_s")]
    eval_wall = [r["evaluation"]["wall_s"] for r in runs if (r.get("evaluation") or {}).get("wall_s")]
    gaps = data.get("train_rm_gap_quantiles") or {}
    lines = ["## Protocol", "",
             f"- Policy: {p.get('name')} (fingerprint `{first.get('policy_fingerprint')}`).",
             f"- Reward models: `train_rm` (fingerprint `{rms['train_rm']}`) ranks the training pairs and scores the "
             f"dev generations that select the checkpoint; `eval_rm` (fingerprint `{rms['eval_rm']}`) judges the "
             "test responses. Fingerprint: sha256 over the model's weight, config and tokenizer files.",
             *render_migrations(runs),
             f"- Data (fingerprint `{first.get('data_fingerprint')}`): step 1 with disjoint prompt-grouped partitions"
             f"{' of the first %d raw lines per subset' % d['raw_lines_per_subset'] if d.get('raw_lines_per_subset') else ''}"
             f", steps 2-3 ranked by `train_rm` only: {data.get('train_pairs', '?')} training pairs, "
             f"{data.get('dev_prompts', '?')} dev prompts, test pairs per subset "
             f"{json.dumps(data.get('test_pairs', {}))}.",
             f"- `train_rm` reward gaps of the training pairs: median {gaps.get('median', '?')}, 75th percentile "
             f"{gaps.get('p75', '?')}, 90th {gaps.get('p90', '?')}; share of pairs kept by the rescoring mask at "
             f"tau: {json.dumps(data.get('pairs_kept_at_tau', {}))}; best candidate's reward above 0 (SFT gate open) "
             f"for {data.get('best_candidate_reward_above_0', '?')} of the rows.",
             f"- Training: {t['train_examples_per_run'] or 'all'} training pairs per run (a per-seed sample, the same "
             f"for every method with that seed), {t['max_train_steps'] or str(t['num_train_epochs']) + ' epochs'} "
             f"optimizer steps, batch {t['global_batch_size']} ({t['per_device_train_batch_size']} per process x "
             f"{t['num_processes']} process(es) x {t['gradient_accumulation_steps']} accumulation), ranking length 2 "
             f"(the human pair; a longer-ranking method's row gives its ranking_len and candidate settings), "
             f"block {t['block_size']}, AdamW, {t['lr_scheduler_type']} schedule, {t['warmup_steps']} warm-up steps, "
             f"gradient clipping {t['max_grad_norm']}, weights {t['torch_dtype']}, `{t['accelerate_config']}`.",
             f"- Selection: validation at step 0 and every {t['validation_every']} steps on the first "
             f"{t['validation_prompts']} dev prompts (greedy, at most {t['validation_max_new_tokens']} new tokens), "
             "scored by `train_rm`; the checkpoint with the best dev reward is evaluated (it may be step 0, the "
             "untrained model)." + reused_evaluations(runs),
             f"- Evaluation: the first {e['test_prompts_per_subset'] or 'all'} test prompts of each subset, greedy, "
             f"at most {e['max_new_tokens']} new tokens, block {e['block_size']}, {e['num_processes']} process(es), "
             f"dtype {e['dtype']}, judged by `eval_rm` (input cut to {e['reward_max_length']} tokens).",
             f"- Statistics: percentile bootstrap, {summary['bootstrap']['samples']} resamples of prompts (within "
             f"subsets) and seeds, RNG seed {summary['bootstrap']['rng_seed']}.",
             "", "| Method | seeds | settings |", "|---|---|---|"]
    for m, dm in summary["methods"].items():
        ms = {k: v for k, v in (dm["method_settings"] or {}).items() if k != "loss_type"}
        settings = ", ".join(f"{k} {v}" for k, v in ms.items()) or "no training"
        lines.append(f"| {_title(m)} | {', '.join(str(s) for s in dm['seeds'] if s is not None) or '-'} | {settings} |")
    lines += ["", "Hyperparameter names are those of `train/main.py` (learning_rate; dpo_beta: DPO beta; temperature: "
              "PRO temperature; reward_gap_threshold: tau; rank_margin: CLHA margin; sft_weight; "
              "sft_reward_threshold: the adaptive-SFT gate, -inf = always on; tau -1 = every pair kept).", ""]
    shared: Dict[str, Tuple[Dict[str, Any], List[str]]] = {}   # one candidate file serves every n > 2 run of a seed
    for r in runs:
        if r.get("candidates_summary"):
            key = json.dumps(r["candidates_summary"], sort_keys=True)
            shared.setdefault(key, (r["candidates_summary"], []))[1].append(r["run"])
    for cs, names in shared.values():
        gap = cs.get("adjacent_reward_gap") or {}
        lines.append(
            f"- Rankings of {cs.get('n')} ({', '.join(names)}): {cs.get('samples')} responses sampled for "
            f"{cs.get('rows_in')} prompts, {cs.get('rows_out')} rows written "
            f"({cs.get('rows_dropped_fewer_than_n')} dropped with fewer than {cs.get('n')} distinct candidates); "
            f"a sample outranks the human chosen reply for {_pct(cs.get('sample_outranks_human_chosen'))} of "
            f"the prompts and is the best candidate of {_pct(cs.get('best_is_policy'))} of the rows; median "
            f"train_rm gap between adjacent ranks {gap.get('median', '?')}.")
    lines += [f"- Code: git commit(s) {', '.join(f'`{c}`' for c in commits)}.",
              f"- Machine(s): {'; '.join(machines)}."]
    if train_wall:
        lines.append(f"- Time per trained run: training {np.mean(train_wall) / 60:.1f} min on average "
                     f"({min(train_wall) / 60:.1f}-{max(train_wall) / 60:.1f}), evaluation "
                     f"{np.mean(eval_wall) / 60:.1f} min per evaluated run; all runs together "
                     f"{(sum(train_wall) + sum(eval_wall)) / 3600:.1f} h.")
    return lines


def render_readme(runs: Sequence[Dict[str, Any]], summary: Dict[str, Any],
                  expected: Optional[Sequence[str]] = None, experiment: str = "",
                  stale: Sequence[str] = ()) -> str:
    first = runs[0]
    lines = [f"# Method comparison: {experiment or first.get('experiment', '')}", "",
             f"Generated by `experiments/compare.py` (preset `{first.get('preset', '?')}`) from the "
             f"{len(runs)} result files in `runs/`; rebuild with `python experiments/aggregate.py "
             f"results/{experiment or first.get('experiment', '<experiment>')}`. Do not edit by hand.", ""]
    have = {r.get("run") for r in runs}
    missing = [name for name in (expected or []) if name not in have]
    if missing:
        lines += [f"**Incomplete: {len(missing)} planned run(s) have no result yet: {', '.join(missing)}.**", ""]
    if stale:
        lines += ["Left out, made with other settings (the next pass of `experiments/compare.py` redoes them): "
                  + "; ".join(stale) + ".", ""]
    lines += ["![reward by method](comparison.png)", ""]
    lines += render_tables(summary) + [""] + render_protocol(runs, summary) + [""]
    return "\n".join(lines)


def plot(summary: Dict[str, Any], path: Path) -> bool:
    """Reward per subset and total with 95% intervals, and the paired differences; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    scopes = list(summary["n_prompts"])
    methods = list(summary["methods"])
    panels = 2 if summary["differences"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1][:panels]})
    ax = axes[0][0]
    width = 0.8 / max(len(methods), 1)
    seed_dots = False
    for k, m in enumerate(methods):
        triples = [summary["methods"][m]["reward"][s] for s in scopes]
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(scopes))]
        ys = [t[0] for t in triples]
        err = [[t[0] - t[1] for t in triples], [t[2] - t[0] for t in triples]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=_title(m))
        per_seed = summary["methods"][m].get("per_seed") or []
        if len(per_seed) > 1 and "total" in scopes:          # each training seed's total, over the Total bar
            ax.scatter([xs[scopes.index("total")]] * len(per_seed), [p["reward"] for p in per_seed], s=9,
                       color="black", zorder=3, label=None if seed_dots else "one training seed")
            seed_dots = True
    lows = [summary["methods"][m]["reward"][s][1] for m in methods for s in scopes]
    highs = [summary["methods"][m]["reward"][s][2] for m in methods for s in scopes]
    ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(highs) + 5))
    ax.set_xticks(range(len(scopes)))
    ax.set_xticklabels([SUBSET_TITLES.get(s, s) for s in scopes], fontsize=8)
    ax.set_ylabel("Reward (eval_rm, mean sigmoid x 100)")
    ax.set_title("Reward with 95% intervals")
    ax.legend(fontsize=7)
    if panels == 2:
        ax2 = axes[0][1]
        names = list(summary["differences"])
        triples = [summary["differences"][m]["reward"]["total"] for m in names]
        ys = [t[0] for t in triples]
        err = [[t[0] - t[1] for t in triples], [t[2] - t[0] for t in triples]]
        ax2.barh(range(len(names)), ys, xerr=err, capsize=3, color="#4C72B0")
        ax2.axvline(0, color="black", linewidth=0.8)
        ax2.set_yticks(range(len(names)))
        ax2.set_yticklabels([_title(m) for m in names], fontsize=8)
        ax2.set_xlabel("reward difference (total)")
        ax2.set_title(f"{_title(summary['differences_from'])} minus method")
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return True


def split_by_protocol(runs: Sequence[Dict[str, Any]], protocol: Optional[Dict[str, Any]]
                      ) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(the runs made with `protocol`, 'run (differences)' for the others); all runs when protocol is None."""
    if protocol is None:
        return list(runs), []
    kept, stale = [], []
    for run in runs:
        diffs = _differences(run.get("protocol"), protocol, "protocol")
        if diffs:
            stale.append(f"{run.get('run', _where(run))} ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})")
        else:
            kept.append(run)
    return kept, stale


def write_report(results_dir: Path, expected: Optional[Sequence[str]] = None, n_boot: int = DEFAULT_BOOTSTRAP,
                 seed: int = DEFAULT_RNG_SEED, protocol: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """results/<experiment>/{README.md, summary.json, comparison.png} from results/<experiment>/runs/*.json (only
    the runs made with `protocol` when it is given: a stored result of older settings waits to be redone and is
    named, not mixed in)."""
    results_dir = Path(results_dir)
    runs, stale = split_by_protocol(load_runs(results_dir / "runs"), protocol)
    for line in stale:
        print(f"left out, made with other settings: {line}", file=sys.stderr)
    if not runs:
        print(f"no current results in {results_dir / 'runs'} yet: nothing to aggregate", file=sys.stderr)
        return None
    summary = summarise(runs, n_boot=n_boot, seed=seed)
    with atomic_write(results_dir / "README.md") as handle:
        handle.write(render_readme(runs, summary, expected, results_dir.name, stale))
    with atomic_write(results_dir / "summary.json") as handle:
        json.dump(summary, handle, indent=1)
        handle.write("\n")
    plot(summary, results_dir / "comparison.png")
    print(f"wrote {results_dir}/README.md, summary.json and comparison.png from {len(runs)} run(s)")
    return summary


# ============================================================================================== the sweep
def sweep_table(records: Sequence[Dict[str, Any]]) -> str:
    """Dev rewards of a sweep (train_rm, mean sigmoid on the dev prompts) and the best setting per method."""
    lines = ["| run | learning rate | tau | dev reward at step 0 | dev reward at the end |", "|---|---:|---:|---:|---:|"]
    best: Dict[str, Dict[str, Any]] = {}
    for r in records:
        ms = r["method_settings"]
        end = r.get("dev_reward_end")
        lines.append(f"| {r['run']} | {ms.get('learning_rate')} | {ms.get('reward_gap_threshold', '-')} | "
                     f"{_f(r.get('dev_reward_start'), 4)} | {_f(end, 4)} |")
        if end is not None and (r["method"] not in best or end > best[r["method"]]["dev_reward_end"]):
            best[r["method"]] = r
    lines += ["", "Best on dev (set them with --set methods.<method>.learning_rate=... / reward_gap_threshold=...):"]
    for m, r in best.items():
        ms = r["method_settings"]
        lines.append(f"- {m}: learning_rate {ms.get('learning_rate')}"
                     + (f", reward_gap_threshold {ms['reward_gap_threshold']}" if "reward_gap_threshold" in ms else "")
                     + f" (dev reward {_f(r['dev_reward_end'], 4)})")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", type=Path, help="results/<experiment> (holding runs/*.json)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples")
    p.add_argument("--rng-seed", type=int, default=DEFAULT_RNG_SEED, help="bootstrap RNG seed")
    args = p.parse_args(argv)
    try:
        write_report(args.results_dir, n_boot=args.bootstrap, seed=args.rng_seed)
    except AggregationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

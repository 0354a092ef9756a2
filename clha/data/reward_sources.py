"""Where each row's rewards came from, and how two reward sources agree.

Every row that steps 2 and 3 write records its reward source in `meta.reward_source`:

    "reward_model:<path or hub id>"          scored by that reward model
    "precomputed:<stored reward file>"       stored rewards, e.g. ../shared/data/pro-format/hh_test/helpful_base.json

Rewards of different sources live on different scales (two reward models' logits), while CLHA's rescoring
threshold `tau` and its adaptive-SFT gate compare them with one global value; so a file should hold one source.
`reward_source_shares` counts the sources of a list of rows (the trainer logs it at start, and warns when a
training file mixes sources). `RewardAgreement` compares a reward model's scores with stored rewards of the
same rows: pairwise ranking agreement and Pearson correlations.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

REWARD_SOURCE_KEY = "reward_source"
UNRECORDED = "unrecorded"


def model_source(reward_model: str) -> str:
    return f"reward_model:{reward_model}"


def precomputed_source(path) -> str:
    return f"precomputed:{path}"


def reward_source_counts(examples: Sequence) -> Dict[str, int]:
    """Rows per `meta.reward_source` (rows without one, e.g. files written before it was recorded: "unrecorded")."""
    counts = Counter()
    for ex in examples:
        meta = ex.meta if hasattr(ex, "meta") else ex.get("meta", {})
        source = meta.get(REWARD_SOURCE_KEY) if isinstance(meta, dict) else None
        counts[source if isinstance(source, str) and source else UNRECORDED] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def reward_source_shares(examples: Sequence, log: Optional[logging.Logger] = logger) -> Dict[str, float]:
    """Share of rows per reward source (fractions summing to 1; {} for no rows), most frequent first.

    With `log` (default: this module's logger) the shares are logged, and a warning says when the rows mix
    more than one recorded source (their rewards are on different scales)."""
    counts = reward_source_counts(examples)
    total = sum(counts.values())
    shares = {source: n / total for source, n in counts.items()} if total else {}
    if log is not None and total:
        log.info("reward sources of the %d training rows: %s", total,
                 ", ".join(f"{s} {100 * shares[s]:.1f}% ({n})" for s, n in counts.items()))
        recorded = [s for s in counts if s != UNRECORDED]
        if len(recorded) > 1:
            log.warning("the training rows mix %d reward sources: their rewards are on different scales, and the "
                        "rescoring threshold and the adaptive-SFT gate compare them with one value", len(recorded))
    return shares


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


class RewardAgreement:
    """Accumulates (stored, model) rewards of the same rows, candidates in the same order.

    - `pairwise_agreement`: over candidate pairs whose stored rewards differ, the fraction the model orders the
      same way (a model tie counts as disagreement);
    - `gap_pearson`: Pearson correlation of the reward gaps r_k - r_l of all candidate pairs (k < l);
    - `reward_pearson`: Pearson correlation of the rewards themselves (sensitive to per-prompt offsets).
    """

    def __init__(self):
        self.rows = 0
        self.stored: List[float] = []
        self.model: List[float] = []
        self.stored_gaps: List[float] = []
        self.model_gaps: List[float] = []

    def add(self, stored: Sequence[float], model: Sequence[float]) -> None:
        if len(stored) != len(model):
            raise ValueError(f"{len(stored)} stored rewards for {len(model)} model rewards")
        self.rows += 1
        self.stored.extend(float(r) for r in stored)
        self.model.extend(float(r) for r in model)
        for k in range(len(stored)):
            for j in range(k + 1, len(stored)):
                self.stored_gaps.append(float(stored[k]) - float(stored[j]))
                self.model_gaps.append(float(model[k]) - float(model[j]))

    def summary(self) -> Dict[str, Optional[float]]:
        decided = [(s, m) for s, m in zip(self.stored_gaps, self.model_gaps) if s != 0]
        agree = sum(1 for s, m in decided if s * m > 0)

        def rounded(x):
            return None if x is None else round(x, 4)

        return {"rows": self.rows, "pairs": len(decided),
                "pairwise_agreement": rounded(agree / len(decided)) if decided else None,
                "gap_pearson": rounded(_pearson(self.stored_gaps, self.model_gaps)),
                "reward_pearson": rounded(_pearson(self.stored, self.model))}

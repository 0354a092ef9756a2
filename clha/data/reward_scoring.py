"""Where preprocessing rewards come from: stored rewards, a reward model, or both (`RewardSource`).

Steps 2 and 3 (`clha.data.preprocess`) score every row through one `RewardSource`. A reward model is loaded on
first use only (torch/transformers are imported then). A reward that is not a finite number (NaN, inf: a broken
reward model or a damaged reward file) stops the step before anything is written, naming the subset and raw line.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from clha.data.format import RankedExample
from clha.data.hh_raw import canonical_subset
from clha.data.precomputed import PrecomputedRewards
from clha.data.reward_sources import RewardAgreement, model_source, precomputed_source
from clha.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class RewardSource:
    """Where rewards come from: stored rewards (raw test-file rows only) or a reward model, one source per run.

    - stored rewards only: every row needs a stored reward (a missing one stops the step);
    - a reward model only: the model scores every row;
    - both (default): the model scores every row, and the stored rewards of the rows that have them are only
      compared with the model's scores (`agreement()`: pairwise ranking agreement, correlations), so the
      output holds one reward scale;
    - both with `allow_mixed=True` (`--allow_mixed_reward_sources`): stored rewards where a row has them, the
      model for the rest (two scales in one file; each row's `meta.reward_source` says which).

    `score_with_sources` returns each row's rewards and its source label (`clha.data.reward_sources`).
    """

    precomputed: Optional[PrecomputedRewards] = None
    reward_model: Optional[str] = None
    device: Optional[str] = None
    batch_size: int = 16
    max_length: int = 512
    precomputed_split: str = "test"   # the raw split whose line numbers the stored files refer to
    allow_mixed: bool = False

    def __post_init__(self):
        if self.precomputed is None and self.reward_model is None:
            raise InputError("no reward source: give --reward_model PATH_OR_ID or --precomputed_rewards DIR")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.allow_mixed and self.mode != "mixed":
            logger.warning("--allow_mixed_reward_sources has no effect with a single reward source")
        self._scorer = None
        self.counts = Counter()
        self.rows_by_source = Counter()   # rows scored so far per meta.reward_source label
        self._agreement = RewardAgreement()

    @property
    def mode(self) -> str:
        """"precomputed", "reward_model", "reward_model+agreement" (both, default) or "mixed"."""
        if self.reward_model is None:
            return "precomputed"
        if self.precomputed is None:
            return "reward_model"
        return "mixed" if self.allow_mixed else "reward_model+agreement"

    @classmethod
    def from_args(cls, reward_model: Optional[str] = None, precomputed_rewards: Optional[str] = None,
                  device: Optional[str] = None, batch_size: int = 16, max_length: int = 512,
                  allow_mixed: bool = False) -> "RewardSource":
        """Check the paths now (before any work); the model itself is loaded on first use."""
        precomputed = PrecomputedRewards(precomputed_rewards) if precomputed_rewards else None
        if reward_model:
            _check_model_path(reward_model)
        return cls(precomputed, reward_model or None, device, batch_size, max_length, allow_mixed=allow_mixed)

    def _stored(self, ex: RankedExample) -> Optional[List[float]]:
        if self.precomputed is None or ex.meta.get("split") != self.precomputed_split:
            return None
        source = ex.meta.get("source")
        if not self.precomputed.has_subset(source):
            return None
        row = self.precomputed.row(source, ex.meta["line_num"])
        if row is None and self.reward_model is not None:
            return None
        rewards = self.precomputed.lookup(source, ex.meta["line_num"])
        if not _same_opening(row, ex):
            self.counts["precomputed_prompt_mismatch"] += 1
        if len(rewards) != ex.n:
            raise InputError(f"stored rewards have {len(rewards)} values for {ex.n} candidates "
                             f"(subset {ex.meta.get('source')!r}, raw line {ex.meta.get('line_num')})",
                             path=self.precomputed.directory)
        return rewards

    def score(self, examples: Sequence[RankedExample]) -> List[List[float]]:
        """One reward per candidate of each example, in the example's candidate order."""
        return self.score_with_sources(examples)[0]

    def score_with_sources(self, examples: Sequence[RankedExample]) -> Tuple[List[List[float]], List[str]]:
        """Rewards (one per candidate, in the example's candidate order) and the reward source of each example."""
        out: List[Optional[List[float]]] = [None] * len(examples)
        sources: List[Optional[str]] = [None] * len(examples)
        reference: Dict[int, List[float]] = {}   # stored rewards used only for the agreement report
        todo: List[int] = []
        for i, ex in enumerate(examples):
            stored = self._stored(ex)
            if stored is not None:
                if self.mode == "reward_model+agreement":
                    reference[i] = stored
                    todo.append(i)
                else:
                    out[i] = stored
                    sources[i] = precomputed_source(self.precomputed.files[canonical_subset(ex.meta["source"])])
            elif self.reward_model is None:
                source, line = ex.meta.get("source"), ex.meta.get("line_num")
                if self.precomputed.has_subset(source) and ex.meta.get("split") != self.precomputed_split:
                    raise InputError(f"subset {source!r}, raw {ex.meta.get('split')} line {line}: the stored "
                                     f"rewards refer to raw {self.precomputed_split} files only; give "
                                     "--reward_model to score other rows", path=self.precomputed.directory)
                self.precomputed.lookup(source, line)  # raises, naming the subset and line
                raise InputError(f"no stored reward for subset {source!r}, raw line {line}",
                                 path=self.precomputed.directory)  # not reached: lookup raised
            else:
                todo.append(i)
        self.counts["precomputed"] += len(examples) - len(todo)
        if self.counts["precomputed_prompt_mismatch"]:
            logger.warning("%d rows so far got stored rewards whose prompt does not start like ours: is %s the "
                           "reward file of these raw test files?", self.counts["precomputed_prompt_mismatch"],
                           self.precomputed.directory)
        if todo:
            scorer = self.scorer()
            prompts, responses = [], []
            for i in todo:
                for turns, response in zip(examples[i].prefix, examples[i].suffix):
                    prompts.append(turns)
                    responses.append(response)
            flat = scorer.score(prompts, responses, batch_size=self.batch_size)
            pos = 0
            for i in todo:
                n = examples[i].n
                out[i] = [float(r) for r in flat[pos:pos + n]]
                sources[i] = model_source(self.reward_model)
                pos += n
                if i in reference:
                    self._agreement.add(reference[i], out[i])
            self.counts["model"] += len(todo)
        if reference:
            self.counts["agreement_rows"] += len(reference)
        for ex, rewards, source in zip(examples, out, sources):
            _check_finite(ex, rewards, source)
        self.rows_by_source.update(sources)
        return out, sources  # type: ignore[return-value]

    def agreement(self) -> Optional[Dict[str, Optional[float]]]:
        """With both sources (default mode): how the model's scores agree with the stored rewards so far."""
        if self.mode != "reward_model+agreement":
            return None
        return self._agreement.summary()

    def summary(self) -> Dict:
        """What a step reports: the mode, rows per source and (both sources, default mode) the agreement."""
        out: Dict = {"mode": self.mode,
                     "sources": dict(sorted(self.rows_by_source.items(), key=lambda kv: (-kv[1], kv[0])))}
        agreement = self.agreement()
        if agreement is not None:
            out["agreement"] = agreement
        return out

    def log_agreement(self) -> Optional[Dict[str, Optional[float]]]:
        report = self.agreement()
        if report is not None:
            logger.info("reward model %s vs stored rewards %s on %d rows: pairwise ranking agreement %s over %d "
                        "pairs, Pearson r of the reward gaps %s, of the rewards %s (used only for this report; "
                        "every row is scored by the reward model)", self.reward_model, self.precomputed.directory,
                        report["rows"], report["pairwise_agreement"], report["pairs"], report["gap_pearson"],
                        report["reward_pearson"])
        return report

    def scorer(self):
        if self._scorer is None:
            from clha.rm.scoring import load_reward_model  # lazy: torch/transformers only when a model is used

            logger.info("loading reward model %s", self.reward_model)
            self._scorer = load_reward_model(self.reward_model, device=self.device, max_length=self.max_length)
        return self._scorer

    def describe(self) -> str:
        parts = []
        if self.precomputed is not None:
            role = " (agreement report only)" if self.mode == "reward_model+agreement" else ""
            parts.append(f"precomputed={self.precomputed.directory}{role}")
        if self.reward_model is not None:
            parts.append(f"reward_model={self.reward_model}")
        if self.mode == "mixed":
            parts.append("MIXED (--allow_mixed_reward_sources)")
        return ", ".join(parts)


def _check_finite(ex: RankedExample, rewards: Sequence[float], source: Optional[str]) -> None:
    """A NaN or infinite reward (a broken reward model, a damaged reward file) stops the step: written, it would
    sort the candidates arbitrarily and be refused by the trainer."""
    for k, value in enumerate(rewards):
        if not math.isfinite(value):
            raise InputError(f"{source} gave the reward {value} to candidate {k} of this raw pair (subset "
                             f"{ex.meta.get('source')!r}); rewards must be finite numbers", path=ex.meta.get("file"),
                             line=ex.meta.get("line_num"), field=f"reward[{k}]")


def _same_opening(stored: Optional[Dict], ex: RankedExample, width: int = 24) -> bool:
    """Whether a stored row's first prompt turn starts like ours (a guard against a wrong reward folder).

    Only the first characters are compared: the reference lost later paragraphs of turns."""
    try:
        theirs = stored["prefix"][0][0]
    except (KeyError, IndexError, TypeError):
        return True
    ours = ex.prefix[0][0]
    n = min(width, len(theirs), len(ours))
    return theirs[:n] == ours[:n]


def _check_model_path(path: str) -> None:
    """A reward model argument that can only be a local path must exist (hub ids are checked when loading)."""
    p = os.path.expanduser(path)
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise InputError("reward model path is a file, not a model folder", path=path)
        return
    from clha.loading import looks_local   # the one rule for "a path, not a hub id" (imports torch: only here)

    if looks_local(path):
        raise InputError("reward model path does not exist", path=path)

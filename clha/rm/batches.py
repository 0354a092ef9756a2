"""Tokenised reward-model examples and their batches: every candidate encoded by the scorer's own `encode`
(`clha.rm.scoring.HFRewardScorer.encode`: the same text, special tokens and left cut as scoring), collated into one
right-padded tensor with the masks the losses need, and the (length-grouped) batch order of an epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from clha.rm.data import PreferenceExample, _count_by
from clha.rm.losses import ordered_pair_mask

@dataclass
class EncodedExample:
    rows: List[Dict[str, List[int]]]      # one tokenised input per candidate (clha.rm.scoring's format)
    same_text: List[List[bool]]           # [n][n]: candidates i and j have identical texts
    targets: Optional[List[float]]
    subset: str

    @property
    def length(self) -> int:
        return max(len(r["input_ids"]) for r in self.rows)


def encode_examples(scorer, examples: Sequence[PreferenceExample]) -> List[EncodedExample]:
    """Tokenise every candidate with the scorer's own `encode` (same text, special tokens and left cut as
    scoring)."""
    prompts = [ex.prompt for ex in examples for _ in ex.responses]
    responses = [r for ex in examples for r in ex.responses]
    rows = scorer.encode(prompts, responses)
    out, pos = [], 0
    for ex in examples:
        n = ex.n
        out.append(EncodedExample(rows=rows[pos:pos + n],
                                  same_text=[[ex.responses[i] == ex.responses[j] for j in range(n)] for i in range(n)],
                                  targets=list(ex.stored_rewards) if ex.stored_rewards is not None else None,
                                  subset=ex.subset))
        pos += n
    return out


def collate_examples(batch: Sequence[EncodedExample], pad_token_id: int) -> Dict[str, Tensor]:
    """All candidates of the batch in one right-padded tensor, plus the masks the losses need."""
    flat = [row for ex in batch for row in ex.rows]
    width = max(len(r["input_ids"]) for r in flat)
    input_ids = torch.full((len(flat), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(flat), width), dtype=torch.long)
    use_tt = "token_type_ids" in flat[0]
    token_type_ids = torch.zeros((len(flat), width), dtype=torch.long) if use_tt else None
    for i, row in enumerate(flat):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        if use_tt:
            token_type_ids[i, :n] = torch.tensor(row["token_type_ids"])
    n_max = max(len(ex.rows) for ex in batch)
    num_candidates = torch.tensor([len(ex.rows) for ex in batch])
    same = torch.zeros((len(batch), n_max, n_max), dtype=torch.bool)
    targets = torch.zeros((len(batch), n_max))
    target_mask = torch.zeros((len(batch), n_max), dtype=torch.bool)
    flat_index = torch.full((len(batch), n_max), -1, dtype=torch.long)
    pos = 0
    for b, ex in enumerate(batch):
        n = len(ex.rows)
        same[b, :n, :n] = torch.tensor(ex.same_text)
        flat_index[b, :n] = torch.arange(pos, pos + n)
        pos += n
        if ex.targets is not None:
            targets[b, :n] = torch.tensor(ex.targets)
            target_mask[b, :n] = True
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "flat_index": flat_index,
           "pair_mask": ordered_pair_mask(num_candidates, n_max, same), "targets": targets,
           "target_mask": target_mask}
    if use_tt:
        out["token_type_ids"] = token_type_ids
    return out


def epoch_batches(lengths: Sequence[int], subsets: Sequence[str], batch_size: int, epoch: int, seed: int,
                  balance_subsets: bool = False, length_grouping: bool = True, group_factor: int = 50
                  ) -> List[List[int]]:
    """Example indices of one epoch, in batches.

    A seeded permutation (or, with `balance_subsets`, a draw with replacement giving every subset the same total
    probability); with `length_grouping`, chunks of `group_factor` batches are sorted by length before being cut
    into batches, and the batch order is shuffled again, so padding is small but batches stay random.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    if balance_subsets:
        counts = _count_by(subsets, lambda s: s)
        p = np.array([1.0 / (counts[s] * len(counts)) for s in subsets])
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    if length_grouping:
        chunk = batch_size * group_factor
        pieces = []
        for start in range(0, n, chunk):
            part = order[start:start + chunk]
            pieces.append(part[np.argsort([-lengths[i] for i in part], kind="stable")])
        order = np.concatenate(pieces)
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if length_grouping:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

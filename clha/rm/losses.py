"""Reward-model losses, pure functions of tensors: `pairwise_loss` = mean over ordered pairs (i better than j) of
`-log sigmoid(r_i - r_j)` (all pairs when n > 2), `distillation_loss` = squared error to the stored rewards (or to
their pairwise differences), `reward_training_loss` combines them with batch diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clha.rm.config import DISTILL_TARGETS

def ordered_pair_mask(num_candidates: Tensor, n_max: int, same_text: Optional[Tensor] = None) -> Tensor:
    """[B, n, n] bool: True for (i, j) with i < j < num_candidates[b] (i preferred to j), minus identical texts."""
    idx = torch.arange(n_max, device=num_candidates.device)
    present = idx[None, :] < num_candidates[:, None]
    mask = present[:, :, None] & present[:, None, :] & (idx[:, None] < idx[None, :])[None]
    if same_text is not None:
        mask &= ~same_text
    return mask


def _per_example_mean(values: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean of `values` over `mask` within each example (dims after the first), and which examples count."""
    dims = tuple(range(1, values.dim()))
    count = mask.sum(dim=dims)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dims)
    return total / count.clamp(min=1), count > 0


def _mean_over_examples(per_example: Tensor, valid: Tensor, weights: Optional[Tensor]) -> Tensor:
    w = valid.to(per_example.dtype)
    if weights is not None:
        w = w * weights.to(per_example.dtype)
    if float(w.sum()) == 0.0:
        return per_example.sum() * 0.0    # keeps the graph; nothing to learn from this batch
    return (per_example * w).sum() / w.sum()


def pairwise_loss(scores: Tensor, pair_mask: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Bradley-Terry loss: per example, the mean over its valid ordered pairs (i better than j) of
    `-log sigmoid(s_i - s_j)`; then the (weighted) mean over examples that have a pair.

    `scores` [B, n], `pair_mask` [B, n, n] (see `ordered_pair_mask`). For n = 2 this is
    `mean_b -log sigmoid(s_b0 - s_b1)`.
    """
    diff = scores[:, :, None] - scores[:, None, :]
    per_example, valid = _per_example_mean(-F.logsigmoid(diff), pair_mask)
    return _mean_over_examples(per_example, valid, weights)


def distillation_loss(scores: Tensor, targets: Tensor, target_mask: Tensor, pair_mask: Optional[Tensor] = None,
                      mode: str = "reward", weights: Optional[Tensor] = None) -> Tensor:
    """Squared error to stored rewards, per example mean, then mean over examples that have targets.

    mode 'reward': `(s_k - t_k)^2` over candidates with a target (`target_mask` [B, n]).
    mode 'margin': `((s_i - s_j) - (t_i - t_j))^2` over the pairs of `pair_mask` whose two candidates have targets.
    """
    if mode == "reward":
        per_example, valid = _per_example_mean((scores - targets) ** 2, target_mask)
    elif mode == "margin":
        if pair_mask is None:
            raise ValueError("mode 'margin' needs pair_mask")
        both = pair_mask & target_mask[:, :, None] & target_mask[:, None, :]
        err = (scores[:, :, None] - scores[:, None, :]) - (targets[:, :, None] - targets[:, None, :])
        per_example, valid = _per_example_mean(err ** 2, both)
    else:
        raise ValueError(f"unknown distillation mode {mode!r}; expected one of {DISTILL_TARGETS}")
    return _mean_over_examples(per_example, valid, weights)


@dataclass
class RewardLoss:
    loss: Tensor
    pairwise: Tensor
    distill: Tensor
    num_pairs: int
    num_correct: float      # ties count one half
    margin: float           # mean s_better - s_worse over valid pairs


def reward_training_loss(scores: Tensor, pair_mask: Tensor, targets: Optional[Tensor] = None,
                         target_mask: Optional[Tensor] = None, pairwise_weight: float = 1.0,
                         distill_weight: float = 0.0, distill_target: str = "reward",
                         weights: Optional[Tensor] = None) -> RewardLoss:
    """`pairwise_weight * pairwise_loss + distill_weight * distillation_loss`, with batch diagnostics."""
    zero = scores.sum() * 0.0
    pair = pairwise_loss(scores, pair_mask, weights) if pairwise_weight > 0 else zero
    dist = zero
    if distill_weight > 0 and targets is not None and target_mask is not None and bool(target_mask.any()):
        dist = distillation_loss(scores, targets, target_mask, pair_mask, distill_target, weights)
    with torch.no_grad():
        diff = (scores[:, :, None] - scores[:, None, :])[pair_mask].float()
        num_pairs = int(diff.numel())
        correct = float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        margin = float(diff.mean()) if num_pairs else float("nan")
    return RewardLoss(loss=pairwise_weight * pair + distill_weight * dist, pairwise=pair.detach(),
                      distill=dist.detach(), num_pairs=num_pairs, num_correct=correct, margin=margin)

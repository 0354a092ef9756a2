"""Training objectives: CLHA and the SFT / PRO / RRHF / DPO baselines, as pure functions of tensors.

Every function takes sequence scores of shape ``[B, n]`` with the candidates in ranked order (index 0 is the
best) and returns a :class:`LossOutput` with the same fields, so a trainer logs every method the same way.
Nothing here touches a model, an accelerator or a file.

Notation (``docs/method.md``): ``s[b, k]`` is the MEAN log-probability of candidate ``k``'s response tokens,
``sum_logps[b, k]`` their SUM, ``r[b, k]`` its reward, ``sft_index[b]`` the candidate to imitate.

Diagnostics shared by all methods (detached tensors; call :meth:`LossOutput.metrics` for plain floats):

- ``num_valid_pairs``: pairs ``(k, l)``, ``k < l``, that take part in the method's ranking term
  (CLHA: the pairs whose reward gap exceeds ``reward_gap_threshold``; PRO: all pairs; RRHF: pairs with different
  rewards; DPO: ``(0, k)`` for every ``k >= 1``; SFT: none).
- ``masked_pair_fraction``: ``1 - num_valid_pairs / (B * n * (n - 1) / 2)``; 0 when ``n == 1``.
- ``num_correct_pairs`` / ``rank_accuracy``: valid pairs in which the better-ranked candidate scores higher
  (strictly); ``rank_accuracy = num_correct_pairs / num_valid_pairs``. **When no pair is valid it is NaN**
  ("undefined", not 0 or 1): aggregate over steps or ranks as ``sum(num_correct_pairs) / sum(num_valid_pairs)``.
- ``chosen_logps`` / ``rejected_logps``: batch mean of ``s[:, 0]`` and of ``s[:, 1:]``; ``margin`` their
  difference (0 when ``n == 1``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = [
    "LossOutput", "clha_loss", "sft_loss", "pro_loss", "rrhf_loss", "dpo_loss", "compute_loss",
    "LOSS_REGISTRY", "LOSS_TYPES", "LOSS_DEFAULTS",
]


@dataclass
class LossOutput:
    loss: Tensor                     # what to back-propagate; == rank_loss + sft_loss
    rank_loss: Tensor                # the ranking / preference term
    sft_loss: Tensor                 # the imitation term, already weighted
    num_valid_pairs: Tensor          # long, 0-dim
    masked_pair_fraction: Tensor     # float, 0-dim
    num_correct_pairs: Tensor        # long, 0-dim
    rank_accuracy: Tensor            # float, 0-dim; NaN when num_valid_pairs == 0
    chosen_logps: Tensor             # mean of s[:, 0]
    rejected_logps: Tensor           # mean of s[:, 1:]
    margin: Tensor                   # chosen_logps - rejected_logps
    extra: Dict[str, Tensor] = field(default_factory=dict)   # method-specific diagnostics (e.g. DPO rewards)

    def metrics(self) -> Dict[str, float]:
        """Plain floats for logging (one host sync per call)."""
        out = {name: float(getattr(self, name)) for name in (
            "loss", "rank_loss", "sft_loss", "num_valid_pairs", "masked_pair_fraction", "num_correct_pairs",
            "rank_accuracy", "chosen_logps", "rejected_logps", "margin")}
        out.update({name: float(value) for name, value in self.extra.items()})
        return out


# ----------------------------------------------------------------------------------------------- helpers

# Value checks that make the host wait for the device (sft_index in range) run on CPU tensors always, on a GPU
# only with CLHA_DEBUG_CHECKS=1; shape checks always run.
DEBUG_CHECKS = os.environ.get("CLHA_DEBUG_CHECKS", "") not in ("", "0")


def _check_inputs(scores: Tensor, rewards: Optional[Tensor], sft_index: Optional[Tensor]) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [B, n], got {tuple(scores.shape)}")
    if rewards is not None and rewards.shape != scores.shape:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} != scores shape {tuple(scores.shape)}")
    if sft_index is not None:
        if sft_index.shape != scores.shape[:1]:
            raise ValueError(f"sft_index must have shape [B]={tuple(scores.shape[:1])}, got {tuple(sft_index.shape)}")
        if (sft_index.numel() and (DEBUG_CHECKS or sft_index.device.type == "cpu")
                and (int(sft_index.min()) < 0 or int(sft_index.max()) >= scores.shape[1])):
            raise ValueError(f"sft_index out of range [0, {scores.shape[1]})")


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """values[b, index[b]] for every b."""
    return values.gather(1, index.long().view(-1, 1).to(values.device)).squeeze(1)


def _pairs(n: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """All pairs (k, l) with k < l, as index tensors, with their rank distance d = l - k."""
    k, l = torch.triu_indices(n, n, offset=1, device=device)
    return k, l, l - k


def _diagnostics(pair_diff: Tensor, valid: Tensor, mean_logps: Tensor) -> Dict[str, Tensor]:
    """pair_diff[b, p] = score of the better candidate minus the worse; valid[b, p] bool."""
    with torch.no_grad():
        B, n = mean_logps.shape
        num_valid = valid.sum()
        total_pairs = B * n * (n - 1) // 2
        correct = (valid & (pair_diff > 0)).sum()
        dtype = mean_logps.dtype if mean_logps.is_floating_point() else torch.float32
        accuracy = torch.where(num_valid > 0, correct.to(dtype) / num_valid.clamp_min(1).to(dtype),
                               torch.full((), float("nan"), dtype=dtype, device=mean_logps.device))
        masked = (1.0 - num_valid.to(dtype) / total_pairs) if total_pairs else \
            torch.zeros((), dtype=dtype, device=mean_logps.device)
        chosen = mean_logps[:, 0].mean() if B else torch.zeros((), device=mean_logps.device)
        rejected = mean_logps[:, 1:].mean() if n > 1 and B else chosen
        return dict(num_valid_pairs=num_valid, masked_pair_fraction=masked, num_correct_pairs=correct,
                    rank_accuracy=accuracy, chosen_logps=chosen.detach(), rejected_logps=rejected.detach(),
                    margin=(chosen - rejected).detach())


def _sft_nll_sum(sum_logps: Tensor, sft_index: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """-(1/B) * sum_b gate_b * sum_logps[b, sft_b]  (token log-probs summed, not averaged)."""
    picked = _pick(sum_logps, sft_index)
    if gate is not None:
        # where(), not multiplication: a closed gate contributes an exact zero (and a zero gradient) even if the
        # score is not finite.
        picked = torch.where(gate, picked, torch.zeros_like(picked))
    return -picked.sum() / max(sum_logps.shape[0], 1)


def _output(rank: Tensor, sft: Tensor, diag: Dict[str, Tensor], extra: Optional[Dict[str, Tensor]] = None):
    return LossOutput(loss=rank + sft, rank_loss=rank, sft_loss=sft, extra=extra or {}, **diag)


# ----------------------------------------------------------------------------------------------- CLHA

def clha_loss(seq_mean_logps: Tensor, seq_sum_logps: Tensor, rewards: Tensor, sft_index: Tensor,
              rank_margin: float = 3.0, reward_gap_threshold: float = 3.0, sft_weight: float = 0.05,
              sft_reward_threshold: float = 0.0) -> LossOutput:
    """CLHA: rescoring-masked pairwise contrastive loss + reward-gated SFT loss (docs/method.md, "Loss").

    For each rank distance d = 1..n-1, over the pairs (k, k+d) of the whole batch with
    |r_k - r_{k+d}| > reward_gap_threshold:
        L_d = sum max(0, d * rank_margin - (s_k - s_{k+d})) / #valid pairs at distance d   (0 if none)
    rank_loss = sum_d L_d
    sft_loss  = sft_weight * (n-1)^2 * -(1/B) * sum_b 1[r_{b,sft} > sft_reward_threshold] * sum_logps[b, sft]
    loss      = rank_loss + sft_loss
    Masked pairs and closed SFT gates contribute exact zeros and zero gradients.
    """
    s = seq_mean_logps
    _check_inputs(s, rewards, sft_index)
    if seq_sum_logps.shape != s.shape:
        raise ValueError("seq_sum_logps and seq_mean_logps must have the same shape")
    B, n = s.shape
    rewards = rewards.to(device=s.device, dtype=s.dtype)
    k, l, d = _pairs(n, s.device)
    diff = s[:, k] - s[:, l]                                                   # [B, P]
    valid = (rewards[:, k] - rewards[:, l]).abs() > reward_gap_threshold      # [B, P]
    hinge = torch.clamp_min(d.to(s.dtype) * rank_margin - diff, 0.0)
    hinge = torch.where(valid, hinge, torch.zeros_like(hinge))
    # per rank distance: summed hinges and valid-pair counts (index_add, not boolean indexing: no host sync);
    # with no valid pair the numerator is an exact 0 and the count is clamped to 1
    hinge_by_d = s.new_zeros(n).index_add(0, d, hinge.sum(0))
    count_by_d = s.new_zeros(n).index_add(0, d, valid.sum(0).to(s.dtype))
    rank = (hinge_by_d[1:] / count_by_d[1:].clamp_min(1)).sum() if n > 1 else s.new_zeros(())
    gate = _pick(rewards, sft_index) > sft_reward_threshold
    sft = sft_weight * (n - 1) ** 2 * _sft_nll_sum(seq_sum_logps, sft_index, gate)
    diag = _diagnostics(diff, valid, s)
    return _output(rank, sft, diag, {"sft_gate_open_fraction": gate.to(s.dtype).mean() if B else s.new_zeros(())})


# ----------------------------------------------------------------------------------------------- baselines

def sft_loss(seq_mean_logps: Tensor, seq_sum_logps: Optional[Tensor] = None, rewards: Optional[Tensor] = None,
             sft_index: Optional[Tensor] = None) -> LossOutput:
    """SFT: token-mean NLL of the sft_index candidate, averaged over the batch: -(1/B) sum_b s[b, sft_b].

    (The mean is per sequence, then over the batch, like RRHF's NLL term.) Rewards are not used.
    Diagnostics count every pair (k < l) as ranked by position, for comparison with the other methods.
    """
    s = seq_mean_logps
    if sft_index is None:
        sft_index = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    _check_inputs(s, rewards, sft_index)
    k, l, _ = _pairs(s.shape[1], s.device)
    nll = -_pick(s, sft_index).sum() / max(s.shape[0], 1)
    no_pairs = torch.zeros(s.shape[0], k.numel(), dtype=torch.bool, device=s.device)
    diag = _diagnostics(s[:, k] - s[:, l], no_pairs, s)
    return _output(s.new_zeros(()), nll, diag)


def pro_loss(seq_mean_logps: Tensor, seq_sum_logps: Tensor, rewards: Tensor, sft_index: Tensor,
             temperature: float = 1.0, sft_weight: float = 0.05) -> LossOutput:
    """PRO (Song et al.) with the reward-difference temperatures of the reference code.

    With s' = s / temperature, T_ki = r_k - r_i (i > k) and T_kk = max_{i>k} T_ki:
        L_k = -log( exp(s'_k T_kk) / (exp(s'_k T_kk) + sum_{i>k} exp(s'_i T_ki)) ),
    rank_loss = sum_{k=0}^{n-2} mean_b L_k   (computed with logsumexp),
    sft_loss  = sft_weight * (n-1)^2 * -(1/B) sum_b sum_logps[b, sft]   (no reward gate).
    """
    s = seq_mean_logps
    _check_inputs(s, rewards, sft_index)
    B, n = s.shape
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    rewards = rewards.to(device=s.device, dtype=s.dtype)
    scaled = s / temperature
    rank = s.new_zeros(())
    for k in range(n - 1):
        neg_t = rewards[:, k:k + 1] - rewards[:, k + 1:]                      # [B, n-k-1]  T_ki
        pos_t = neg_t.max(dim=1).values                                       # [B]         T_kk
        pos = scaled[:, k] * pos_t
        logits = torch.cat([pos.unsqueeze(1), scaled[:, k + 1:] * neg_t], dim=1)
        rank = rank + (torch.logsumexp(logits, dim=1) - pos).mean()
    sft = sft_weight * (n - 1) ** 2 * _sft_nll_sum(seq_sum_logps, sft_index)
    k, l, _ = _pairs(n, s.device)
    diag = _diagnostics(s[:, k] - s[:, l], torch.ones(B, k.numel(), dtype=torch.bool, device=s.device), s)
    return _output(rank, sft, diag)


def rrhf_loss(seq_mean_logps: Tensor, seq_sum_logps: Tensor, rewards: Tensor, sft_index: Tensor,
              nll_weight: float = 1.0) -> LossOutput:
    """RRHF (Yuan et al.): p_i = mean log-prob of candidate i;
        rank_loss = (1/B) sum_b sum_{r_i < r_j} max(0, p_i - p_j)
        sft_loss  = nll_weight * -(1/B) sum_b p_{b, sft}     (token-mean NLL of the best candidate; sft_index is
                                                              the best one in re-ranked data)
    (``nll_weight`` is not called ``sft_weight`` on purpose: CLHA's/PRO's ``sft_weight`` of a shared config must
    not rescale RRHF's NLL term.)
    """
    s = seq_mean_logps
    _check_inputs(s, rewards, sft_index)
    B, n = s.shape
    rewards = rewards.to(device=s.device, dtype=s.dtype)
    k, l, _ = _pairs(n, s.device)
    # Orient every pair (k, l) so that `better` has the higher reward; ties take no part.
    rk, rl = rewards[:, k], rewards[:, l]
    valid = rk != rl
    better_minus_worse = torch.where(rk > rl, s[:, k] - s[:, l], s[:, l] - s[:, k])
    hinge = torch.clamp_min(-better_minus_worse, 0.0)                         # max(0, p_worse - p_better)
    hinge = torch.where(valid, hinge, torch.zeros_like(hinge))
    rank = hinge.sum() / max(B, 1)
    sft = -nll_weight * _pick(s, sft_index).sum() / max(B, 1)
    diag = _diagnostics(better_minus_worse, valid, s)
    return _output(rank, sft, diag)


def dpo_loss(policy_sum_logps: Tensor, ref_sum_logps: Tensor, beta: float = 0.1,
             rewards: Optional[Tensor] = None, sft_index: Optional[Tensor] = None,
             policy_mean_logps: Optional[Tensor] = None) -> LossOutput:
    """DPO (Rafailov et al.) on ranked candidates: index 0 is chosen, every k >= 1 is rejected.

    With implicit rewards h_k = beta * (policy_sum_logps[:, k] - ref_sum_logps[:, k]):
        rank_loss = mean over b and k >= 1 of -log sigmoid(h_0 - h_k)      (the usual DPO loss when n == 2)
    sft_loss is 0. The ranking diagnostics compare implicit rewards; chosen/rejected_logps are taken from
    ``policy_mean_logps`` when given (compute_loss passes it), else from the summed log-probs.
    """
    _check_inputs(policy_sum_logps, rewards, sft_index)
    if ref_sum_logps is None:
        raise ValueError("dpo_loss needs ref_sum_logps (log-probs of the frozen reference model)")
    ref = ref_sum_logps.to(device=policy_sum_logps.device, dtype=policy_sum_logps.dtype).detach()
    if ref.shape != policy_sum_logps.shape:
        raise ValueError("ref_sum_logps must have the same shape as policy_sum_logps")
    B, n = policy_sum_logps.shape
    h = beta * (policy_sum_logps - ref)                                       # [B, n]
    logits = h[:, :1] - h[:, 1:]                                              # [B, n-1]
    rank = -torch.nn.functional.logsigmoid(logits).mean() if logits.numel() else policy_sum_logps.new_zeros(())
    k, l, _ = _pairs(n, policy_sum_logps.device)
    valid = (k == 0).expand(B, -1)
    shown = policy_mean_logps if policy_mean_logps is not None else policy_sum_logps
    diag = _diagnostics(h[:, k] - h[:, l], valid, shown)
    extra = {"chosen_reward": h[:, 0].mean().detach(),
             "rejected_reward": h[:, 1:].mean().detach() if n > 1 else h[:, 0].mean().detach()}
    return _output(rank, policy_sum_logps.new_zeros(()), diag, extra)


# ----------------------------------------------------------------------------------------------- dispatch

def _adapt_clha(scores, rewards, sft_index, ref_sum_logps, **h):
    return clha_loss(scores.mean_logps, scores.sum_logps, rewards, sft_index, **h)


def _adapt_sft(scores, rewards, sft_index, ref_sum_logps, **h):
    return sft_loss(scores.mean_logps, scores.sum_logps, rewards, sft_index, **h)


def _adapt_pro(scores, rewards, sft_index, ref_sum_logps, **h):
    return pro_loss(scores.mean_logps, scores.sum_logps, rewards, sft_index, **h)


def _adapt_rrhf(scores, rewards, sft_index, ref_sum_logps, **h):
    return rrhf_loss(scores.mean_logps, scores.sum_logps, rewards, sft_index, **h)


def _adapt_dpo(scores, rewards, sft_index, ref_sum_logps, **h):
    return dpo_loss(scores.sum_logps, ref_sum_logps, rewards=rewards, sft_index=sft_index,
                    policy_mean_logps=scores.mean_logps, **h)


# name -> (adapter, the loss function whose keyword hyperparameters it accepts)
LOSS_REGISTRY: Dict[str, tuple[Callable[..., LossOutput], Callable[..., LossOutput]]] = {
    "clha": (_adapt_clha, clha_loss),
    "sft": (_adapt_sft, sft_loss),
    "pro": (_adapt_pro, pro_loss),
    "rrhf": (_adapt_rrhf, rrhf_loss),
    "dpo": (_adapt_dpo, dpo_loss),
}
LOSS_TYPES = tuple(LOSS_REGISTRY)
NEEDS_REFERENCE_MODEL = frozenset({"dpo"})

_DATA_ARGS = {"seq_mean_logps", "seq_sum_logps", "rewards", "sft_index", "policy_sum_logps", "ref_sum_logps",
              "policy_mean_logps"}


def _hyperparameters(fn) -> set:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name not in _DATA_ARGS and p.default is not inspect.Parameter.empty}


_ALL_HYPERPARAMETERS = set().union(*(_hyperparameters(fn) for _, fn in LOSS_REGISTRY.values()))


def _defaults() -> Dict[str, Any]:
    """Default of every loss hyperparameter, read from the loss functions' signatures: the one place the defaults
    are written (`clha.config.TrainConfig` takes its loss defaults from here). A keyword that two losses share
    must have the same default."""
    out: Dict[str, Any] = {}
    for _, fn in LOSS_REGISTRY.values():
        for name, p in inspect.signature(fn).parameters.items():
            if name in _DATA_ARGS or p.default is inspect.Parameter.empty:
                continue
            if out.setdefault(name, p.default) != p.default:
                raise AssertionError(f"loss hyperparameter {name!r} has two defaults: {out[name]} and {p.default}")
    return out


LOSS_DEFAULTS: Dict[str, Any] = _defaults()


def compute_loss(loss_type: str, scores: Any, rewards: Tensor, sft_index: Tensor,
                 ref_sum_logps: Optional[Tensor] = None, **hyperparameters) -> LossOutput:
    """Dispatch by name (``LOSS_TYPES``). ``scores`` is a ``CandidateScores`` (anything with ``sum_logps`` and
    ``mean_logps`` of shape [B, n]).

    ``hyperparameters`` may hold the whole training config's loss settings: those another loss type uses
    (e.g. ``beta`` for CLHA) are ignored, a name no loss knows raises ``TypeError`` (catches typos).
    """
    try:
        adapter, fn = LOSS_REGISTRY[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}") from None
    unknown = set(hyperparameters) - _ALL_HYPERPARAMETERS
    if unknown:
        raise TypeError(f"unknown loss hyperparameter(s) {sorted(unknown)}; known: {sorted(_ALL_HYPERPARAMETERS)}")
    accepted = _hyperparameters(fn)
    if loss_type in NEEDS_REFERENCE_MODEL and ref_sum_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs ref_sum_logps")
    used = {name: value for name, value in hyperparameters.items() if name in accepted}
    return adapter(scores, rewards, sft_index, ref_sum_logps, **used)

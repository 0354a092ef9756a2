"""Loss functions against values worked out by hand (the arithmetic is in the comments)."""

import math
from types import SimpleNamespace

import pytest
import torch

from clha.losses import (LOSS_TYPES, LossOutput, clha_loss, compute_loss, dpo_loss, pro_loss, rrhf_loss,
                         sft_loss)


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def close(a, b, tol=1e-9):
    return abs(float(torch.as_tensor(a).detach()) - float(b)) < tol


# ------------------------------------------------------------------------------------------------ CLHA, n = 2

def test_clha_n2_one_pair_masked_by_reward_gap():
    s = t([[-1.0, -2.0], [-1.5, -1.0]], grad=True)
    sums = t([[-10.0, -30.0], [-6.0, -4.0]], grad=True)
    r = t([[5.0, 1.0], [2.0, 0.0]])
    idx = torch.tensor([0, 0])
    out = clha_loss(s, sums, r, idx, rank_margin=3.0, reward_gap_threshold=3.0, sft_weight=0.05)
    # b0 pair (0,1): |5-1| = 4 > 3 valid;   b1 pair: |2-0| = 2 <= 3 masked.
    # L_1 = max(0, 1*3 - (-1 - -2)) / 1 = max(0, 3 - 1) = 2
    assert close(out.rank_loss, 2.0)
    # SFT gate: r[0,0] = 5 > 0 and r[1,0] = 2 > 0, both open; L_sft = -(1/2)(-10 + -6) = 8; w = 0.05 * (2-1)^2
    assert close(out.sft_loss, 0.05 * 8.0)
    assert close(out.loss, 2.4)
    assert int(out.num_valid_pairs) == 1
    assert close(out.masked_pair_fraction, 0.5)
    assert close(out.rank_accuracy, 1.0)                 # s00 - s01 = 1 > 0
    assert close(out.chosen_logps, (-1.0 - 1.5) / 2)     # -1.25
    assert close(out.rejected_logps, (-2.0 - 1.0) / 2)   # -1.5
    assert close(out.margin, 0.25)
    out.loss.backward()
    # hinge active for b0: d/ds00 = -1, d/ds01 = +1 (count 1); b1 masked: exactly zero
    assert s.grad.tolist() == [[-1.0, 1.0], [0.0, 0.0]]
    # d/dsum[b, 0] = -w / B = -0.05 / 2 = -0.025; non-sft candidates get nothing
    assert torch.allclose(sums.grad, t([[-0.025, 0.0], [-0.025, 0.0]]))


def test_clha_n2_margin_already_met_gives_zero_hinge():
    s = t([[-1.0, -5.0]], grad=True)
    out = clha_loss(s, t([[-3.0, -9.0]]), t([[4.0, 0.0]]), torch.tensor([0]))
    # valid (gap 4 > 3), but s0 - s1 = 4 >= 3 so max(0, 3 - 4) = 0
    assert close(out.rank_loss, 0.0)
    assert close(out.sft_loss, 0.05 * 3.0)              # -(1/1)(-3) * 0.05
    out.loss.backward()
    assert s.grad.tolist() == [[0.0, 0.0]]


# ------------------------------------------------------------------------------------------------ CLHA, n = 3

def test_clha_n3_distances_masks_and_gate():
    s = t([[-1.0, -2.0, -4.0], [-2.0, -3.5, -3.0]], grad=True)
    sums = t([[-5.0, -8.0, -20.0], [-12.0, -9.0, -30.0]], grad=True)
    r = t([[6.0, 2.0, 1.0], [0.5, -1.0, -5.0]])
    idx = torch.tensor([0, 1])
    out = clha_loss(s, sums, r, idx)
    # b0: (0,1) |6-2|=4 valid, (1,2) |2-1|=1 masked, (0,2) |6-1|=5 valid
    # b1: (0,1) |0.5+1|=1.5 masked, (1,2) |-1+5|=4 valid, (0,2) |0.5+5|=5.5 valid
    # d=1: b0(0,1): 3 - (-1+2) = 2;  b1(1,2): 3 - (-3.5+3) = 3.5   -> L_1 = (2 + 3.5) / 2 = 2.75
    # d=2: b0(0,2): 6 - (-1+4) = 3;  b1(0,2): 6 - (-2+3) = 5       -> L_2 = (3 + 5) / 2 = 4
    assert close(out.rank_loss, 6.75)
    # SFT: b0 sft=0, r=6>0 open, sum=-5; b1 sft=1, r=-1 closed -> L_sft = -(1/2)(-5) = 2.5; w = 0.05*(3-1)^2 = 0.2
    assert close(out.sft_loss, 0.5)
    assert close(out.loss, 7.25)
    assert int(out.num_valid_pairs) == 4
    assert close(out.masked_pair_fraction, 2 / 6)
    # diffs of valid pairs: 1, -0.5, 3, 1 -> 3 of 4 correct
    assert int(out.num_correct_pairs) == 3
    assert close(out.rank_accuracy, 0.75)
    assert close(out.extra["sft_gate_open_fraction"], 0.5)
    out.loss.backward()
    # every valid hinge is active and divided by its distance's count (2):
    # s00: -1/2 (d1) - 1/2 (d2) = -1;  s01: +1/2;  s02: +1/2
    # s10: -1/2 (d2);  s11: -1/2 (d1);  s12: +1/2 (d1) + 1/2 (d2) = 1
    assert torch.allclose(s.grad, t([[-1.0, 0.5, 0.5], [-0.5, -0.5, 1.0]]))
    # sum grads: b0 sft (open): -0.2/2 = -0.1; b1 gate closed -> 0
    assert torch.allclose(sums.grad, t([[-0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_clha_n3_candidate_in_masked_pairs_only_gets_exactly_zero_gradient():
    s = t([[-1.0, -1.2, -1.1]], grad=True)
    # (0,1) |6-4|=2 masked, (1,2) |4-1|=3 not > 3 masked, (0,2) |6-1|=5 valid
    out = clha_loss(s, t([[-4.0, -5.0, -6.0]]), t([[6.0, 4.0, 1.0]]), torch.tensor([0]))
    # L_1 = 0 (no valid pair at d=1); L_2 = max(0, 6 - (-1 + 1.1)) / 1 = 5.9
    assert close(out.rank_loss, 5.9)
    out.rank_loss.backward()
    assert s.grad[0, 1].item() == 0.0                  # exactly zero, not just small
    assert s.grad.tolist() == [[-1.0, 0.0, 1.0]]


def test_clha_all_pairs_masked_and_gate_closed():
    s = t([[-1.0, -2.0], [-0.5, -3.0]], grad=True)
    sums = t([[-10.0, -20.0], [-5.0, -30.0]], grad=True)
    r = t([[-1.0, -2.0], [-0.5, -0.7]])               # gaps 1 and 0.2: all masked; best rewards < 0: gates closed
    out = clha_loss(s, sums, r, torch.tensor([0, 0]))
    assert out.rank_loss.item() == 0.0
    assert out.sft_loss.item() == 0.0
    assert out.loss.item() == 0.0
    assert torch.isfinite(out.loss)
    assert int(out.num_valid_pairs) == 0
    assert close(out.masked_pair_fraction, 1.0)
    assert math.isnan(float(out.rank_accuracy))        # documented: undefined without a valid pair
    out.loss.backward()
    assert s.grad.abs().sum().item() == 0.0
    assert sums.grad.abs().sum().item() == 0.0


def test_clha_all_pairs_masked_sft_still_trains():
    s = t([[-1.0, -2.0]], grad=True)
    sums = t([[-10.0, -20.0]], grad=True)
    out = clha_loss(s, sums, t([[2.0, 1.0]]), torch.tensor([0]))
    assert out.rank_loss.item() == 0.0 and torch.isfinite(out.loss)
    assert close(out.loss, 0.05 * 10.0)
    out.loss.backward()
    assert s.grad.abs().sum().item() == 0.0
    assert torch.allclose(sums.grad, t([[-0.05, 0.0]]))


def test_clha_sft_reward_threshold_and_separate_tau_margin():
    s = t([[-1.0, -2.0]])
    # tau=0.5 makes the pair valid (gap 1); m=2: max(0, 2 - 1) = 1; threshold 1.5 closes the gate (r=1.2)
    out = clha_loss(s, t([[-10.0, -20.0]]), t([[1.2, 0.2]]), torch.tensor([0]),
                    rank_margin=2.0, reward_gap_threshold=0.5, sft_reward_threshold=1.5)
    assert close(out.rank_loss, 1.0) and out.sft_loss.item() == 0.0


def test_clha_metrics_are_plain_floats():
    out = clha_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), t([[4.0, 0.0]]), torch.tensor([0]))
    m = out.metrics()
    assert isinstance(out, LossOutput)
    assert all(isinstance(v, float) for v in m.values())
    assert m["num_valid_pairs"] == 1.0


def test_clha_rejects_bad_shapes():
    with pytest.raises(ValueError):
        clha_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), t([[1.0, 2.0, 3.0]]), torch.tensor([0]))
    with pytest.raises(ValueError):
        clha_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), t([[1.0, 2.0]]), torch.tensor([2]))


# ------------------------------------------------------------------------------------------------ baselines

def test_sft_loss_token_mean_nll():
    s = t([[-1.0, -2.0], [-3.0, -0.5]], grad=True)
    out = sft_loss(s, None, None, torch.tensor([0, 1]))
    # -(1/2)(-1 + -0.5) = 0.75
    assert close(out.loss, 0.75) and close(out.sft_loss, 0.75) and out.rank_loss.item() == 0.0
    assert int(out.num_valid_pairs) == 0
    out.loss.backward()
    assert s.grad.tolist() == [[-0.5, 0.0], [0.0, -0.5]]


def test_pro_n2_and_no_sft_gate():
    s = t([[-1.0, -2.0]])
    sums = t([[-10.0, -20.0]])
    # T_01 = 3-1 = 2 = T_00; L_0 = -log(e^{-1*2} / (e^{-2} + e^{-2*2})) = log(1 + e^{-2})
    out = pro_loss(s, sums, t([[3.0, 1.0]]), torch.tensor([0]))
    assert close(out.rank_loss, math.log(1 + math.exp(-2)))          # 0.126928...
    assert close(out.sft_loss, 0.05 * 10.0)                           # w = 0.05 * 1, -(-10)
    # negative rewards, same differences: same rank loss and the SFT term is NOT gated
    out2 = pro_loss(s, sums, t([[-1.0, -3.0]]), torch.tensor([0]))
    assert close(out2.rank_loss, out.rank_loss) and close(out2.sft_loss, 0.5)


def test_pro_n3_and_temperature():
    s = t([[-1.0, -2.0, -3.0]])
    r = t([[3.0, 1.0, 0.0]])
    out = pro_loss(s, t([[-4.0, -6.0, -9.0]]), r, torch.tensor([0]))
    # k=0: T01=2, T02=3, T00=3: logits (-1*3, -2*2, -3*3) = (-3, -4, -9): L_0 = log(1 + e^-1 + e^-6)
    # k=1: T12=1=T11: logits (-2, -3): L_1 = log(1 + e^-1)
    expected = math.log(1 + math.exp(-1) + math.exp(-6)) + math.log(1 + math.exp(-1))   # 0.628334...
    assert close(out.rank_loss, expected)
    assert close(out.sft_loss, 0.05 * 4 * 4.0)                       # w = 0.05*(3-1)^2, -(-4)
    assert int(out.num_valid_pairs) == 3
    # temperature 2 halves the scores: n=2, s/T = (-0.5, -1), T_00 = 2: logits (-1, -2): log(1 + e^-1)
    out_t = pro_loss(t([[-1.0, -2.0]]), t([[0.0, 0.0]]), t([[3.0, 1.0]]), torch.tensor([0]), temperature=2.0)
    assert close(out_t.rank_loss, math.log(1 + math.exp(-1)))


def test_rrhf_n3_with_misranked_pairs_and_ties():
    s = t([[-1.0, -0.5, -3.0]], grad=True)
    r = t([[3.0, 1.0, 2.0]])
    out = rrhf_loss(s, t([[0.0, 0.0, 0.0]]), r, torch.tensor([0]))
    # r1<r0: max(0, p1-p0) = max(0, 0.5) = 0.5; r2<r0: max(0, -3+1) = 0; r1<r2: max(0, -0.5+3) = 2.5
    assert close(out.rank_loss, 3.0)
    assert close(out.sft_loss, 1.0)                                   # -p0
    assert close(out.loss, 4.0)
    assert int(out.num_valid_pairs) == 3 and int(out.num_correct_pairs) == 1
    out.loss.backward()
    # d/dp0 = -1 (pair 0>1) - 1 (nll) = -2; d/dp1 = +1 (vs 0) + 1 (vs 2) = 2; d/dp2 = -1 (vs 1)
    assert s.grad.tolist() == [[-2.0, 2.0, -1.0]]
    tie = rrhf_loss(t([[-1.0, -0.5]]), t([[0.0, 0.0]]), t([[1.0, 1.0]]), torch.tensor([0]))
    assert tie.rank_loss.item() == 0.0 and int(tie.num_valid_pairs) == 0


def test_dpo_n2():
    pol = t([[-10.0, -12.0]], grad=True)
    ref = t([[-11.0, -11.0]])
    out = dpo_loss(pol, ref, beta=0.1)
    # h0 = 0.1*(-10+11) = 0.1; h1 = 0.1*(-12+11) = -0.1; -log sigmoid(0.2) = log(1 + e^-0.2)
    assert close(out.loss, math.log(1 + math.exp(-0.2)))            # 0.598139...
    assert out.sft_loss.item() == 0.0
    assert close(out.extra["chosen_reward"], 0.1) and close(out.extra["rejected_reward"], -0.1)
    assert close(out.rank_accuracy, 1.0)
    out.loss.backward()
    # d/dpol0 = -beta * (1 - sigmoid(0.2)); d/dpol1 = +beta * (1 - sigmoid(0.2))
    g = 0.1 * (1 - 1 / (1 + math.exp(-0.2)))
    assert torch.allclose(pol.grad, t([[-g, g]]))


# ------------------------------------------------------------------------------------------------ dispatch

def _scores():
    return SimpleNamespace(mean_logps=t([[-1.0, -2.0]]), sum_logps=t([[-10.0, -20.0]]),
                           token_counts=torch.tensor([[10, 10]]))


def test_compute_loss_dispatches_every_type_with_uniform_fields():
    sc, r, idx = _scores(), t([[4.0, 0.0]]), torch.tensor([0])
    ref = t([[-11.0, -19.0]])
    fields = None
    for name in LOSS_TYPES:
        out = compute_loss(name, sc, r, idx, ref_sum_logps=ref, rank_margin=3.0, beta=0.1, temperature=1.0,
                           sft_weight=0.05)
        assert torch.isfinite(out.loss)
        names = set(out.metrics()) - set(out.extra)
        fields = fields or names
        assert names == fields
    clha = compute_loss("clha", sc, r, idx, beta=0.5)                  # beta belongs to DPO: ignored by CLHA
    direct = clha_loss(sc.mean_logps, sc.sum_logps, r, idx)
    assert close(clha.loss, direct.loss)
    # RRHF's NLL weight is its own: a shared sft_weight does not rescale it
    assert close(compute_loss("rrhf", sc, r, idx, sft_weight=0.05).sft_loss, 1.0)


def test_compute_loss_errors():
    sc, r, idx = _scores(), t([[4.0, 0.0]]), torch.tensor([0])
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_loss("ppo", sc, r, idx)
    with pytest.raises(TypeError, match="rank_margn"):
        compute_loss("clha", sc, r, idx, rank_margn=3.0)
    with pytest.raises(ValueError, match="ref_sum_logps"):
        compute_loss("dpo", sc, r, idx)


def test_clha_sft_gate_is_strict_at_the_threshold():
    """The gate is 1[r > threshold]: a best reward exactly at the threshold closes it (the reference's `> 0`)."""
    s = t([[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]])
    sums = t([[-10.0, -20.0], [-6.0, -30.0], [-4.0, -40.0]], grad=True)
    # pair gaps all 1 < tau = 3: no rank term; only the gate decides the loss
    out = clha_loss(s, sums, t([[0.0, -1.0], [0.5, -0.5], [-0.25, -1.25]]), torch.tensor([0, 0, 0]))
    # threshold 0: r = 0.0 closed (equal), 0.5 open, -0.25 closed -> L_sft = 0.05 * 1 * -(1/3)(-6) = 0.1
    assert close(out.sft_loss, 0.1)
    assert close(out.extra["sft_gate_open_fraction"], 1 / 3)
    out.loss.backward()
    assert torch.allclose(sums.grad, t([[0.0, 0.0], [-0.05 / 3, 0.0], [0.0, 0.0]]))
    # a non-zero threshold: r = 1.5 at threshold 1.5 is closed, r = 1.5 at threshold 1.49 open (-(1/1)(-10) * 0.05)
    at = clha_loss(t([[-1.0, -2.0]]), t([[-10.0, -20.0]]), t([[1.5, 1.0]]), torch.tensor([0]),
                   sft_reward_threshold=1.5)
    assert at.sft_loss.item() == 0.0 and close(at.extra["sft_gate_open_fraction"], 0.0)
    above = clha_loss(t([[-1.0, -2.0]]), t([[-10.0, -20.0]]), t([[1.5, 1.0]]), torch.tensor([0]),
                      sft_reward_threshold=1.49)
    assert close(above.sft_loss, 0.5)


def _uneven_scores():
    """Mean and summed log-probs that are not proportional (10 and 4 response tokens), so a loss computed on the
    wrong one of the two gives another value."""
    return SimpleNamespace(mean_logps=t([[-1.0, -2.0]]), sum_logps=t([[-10.0, -8.0]]),
                           token_counts=torch.tensor([[10, 4]]))


def test_compute_loss_pro_ranks_mean_logps_and_imitates_summed_ones():
    out = compute_loss("pro", _uneven_scores(), t([[3.0, 1.0]]), torch.tensor([0]), temperature=1.0,
                       sft_weight=0.05, beta=0.1, rank_margin=3.0)
    # rank term on MEANS: T_01 = T_00 = 2, logits (-1*2, -2*2) = (-2, -4): log(1 + e^-2) = 0.126928...
    # (on sums it would be logits (-20, -16): log(1 + e^4) = 4.018...)
    assert close(out.rank_loss, math.log(1 + math.exp(-2)))
    # SFT term on SUMS: 0.05 * (2-1)^2 * -(-10) = 0.5   (on means: 0.05)
    assert close(out.sft_loss, 0.5)
    assert close(out.loss, math.log(1 + math.exp(-2)) + 0.5)
    assert close(out.chosen_logps, -1.0) and close(out.rejected_logps, -2.0)


def test_compute_loss_dpo_uses_summed_logps_and_shows_means():
    ref = t([[-11.0, -7.0]])
    out = compute_loss("dpo", _uneven_scores(), t([[3.0, 1.0]]), torch.tensor([0]), ref_sum_logps=ref, beta=0.1,
                       sft_weight=0.05, temperature=1.0)
    # on SUMS: h0 = 0.1 * (-10 + 11) = 0.1, h1 = 0.1 * (-8 + 7) = -0.1: -log sigmoid(0.2) = log(1 + e^-0.2)
    # (on means: h0 = 0.1 * (-1 + 11) = 1.0, h1 = 0.1 * (-2 + 7) = 0.5: log(1 + e^-0.5))
    assert close(out.loss, math.log(1 + math.exp(-0.2)))
    assert close(out.extra["chosen_reward"], 0.1) and close(out.extra["rejected_reward"], -0.1)
    assert out.sft_loss.item() == 0.0
    # the logged chosen/rejected log-probs are the per-token means, comparable with the other methods
    assert close(out.chosen_logps, -1.0) and close(out.rejected_logps, -2.0) and close(out.margin, 1.0)


def test_compute_loss_passes_non_default_hyperparameters_through():
    """Every adapter forwards the config's loss settings (values other than the defaults, so dropping them shows)."""
    sc, r, idx = _scores(), t([[4.0, 0.0]]), torch.tensor([0])
    ref = t([[-11.0, -19.0]])
    hyper = dict(rank_margin=12.0, reward_gap_threshold=1.0, sft_weight=0.5, sft_reward_threshold=-1.0,
                 temperature=4.0, beta=2.0)
    # CLHA: max(0, 12 - (-1 + 2)) = 11; SFT 0.5 * -(-10) = 5
    assert close(compute_loss("clha", sc, r, idx, **hyper).loss, 16.0)
    # PRO with T = 4: s/T = (-0.25, -0.5), T_01 = 4: logits (-1, -2): log(1 + e^-1); SFT 0.5 * 10 = 5
    assert close(compute_loss("pro", sc, r, idx, **hyper).loss, math.log(1 + math.exp(-1)) + 5.0)
    # DPO with beta = 2: h0 = 2 * 1 = 2, h1 = 2 * -1 = -2: log(1 + e^-4)
    assert close(compute_loss("dpo", sc, r, idx, ref_sum_logps=ref, **hyper).loss, math.log(1 + math.exp(-4)))
    assert close(dpo_loss(t([[-10.0, -20.0]]), ref).loss, math.log(1 + math.exp(-0.2)))   # default beta 0.1
    # RRHF takes none of them: its NLL weight stays 1; its own nll_weight is passed through
    assert close(compute_loss("rrhf", sc, r, idx, **hyper).loss, 1.0)
    assert close(compute_loss("rrhf", sc, r, idx, nll_weight=3.0).loss, 3.0)
    # SFT imitates the sft_index candidate: -s[0, 1] = 2
    assert close(compute_loss("sft", sc, r, torch.tensor([1])).loss, 2.0)


def test_tied_scores_are_not_a_correct_ranking():
    # one valid pair with equal mean log-probs: accuracy 0 (strictly higher counts), for CLHA and PRO alike
    s, sums, r = t([[-1.0, -1.0]]), t([[-5.0, -5.0]]), t([[4.0, 0.0]])
    for out in (clha_loss(s, sums, r, torch.tensor([0])), pro_loss(s, sums, r, torch.tensor([0]))):
        assert int(out.num_valid_pairs) == 1 and int(out.num_correct_pairs) == 0


def test_baselines_on_a_batch_of_two_with_three_candidates():
    s = t([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]])
    sums = t([[-4.0, -6.0, -1.0], [-9.0, -2.0, -8.0]])
    r = t([[3.0, 2.0, 1.0], [5.0, 4.0, 4.0]])
    idx = torch.tensor([0, 0])
    # PRO diagnostics: all 3 pairs of both rows valid; correct (s_k > s_l, k < l): row 0: (0,1) only;
    # row 1: (1,2) only -> 2 of 6
    pro = pro_loss(s, sums, r, idx)
    assert int(pro.num_valid_pairs) == 6 and int(pro.num_correct_pairs) == 2 and close(pro.rank_accuracy, 1 / 3)
    # RRHF: row 0: r1<r0: max(0, -2+1) = 0; r2<r0: max(0, -0.5+1) = 0.5; r2<r1: max(0, -0.5+2) = 1.5  -> 2
    #       row 1: r1<r0: max(0, -1+3) = 2; r2<r0: max(0, -2+3) = 1; r1 = r2 tie -> 3;  rank = (2 + 3) / 2 = 2.5
    #       NLL: -(1/2)(-1 - 3) = 2
    rrhf = rrhf_loss(s, sums, r, idx)
    assert close(rrhf.rank_loss, 2.5) and close(rrhf.sft_loss, 2.0) and int(rrhf.num_valid_pairs) == 5
    # DPO, reference = policy + (0, 1, -1) in row 0 and 0 in row 1, beta 0.5: row 0 h = (0, -0.5, 0.5),
    # row 1 h = 0: losses log(1 + e^-0.5), log(1 + e^0.5), log 2, log 2 -> their mean; valid pairs (0, k): 4
    ref = sums + t([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    dpo = dpo_loss(sums, ref, beta=0.5)
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5)) + 2 * math.log(2)) / 4
    assert close(dpo.loss, expected) and int(dpo.num_valid_pairs) == 4 and int(dpo.num_correct_pairs) == 1
    # SFT without sft_index imitates candidate 0: -(1/2)(-1 - 3) = 2
    assert close(sft_loss(s).loss, 2.0)


def test_one_candidate_has_no_pairs_and_finite_diagnostics():
    s, sums, r = t([[-1.0], [-3.0]]), t([[-4.0], [-6.0]]), t([[2.0], [-1.0]])
    out = clha_loss(s, sums, r, torch.tensor([0, 0]))
    assert out.rank_loss.item() == 0.0 and close(out.sft_loss, 0.0)         # (n-1)^2 = 0 weights the SFT term
    assert int(out.num_valid_pairs) == 0 and out.masked_pair_fraction.item() == 0.0
    assert close(out.chosen_logps, -2.0) and close(out.rejected_logps, -2.0) and out.margin.item() == 0.0
    dpo = dpo_loss(sums, sums - 1.0, beta=0.5)
    assert dpo.loss.item() == 0.0 and close(dpo.extra["rejected_reward"], 0.5)   # h0 = 0.5, no rejected candidate


def test_baselines_reject_bad_shapes_and_temperature():
    s, bad_r, idx = t([[-1.0, -2.0]]), t([[1.0, 2.0, 3.0]]), torch.tensor([0])
    for fn in (sft_loss, pro_loss, rrhf_loss):
        with pytest.raises(ValueError, match="rewards shape"):
            fn(s, s, bad_r, idx)
    with pytest.raises(ValueError, match="rewards shape"):
        dpo_loss(s, s, rewards=bad_r)
    with pytest.raises(ValueError, match="sft_index must have shape"):
        dpo_loss(s, s, sft_index=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="temperature must be positive"):
        pro_loss(s, s, t([[1.0, 0.0]]), idx, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(s, t([[-1.0]]))


def test_bad_inputs_raise_value_errors_that_say_what_is_wrong():
    s, r, idx = t([[-1.0, -2.0]]), t([[1.0, 0.0]]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"scores must have shape \[B, n\], got \(2,\)"):
        clha_loss(t([-1.0, -2.0]), t([-1.0, -2.0]), t([1.0, 0.0]), idx)
    with pytest.raises(ValueError, match=r"sft_index out of range \[0, 2\)"):
        clha_loss(s, s, r, torch.tensor([2]))
    with pytest.raises(ValueError, match="seq_sum_logps and seq_mean_logps must have the same shape"):
        clha_loss(s, t([[-1.0]]), r, idx)
    with pytest.raises(ValueError, match="dpo_loss needs ref_sum_logps"):
        dpo_loss(s, None)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'; choose one of clha, sft, pro, rrhf, dpo"):
        compute_loss("ppo", _scores(), r, idx)
    # every loss that imitates a candidate checks sft_index (shape [B], in range)
    for fn in (sft_loss, pro_loss, rrhf_loss):
        with pytest.raises(ValueError, match=r"sft_index must have shape \[B\]=\(1,\), got \(2,\)"):
            fn(s, s, r, torch.tensor([0, 0]))
        with pytest.raises(ValueError, match="out of range"):
            fn(s, s, r, torch.tensor([5]))
    assert close(sft_loss(s).loss, 1.0)                                # B = 1: -(1/1)(-1)

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

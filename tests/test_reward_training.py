"""Reward-model training: losses and metrics against hand-computed values, data partitions, a short training run
on a separable toy set with tiny models built from a config, save + reload through clha.rm.scoring.load_reward_model."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from clha.data.format import ASSISTANT, PROMPTER
from clha.rm.batches import epoch_batches
from clha.rm.config import RewardTrainConfig
from clha.rm.data import PreferenceExample, load_eval_examples, load_training_examples, read_ranked_examples
from clha.rm.losses import distillation_loss, ordered_pair_mask, pairwise_loss, reward_training_loss
from clha.rm.metrics import evaluate_scores, pairwise_accuracy, ranking_agreement, spearman
from clha.rm.scoring import load_reward_model
from clha.rm.trainer import run_reward_training
from clha.testing.tiny_reward import save_tiny_seqcls_reward_model


def _softplus(x: float) -> float:   # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------------- losses

def test_pairwise_loss_matches_hand_value_n2():
    scores = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    mask = ordered_pair_mask(torch.tensor([2, 2]), 2)
    # -log sigmoid(1.5) = log(1 + e^-1.5); -log sigmoid(-1) = log(1 + e^1)
    expected = (_softplus(-1.5) + _softplus(1.0)) / 2
    assert pairwise_loss(scores, mask).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.757337, abs=1e-6)


def test_pairwise_loss_all_ordered_pairs_variable_n_and_identical_texts():
    # example 0: 3 candidates ranked best first, all pairs (0,1) (0,2) (1,2); example 1: 2 candidates (padded)
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.0, 9.9]])
    mask = ordered_pair_mask(torch.tensor([3, 2]), 3)
    ex0 = (_softplus(-2.0) + _softplus(-1.0) + _softplus(1.0)) / 3     # 0.584484
    ex1 = _softplus(-0.5)
    assert ex0 == pytest.approx(0.584484, abs=1e-6)
    assert pairwise_loss(scores, mask).item() == pytest.approx((ex0 + ex1) / 2, abs=1e-6)
    # identical candidates 1 and 2 of example 0 carry no preference: that pair is dropped
    same = torch.zeros(2, 3, 3, dtype=torch.bool)
    same[0, 1, 2] = same[0, 2, 1] = True
    mask2 = ordered_pair_mask(torch.tensor([3, 2]), 3, same)
    ex0b = (_softplus(-2.0) + _softplus(-1.0)) / 2
    assert pairwise_loss(scores, mask2).item() == pytest.approx((ex0b + ex1) / 2, abs=1e-6)


def test_distillation_loss_and_combination():
    scores = torch.tensor([[1.0, 0.0], [2.0, 2.0]], requires_grad=True)
    targets = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    target_mask = torch.tensor([[True, True], [False, False]])   # example 1 has no stored rewards
    mask = ordered_pair_mask(torch.tensor([2, 2]), 2)
    assert distillation_loss(scores, targets, target_mask).item() == pytest.approx(0.25)      # (0.25 + 0.25) / 2
    assert distillation_loss(scores, targets, target_mask, mask, mode="margin").item() == pytest.approx(1.0)
    out = reward_training_loss(scores, mask, targets, target_mask, pairwise_weight=1.0, distill_weight=2.0)
    pair = (_softplus(-1.0) + _softplus(0.0)) / 2
    assert out.pairwise.item() == pytest.approx(pair, abs=1e-6)
    assert out.loss.item() == pytest.approx(pair + 2 * 0.25, abs=1e-6)
    assert out.num_pairs == 2 and out.num_correct == pytest.approx(1.5)     # a tie counts one half
    out.loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


# ----------------------------------------------------------------------------------------------------- metrics

def _ex(subset, responses=("a", "b"), stored=None, key=None):
    return PreferenceExample(prompt=[PROMPTER + "q", ASSISTANT], responses=list(responses), subset=subset,
                             key=key or f"{subset}:{id(responses)}", stored_rewards=stored)


def test_pairwise_accuracy_and_per_subset_evaluation():
    assert pairwise_accuracy([2.0, 1.0]) == (1.0, 1)
    assert pairwise_accuracy([1.0, 1.0]) == (0.5, 1)
    assert pairwise_accuracy([1.0, 3.0, 2.0]) == (1.0, 3)      # (0,1) wrong, (0,2) wrong, (1,2) right
    assert pairwise_accuracy([1.0, 2.0], ["same", "same"]) == (0.0, 0)
    examples = [_ex("harmless-base", stored=[1.0, 0.0]), _ex("harmless-base", stored=[0.0, 1.0]),
                _ex("helpful-base"), _ex("helpful-base")]
    scores = [[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 3.0]]
    result = evaluate_scores(examples, scores)
    assert result["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert result["pairs"] == 4
    assert result["per_subset"]["harmless-base"]["accuracy"] == 1.0
    assert result["per_subset"]["helpful-base"]["accuracy"] == 0.25
    assert result["stored_rows"] == 2
    assert result["stored_reward_accuracy"] == 0.5           # the stored rewards get one of their two rows right
    # Spearman over the 4 candidates of the stored rows: model [1,0,2,0] vs stored [1,0,0,1]
    assert result["spearman_with_stored"] == pytest.approx(spearman([1, 0, 2, 0], [1, 0, 0, 1]))


def test_spearman_matches_hand_value_with_ties():
    # ranks of y: [1, 2, 3.5, 5, 3.5]; centred: x [-2,-1,0,1,2], y [-2,-1,.5,2,.5] -> 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_ranking_agreement():
    examples = [_ex("s", key=str(i)) for i in range(4)]
    a = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    b = [[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [0.0, 1.0]]
    out = ranking_agreement(a, b, examples)
    assert out["agreement"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert out["accuracy_a"] == pytest.approx(2.5 / 4) and out["accuracy_b"] == pytest.approx(0.25)
    assert out["chance"] == pytest.approx(0.625 * 0.25 + 0.375 * 0.75)


def test_epoch_batches_cover_data_and_balance_subsets():
    lengths = list(range(20))
    subsets = ["a"] * 16 + ["b"] * 4
    batches = epoch_batches(lengths, subsets, 4, epoch=0, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert batches != epoch_batches(lengths, subsets, 4, epoch=1, seed=1)
    balanced = [i for e in range(50) for b in epoch_batches(lengths, subsets, 4, e, 1, balance_subsets=True) for i in b]
    share_b = sum(subsets[i] == "b" for i in balanced) / len(balanced)
    assert 0.4 < share_b < 0.6


# ----------------------------------------------------------------------------------------------------- data

def _write_raw(root, subset, rows):
    folder = root / subset
    folder.mkdir(parents=True)
    with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        for chosen, rejected in rows:
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")


def _dialogue(question, answer):
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


@pytest.fixture
def raw_dir(tmp_path):
    root = tmp_path / "raw"
    questions = [f"question number {i} about topic {i % 7}?" for i in range(60)]
    _write_raw(root, "harmless-base", [(_dialogue(q, "I can't help with that."), _dialogue(q, "Sure, here is how."))
                                       for q in questions[:30]])
    _write_raw(root, "helpful-base", [(_dialogue(q, "Paris is the capital."), _dialogue(q, "No idea."))
                                      for q in questions[30:]])
    pro = tmp_path / "pro"
    pro.mkdir()
    with open(pro / "harmless_base.json", "w", encoding="utf-8") as f:
        for line in range(1, 31):
            f.write(json.dumps({"prefix": [[PROMPTER + "x", ASSISTANT]] * 2, "suffix": ["a", "b"],
                                "reward": [float(line), -1.0], "sft_index": 0,
                                "meta": {"line_num": line}}) + "\n")
    return root, pro


def test_raw_partitions_are_disjoint_shards_disjoint_and_stored_rewards_matched(raw_dir):
    root, pro = raw_dir
    cfg = RewardTrainConfig(model_name_or_path="x", raw_data_dir=str(root), pro_rewards_dir=str(pro),
                            partition_fractions="0,0.5,0.25,0.25", distill_weight=1.0)
    train, info = load_training_examples(cfg)
    held, held_info = load_eval_examples(cfg)
    assert {ex.first_human_turn for ex in train}.isdisjoint({ex.first_human_turn for ex in held})
    assert info["examples"] + held_info["examples"] == 60
    for ex in train + held:   # harmless rows get the stored reward of their raw line, helpful rows none
        if ex.subset == "harmless-base":
            assert ex.stored_rewards == [float(ex.line_num), -1.0]
        else:
            assert ex.stored_rewards is None
    shards = [load_training_examples(RewardTrainConfig(**{**cfg.to_dict(), "train_shard": f"{k}/2"}))[0]
              for k in range(2)]
    keys = [{ex.key for ex in s} for s in shards]
    assert keys[0].isdisjoint(keys[1]) and keys[0] | keys[1] == {ex.key for ex in train}
    # distillation alone keeps only rows that have stored rewards
    only = load_training_examples(RewardTrainConfig(**{**cfg.to_dict(), "pairwise_weight": 0.0}))[0]
    assert only and all(ex.stored_rewards is not None for ex in only)


def test_read_ranked_examples(tmp_path):
    path = tmp_path / "ranked.jsonl"
    rows = [{"prefix": [[PROMPTER + "hi", ASSISTANT]] * 3, "suffix": ["best", "mid", "worst"],
             "reward": [1.0, 0.0, -1.0], "sft_index": 0, "meta": {"source": "helpful_online", "line_num": 7}},
            {"prefix": [[PROMPTER + "yo", ASSISTANT]] * 2, "suffix": ["x", "y"], "sft_index": 0, "meta": {}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = read_ranked_examples(str(path))
    assert examples[0].subset == "helpful-online" and examples[0].line_num == 7 and examples[0].n == 3
    assert examples[0].stored_rewards == [1.0, 0.0, -1.0]
    assert examples[1].stored_rewards is None and examples[1].subset == "unknown"


# ----------------------------------------------------------------------------------------------------- training

GOOD = "Paris is the capital of France."
BAD = "I can't help with that, the quick brown fox jumps."


def _toy_ranked(path, n_rows=24, long_prompt=False):
    rows = []
    for i in range(n_rows):
        question = f"Tell me fact {i}?" + (" Please answer quickly." * 20 if long_prompt else "")
        rows.append({"prefix": [[PROMPTER + question, ASSISTANT]] * 2, "suffix": [GOOD, BAD],
                     "reward": [1.0, -1.0], "sft_index": 0, "meta": {"source": "helpful-base" if i % 2 else
                                                                      "harmless-base", "line_num": i + 1}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _mean_pairwise_loss(scorer, examples):
    scores = scorer.score([ex.prompt for ex in examples for _ in ex.responses],
                          [r for ex in examples for r in ex.responses])
    diffs = torch.tensor(scores[0::2]) - torch.tensor(scores[1::2])
    return float(-torch.nn.functional.logsigmoid(diffs).mean())


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_training_lowers_loss_and_reload_gives_identical_scores(tmp_path, arch):
    backbone = save_tiny_seqcls_reward_model(tmp_path / "backbone", seed=3, arch=arch)
    data = _toy_ranked(tmp_path / "toy.jsonl", long_prompt=True)
    examples = read_ranked_examples(data)
    before = _mean_pairwise_loss(load_reward_model(backbone, device="cpu", max_length=48), examples)
    cfg = RewardTrainConfig(model_name_or_path=backbone, train_file=data, eval_file=data, max_length=48,
                            num_train_epochs=4, per_device_train_batch_size=4, learning_rate=3e-3,
                            warmup_ratio=0.0, distill_weight=0.1, disable_dropout=arch == "bert",
                            output_dir=str(tmp_path / "rm"),
                            log_dir=str(tmp_path / "logs"), logging_steps=2, seed=0)
    results = run_reward_training(cfg)
    assert results["global_step"] == 24
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (tmp_path / "logs" / "tensorboard").is_dir()
    held = results["heldout"]
    assert held["accuracy"] == 1.0 and set(held["per_subset"]) == {"harmless-base", "helpful-base"}

    reloaded = load_reward_model(tmp_path / "rm", device="cpu")         # default max_length 512 ...
    assert reloaded.max_length == 48                                     # ... capped by the saved tokenizer
    after = _mean_pairwise_loss(reloaded, examples)
    assert after < before - 0.2
    saved = [json.loads(line)["scores"] for line in (tmp_path / "rm" / "heldout_scores.jsonl").read_text().splitlines()]
    again = reloaded.score([ex.prompt for ex in examples for _ in ex.responses],
                           [r for ex in examples for r in ex.responses])
    assert [s for pair in saved for s in pair] == again                  # identical, float for float
    config = json.loads((tmp_path / "rm" / "reward_training_config.json").read_text())
    assert config["max_length"] == 48 and config["global_step"] == 24

    # evaluation only, through load_reward_model, plus agreement with the training run's scores
    eval_cfg = RewardTrainConfig(model_name_or_path=str(tmp_path / "rm"), do_train=False, eval_file=data,
                                 output_dir=str(tmp_path / "eval"), compare_with=str(tmp_path / "rm"))
    eval_results = run_reward_training(eval_cfg)
    assert eval_results["heldout"]["accuracy"] == 1.0
    assert eval_results["agreement_with"]["agreement"] == 1.0

"""The method comparison: aggregation statistics on hand-made results (expected values computed by hand below),
refusing to mix results, and the harness's skip / resume / atomic-write logic (no model is trained here, except in
the end-to-end test, which runs only with CLHA_COMPARISON_E2E=1 because it takes minutes)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from experiments import aggregate as agg
from experiments import compare

# ------------------------------------------------------------------------------------------------ hand-made results
# Two subsets x 3 prompts, two methods x 2 seeds. Rewards per (method, seed): harmless prompts, then helpful ones.
REWARDS = {
    ("sft", 1): [40, 50, 60, 70, 80, 90],
    ("sft", 2): [50, 50, 50, 60, 80, 100],
    ("clha", 1): [50, 50, 70, 70, 90, 90],
    ("clha", 2): [60, 40, 60, 80, 80, 100],
}
WORDS = {("sft", 1): [10, 20, 30, 40, 50, 60], ("sft", 2): [30] * 6, ("clha", 1): [20] * 6, ("clha", 2): [40] * 6}
AT_LIMIT = {("sft", 1): [1, 0, 0, 0, 0, 0], ("sft", 2): [1, 1, 0, 0, 0, 0], ("clha", 1): [0] * 6, ("clha", 2): [0] * 6}
IDS = [f"harmless_base/{i}" for i in range(3)] + [f"helpful_base/{i}" for i in range(3)]
PROTOCOL = {"policy": {"name": "p"}, "data": {"raw_lines_per_subset": 0},
            "train": {"max_train_steps": 10, "num_train_epochs": 1, "train_examples_per_run": 20,
                      "global_batch_size": 2, "per_device_train_batch_size": 2, "num_processes": 1,
                      "gradient_accumulation_steps": 1, "block_size": 512, "lr_scheduler_type": "constant",
                      "warmup_steps": 0, "max_grad_norm": 1.0, "torch_dtype": "float32",
                      "accelerate_config": "train/single_cpu.yaml", "validation_every": 5, "validation_prompts": 4,
                      "validation_max_new_tokens": 8},
            "eval": {"test_prompts_per_subset": 3, "max_new_tokens": 128, "block_size": 512, "num_processes": 2,
                     "dtype": "float32", "reward_max_length": 1024}}


def make_run(method, seed, rewards=None, **changes):
    rewards = rewards or REWARDS[(method, seed)]
    examples = {pid: {"line_num": i, "reward": float(r), "bleu": r / 10, "words": WORDS[(method, seed)][i],
                      "at_limit": bool(AT_LIMIT[(method, seed)][i])} for i, (pid, r) in enumerate(zip(IDS, rewards))}
    run = {"format": compare.RESULT_FORMAT, "method": method, "seed": seed, "run": compare.run_name(method, seed),
           "protocol": json.loads(json.dumps(PROTOCOL)), "method_settings": {"loss_type": method, "learning_rate": 1e-5},
           "reward_models": {"train_rm": "aaaa", "eval_rm": "bbbb"}, "policy_fingerprint": "cccc",
           "data_fingerprint": "dddd", "training": {"best_step": 5, "best_dev_reward": 0.5, "wall_s": 60.0},
           "evaluation": {"wall_s": 30.0}, "examples": examples}
    run.update(changes)
    return run


def write_runs(folder: Path, runs):
    for run in runs:
        compare.write_result(folder / "runs" / f"{run['run']}.json", run)


@pytest.fixture
def runs():
    return [make_run(m, s) for m, s in REWARDS]


# ------------------------------------------------------------------------------------------------ point estimates
def test_means_paired_differences_win_rates_length_and_truncation_match_hand_values(runs):
    summary = agg.summarise(runs, n_boot=200)
    sft, clha = summary["methods"]["sft"], summary["methods"]["clha"]
    # SFT: harmless seed means 50 and 50; helpful 80 and 80; all 12 values 65
    assert sft["reward"]["harmless_base"][0] == pytest.approx(50.0)
    assert sft["reward"]["helpful_base"][0] == pytest.approx(80.0)
    assert sft["reward"]["total"][0] == pytest.approx(65.0)
    # CLHA: harmless 170/3 and 160/3 -> 55; helpful 250/3 and 260/3 -> 85; total 70
    assert clha["reward"]["harmless_base"][0] == pytest.approx(55.0)
    assert clha["reward"]["helpful_base"][0] == pytest.approx(85.0)
    assert clha["reward"]["total"][0] == pytest.approx(70.0)
    assert clha["bleu"]["total"][0] == pytest.approx(7.0)        # BLEU = reward / 10 here
    # CLHA minus SFT, paired per prompt: 5 everywhere
    diff = summary["differences"]["sft"]["reward"]
    assert diff["harmless_base"][0] == pytest.approx(5.0) and diff["total"][0] == pytest.approx(5.0)
    # win rate over prompts and seed pairs (ties half), per prompt: {50,60} vs {40,50}: W T W W = 87.5;
    # {50,40} vs {50,50}: T T L L = 25; {70,60} vs {60,50}: W W T W = 87.5 | {70,80} vs {70,60}: 87.5;
    # {90,80} vs {80,80}: W W T T = 75; {90,100} vs {90,100}: T L W T = 50  -> 412.5 / 6
    assert clha["win_vs_sft"][0] == pytest.approx(412.5 / 6)
    assert sft["win_vs_sft"] is None
    # words: SFT seed 1 mean 35, seed 2 mean 30 -> 32.5; at the token limit: 3 of 12 responses -> 25%
    assert sft["words"][0] == pytest.approx(32.5)
    assert sft["at_limit"][0] == pytest.approx(25.0)
    assert clha["at_limit"][0] == 0.0
    assert summary["n_prompts"] == {"harmless_base": 3, "helpful_base": 3, "total": 6}


def test_win_values_count_ties_half():
    a = np.array([[1.0, 2.0, 3.0]])
    b = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    w = agg.win_values(a, b)
    assert w.shape == (1, 2, 3)
    assert w[0].tolist() == [[50.0, 0.0, 100.0], [100.0, 100.0, 0.0]]


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_is_deterministic_and_contains_the_point_estimate(runs):
    one = agg.summarise(runs, n_boot=300, seed=3)
    assert agg.summarise(runs, n_boot=300, seed=3) == one
    other = agg.summarise(runs, n_boot=300, seed=4)
    assert other != one                                       # another RNG seed: other resamples
    for method in one["methods"].values():
        for triple in list(method["reward"].values()) + list(method["bleu"].values()):
            point, lo, hi = triple
            assert lo <= point <= hi
    for diff in one["differences"].values():
        point, lo, hi = diff["reward"]["total"]
        assert lo <= point <= hi


def test_bootstrap_all_equal_values_give_a_zero_width_interval():
    x = np.full((2, 6), 50.0)
    assert agg.mean_interval(x, ["a"] * 3 + ["b"] * 3, n_boot=500) == (50.0, 50.0, 50.0)
    assert agg.paired_difference(x, x - 2.0, ["a"] * 6, n_boot=500) == (2.0, 2.0, 2.0)


def test_bootstrap_percentiles_of_a_two_prompt_mean_are_its_extremes():
    # one seed, prompts 0 and 100: a resample's mean is 0, 50 or 100 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5th and 97.5th percentiles are exactly 0 and 100
    point, lo, hi = agg.mean_interval(np.array([[0.0, 100.0]]), ["s", "s"], n_boot=4000)
    assert (point, lo, hi) == (50.0, 0.0, 100.0)
    # resampling within strata: each stratum holds one prompt, so nothing varies
    assert agg.mean_interval(np.array([[0.0, 100.0]]), ["a", "b"], n_boot=200) == (50.0, 50.0, 50.0)


def test_bootstrap_interval_shrinks_with_more_prompts_and_seeds():
    rng = np.random.default_rng(1)
    x = rng.normal(50, 10, size=(2, 20))
    strata = ["a"] * 10 + ["b"] * 10
    _, lo, hi = agg.mean_interval(x, strata, n_boot=1000)
    big = np.tile(x, (3, 4))              # the same values, 3x the seeds and 4x the prompts
    _, lo_big, hi_big = agg.mean_interval(big, strata * 4, n_boot=1000)
    assert (hi_big - lo_big) < 0.6 * (hi - lo)


def test_bootstrap_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="one stratum label per prompt"):
        agg.bootstrap(np.zeros((1, 1, 3)), ["a", "b"])


# ------------------------------------------------------------------------------------------------ refusing to mix
def test_results_judged_by_different_reward_models_are_refused(runs):
    runs[3]["reward_models"] = {"train_rm": "aaaa", "eval_rm": "eeee"}
    runs[3]["_path"], runs[0]["_path"] = "clha_s2.json", "sft_s1.json"
    for r in runs[1:3]:
        r["_path"] = r["run"]
    with pytest.raises(agg.AggregationError, match=r"different reward models.*eval_rm: \"bbbb\" vs \"eeee\""):
        agg.summarise(runs)


def test_results_with_other_settings_prompts_or_method_settings_are_refused(tmp_path):
    base = [make_run("sft", 1), make_run("clha", 1)]
    changed = make_run("clha", 2)
    changed["protocol"]["train"]["max_train_steps"] = 11
    write_runs(tmp_path / "a", base + [changed])
    with pytest.raises(agg.AggregationError, match=r"differ in protocol.*train.max_train_steps: 10 vs 11"):
        agg.write_report(tmp_path / "a")

    other_prompts = make_run("clha", 2)
    other_prompts["examples"]["harmless_base/7"] = other_prompts["examples"].pop("harmless_base/2")
    with pytest.raises(agg.AggregationError, match="different test prompts"):
        agg.check_consistent([{**r, "_path": r["run"]} for r in base + [other_prompts]])

    other_lr = make_run("clha", 2, method_settings={"loss_type": "clha", "learning_rate": 2e-5})
    with pytest.raises(agg.AggregationError, match="two clha runs with different method settings"):
        agg.check_consistent([{**r, "_path": r["run"]} for r in base + [other_lr]])


def test_half_written_files_are_ignored_and_a_corrupt_result_is_named(tmp_path, runs):
    write_runs(tmp_path, runs)
    (tmp_path / "runs" / ".clha_s3.json.k2j3.tmp").write_text('{"format": "clha-compar')   # an unfinished write
    loaded = agg.load_runs(tmp_path / "runs")
    assert sorted(r["run"] for r in loaded) == ["clha_s1", "clha_s2", "sft_s1", "sft_s2"]
    (tmp_path / "runs" / "clha_s3.json").write_text('{"format": "clha-compar')
    with pytest.raises(agg.AggregationError, match=r"clha_s3.json: unreadable result"):
        agg.load_runs(tmp_path / "runs")


def test_write_report_makes_readme_summary_and_chart(tmp_path, runs):
    write_runs(tmp_path, runs)
    summary = agg.write_report(tmp_path, expected=["base", "sft_s1", "sft_s2", "clha_s1", "clha_s2"], n_boot=100)
    text = (tmp_path / "README.md").read_text()
    assert "Incomplete: 1 planned run(s) have no result yet: base" in text
    assert "| CLHA | 2 | 5.50 / 55.00 | 8.50 / 85.00 | 7.00 / 70.00 |" in text
    assert "## Protocol" in text and "fingerprint `bbbb`" in text
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "Dev kept step 0" not in text
    runs[1]["evaluation"] = {"wall_s": 9.0, "reused_from": {"run": "base"}}          # sft_s2 took base's evaluation
    write_runs(tmp_path, runs)
    agg.write_report(tmp_path, expected=["sft_s1", "sft_s2", "clha_s1", "clha_s2"], n_boot=100)
    text = (tmp_path / "README.md").read_text()
    assert f"Dev kept step 0 for {runs[1]['run']}; that checkpoint held exactly the untrained policy" in text


def test_each_training_seed_is_listed_with_its_total_and_the_reward_spread(tmp_path, runs):
    # SFT seed 2 rewards changed: (20 + 50 + 50 + 60 + 80 + 100) / 6 = 60; seed 1 stays 65; spread 5.
    # BLEU is reward / 10 here: 6.5 and 6.0. A method with one seed gets no row.
    runs = [r for r in runs if (r["method"], r["seed"]) != ("sft", 2)]
    runs.append(make_run("sft", 2, rewards=[20, 50, 50, 60, 80, 100]))
    runs = [r for r in runs if (r["method"], r["seed"]) != ("clha", 2)]
    summary = agg.summarise(runs, n_boot=50)
    assert summary["methods"]["sft"]["per_seed"] == [{"seed": 1, "reward": pytest.approx(65.0),
                                                      "bleu": pytest.approx(6.5)},
                                                     {"seed": 2, "reward": pytest.approx(60.0),
                                                      "bleu": pytest.approx(6.0)}]
    text = "\n".join(agg.render_tables(summary))
    assert "| SFT | 1, 2 | 65.00, 60.00 | 6.50, 6.00 | 5.00 |" in text
    assert "| CLHA | 1 |" not in text.split("## Training seeds")[1].split("##")[0]


def test_the_judges_length_preference_and_length_adjusted_rewards_match_hand_values(monkeypatch):
    # Every prompt: SFT answers in 10 words, CLHA in 20, base in 30; rewards r0, r0 + 3, r0 + 12 with r0 the prompt's
    # [40, 50, 60, 70, 80, 90]. Per prompt the means are 20 words and r0 + 5, so the deviations are words
    # (-10, 0, +10) and reward (-5, -2, +7): slope = (50 + 0 + 70) / (100 + 0 + 100) = 0.6 per word, correlation
    # 120 / sqrt(78 * 200). Mean words 20; adjusted: SFT 65 + 0.6 * 10 = 71, CLHA 68, base 77 - 0.6 * 10 = 71.
    r0 = [40, 50, 60, 70, 80, 90]
    for key, words in ((("sft", 1), 10), (("clha", 1), 20), (("base", None), 30)):
        monkeypatch.setitem(WORDS, key, [words] * 6)
        monkeypatch.setitem(AT_LIMIT, key, [0] * 6)
    runs = [make_run("sft", 1, rewards=r0), make_run("clha", 1, rewards=[r + 3 for r in r0]),
            make_run("base", None, rewards=[r + 12 for r in r0])]
    summary = agg.summarise(runs, n_boot=100)
    length = summary["length_preference"]
    assert length["slope_per_word"] == pytest.approx(0.6)
    assert length["within_prompt_correlation"] == pytest.approx(120 / math.sqrt(78 * 200))
    assert length["mean_words"] == pytest.approx(20.0) and length["responses"] == 18
    methods = summary["methods"]
    assert methods["sft"]["reward_length_adjusted"][0] == pytest.approx(71.0)
    assert methods["clha"]["reward_length_adjusted"][0] == pytest.approx(68.0)
    assert methods["base"]["reward_length_adjusted"][0] == pytest.approx(71.0)
    # raw, CLHA is 3 above SFT; adjusted, 3 below, the same on every prompt (a zero-width interval)
    assert summary["differences"]["sft"]["reward"]["total"][0] == pytest.approx(3.0)
    assert summary["differences"]["sft"]["reward_length_adjusted"] == pytest.approx([-3.0, -3.0, -3.0])
    text = "\n".join(agg.render_tables(summary))
    assert "eval_rm prefers longer responses" in text and "reward rises +6.00 points per 10 words" in text
    row = next(line for line in text.splitlines() if line.startswith("| SFT | 10.0 | 65.00 | 71.00 ["))
    assert row.endswith("| -3.00 [-3.00, -3.00] |")
    # one run alone: no within-prompt length differences, no adjustment
    alone = agg.summarise(runs[:1], n_boot=20)
    assert alone["length_preference"] is None and alone["methods"]["sft"]["reward_length_adjusted"] is None
    assert "## Reward and response length" not in "\n".join(agg.render_tables(alone))


def test_results_of_older_settings_are_left_out_and_named_not_mixed_in(tmp_path, runs, monkeypatch):
    monkeypatch.setitem(WORDS, ("base", None), [10] * 6)
    monkeypatch.setitem(AT_LIMIT, ("base", None), [0] * 6)
    old = make_run("base", None, rewards=[10] * 6, run="base")
    old["protocol"]["train"]["append_eos"] = False              # made before the protocol recorded EOS
    write_runs(tmp_path, runs + [old])
    with pytest.raises(agg.AggregationError, match="differ in protocol"):
        agg.write_report(tmp_path, n_boot=50)                    # without the current protocol: refused, not mixed
    summary = agg.write_report(tmp_path, n_boot=50, protocol=PROTOCOL)
    assert set(summary["methods"]) == {"sft", "clha"} and summary["n_runs"] == 4
    text = (tmp_path / "README.md").read_text()
    assert "Left out, made with other settings" in text and "base (protocol.train.append_eos: false vs null)" in text
    assert agg.write_report(tmp_path, n_boot=50, protocol={**PROTOCOL, "eval": {}}) is None   # nothing current


def test_longer_rankings_are_compared_with_their_n2_method_paired_per_prompt(tmp_path, runs, monkeypatch):
    # clha_n3 (one seed) against clha's two seeds; clha's seed mean per prompt is [55, 45, 65, 75, 85, 95]
    monkeypatch.setitem(WORDS, ("clha_n3", 1), [20] * 6)      # clha's seeds: 20 and 40 words
    monkeypatch.setitem(AT_LIMIT, ("clha_n3", 1), [0] * 6)
    n3 = make_run("clha_n3", 1, rewards=[60, 50, 70, 70, 90, 90],
                  candidates_summary={"n": 3, "samples": 12, "rows_in": 6, "rows_out": 6,
                                      "rows_dropped_fewer_than_n": 0, "sample_outranks_human_chosen": 0.5,
                                      "best_is_policy": 0.25, "adjacent_reward_gap": {"median": 0.15}})
    assert agg.shorter_counterpart("clha_n3", ["clha", "clha_n3"]) == "clha"
    assert agg.shorter_counterpart("clha_n3", ["sft", "clha_n3"]) is None       # no n = 2 run: no comparison
    assert agg.shorter_counterpart("clha_nomask", ["clha", "clha_nomask"]) is None
    summary = agg.summarise(runs + [n3], n_boot=200)
    longer = summary["longer_rankings"]
    assert list(longer) == ["clha_n3"] and longer["clha_n3"]["against"] == "clha"
    # harmless: 60 - 55 = 5; helpful: (70 + 90 + 90) / 3 - 85 = -5/3; total: 430 / 6 - 70 = 5/3
    assert longer["clha_n3"]["reward"]["harmless_base"][0] == pytest.approx(5.0)
    assert longer["clha_n3"]["reward"]["helpful_base"][0] == pytest.approx(-5 / 3)
    assert longer["clha_n3"]["reward"]["total"][0] == pytest.approx(5 / 3)
    assert longer["clha_n3"]["bleu"]["total"][0] == pytest.approx(0.5 / 3)
    lo, hi = longer["clha_n3"]["reward"]["total"][1:]
    assert lo <= 5 / 3 <= hi
    # length-adjusted: 10 words shorter than clha's seed mean, so 10 x the judge's slope is added
    slope = summary["length_preference"]["slope_per_word"]
    assert abs(slope) > 0.01                                   # (negative in this made-up data)
    assert "eval_rm prefers shorter responses" in "\n".join(agg.render_tables(summary))
    assert longer["clha_n3"]["reward_length_adjusted"][0] == pytest.approx(5 / 3 + 10 * slope)
    # it also sits in the table after the ablations, with CLHA minus it among the differences
    assert list(summary["methods"]) == ["sft", "clha", "clha_n3"]
    assert summary["differences"]["clha_n3"]["reward"]["total"][0] == pytest.approx(-5 / 3)
    write_runs(tmp_path, runs + [n3])
    agg.write_report(tmp_path, n_boot=100)
    text = (tmp_path / "README.md").read_text()
    assert "## Longer rankings" in text and "| CLHA, rankings of 3 | CLHA | +5.00 [" in text
    assert "a sample outranks the human chosen reply for 50.0% of the prompts" in text
    # runs sharing one candidate file (clha_n3 and pro_n3 of a seed) are named on one line
    twin = {**n3, "run": "pro_n3_s1"}
    lines = [line for line in agg.render_protocol(runs + [n3, twin], summary) if line.startswith("- Rankings of 3")]
    assert len(lines) == 1 and lines[0].startswith("- Rankings of 3 (clha_n3_s1, pro_n3_s1): 12 responses")


# ------------------------------------------------------------------------------------------------ the harness
@pytest.fixture
def harness(tmp_path):
    h = compare.Harness(compare.resolve_settings("tiny"), work_dir=tmp_path / "work", results_dir=tmp_path / "results")
    h.fingerprints = {"train_rm": "aaaa", "eval_rm": "bbbb", "policy": "cccc"}
    h.__dict__["_data_fp"] = "dddd"
    return h


def fake_stages(h, calls):
    """Replace training and evaluation by stubs that record the call and leave what the real ones would."""
    def train(method, seed, ckpt, logs, key, overrides=None, method_override=None):
        calls.append(("train", method, seed))
        (ckpt / "step_2").mkdir(parents=True, exist_ok=True)
        os.symlink("step_2", ckpt / "best_checkpoint")
        return {"best_step": 2}

    def evaluate(name, model_path, gguf, out_dir):
        calls.append(("evaluate", name))

    def build_result(method, seed, key, eval_dir, training, eval_wall_s, model_path):
        return {**key, "run": compare.run_name(method, seed), "overall": {"reward": 50.0, "bleu": 1.0, "n": 1},
                "examples": {"harmless_base/0": {"reward": 50.0}}}

    h.train, h.evaluate, h.build_result = train, evaluate, build_result


def test_a_current_result_is_skipped_and_changed_settings_rerun(harness):
    calls = []
    fake_stages(harness, calls)
    path = harness.run_one("clha", 1)
    assert calls == [("train", "clha", 1), ("evaluate", "clha_s1")]
    assert compare.read_json(path)["method_settings"]["learning_rate"] == 1e-3
    assert harness.run_one("clha", 1) is None and len(calls) == 2           # current: skipped
    assert harness.result_is_current("clha", 1)

    # the checkpoint folder of the old settings must not be resumed: it is removed before training again
    stale = harness.ckpt_root / "clha_s1" / "train_state"
    stale.mkdir(parents=True)
    harness.settings["methods"]["clha"]["learning_rate"] = 5e-4
    assert not harness.result_is_current("clha", 1)
    harness.run_one("clha", 1)
    assert calls[2:] == [("train", "clha", 1), ("evaluate", "clha_s1")]
    assert not stale.exists()
    assert compare.read_json(path)["method_settings"]["learning_rate"] == 5e-4
    # another reward model judging: rerun too
    harness.fingerprints["eval_rm"] = "ffff"
    assert not harness.result_is_current("clha", 1)


def test_half_written_results_are_never_read_and_the_run_is_redone(harness):
    calls = []
    fake_stages(harness, calls)
    runs = harness.results / "runs"
    runs.mkdir(parents=True)
    (runs / ".base.json.x1y2.tmp").write_text('{"format": ')          # a killed write: ignored
    (runs / "sft_s1.json").write_text(json.dumps(harness.run_key("sft", 1))[:40])   # truncated: not a result
    assert not harness.result_is_current("base", None) and not harness.result_is_current("sft", 1)
    harness.run_one("base", None)
    harness.run_one("sft", 1)
    assert ("evaluate", "base") in calls and ("train", "sft", 1) in calls and ("train", "base", None) not in calls
    assert harness.result_is_current("base", None) and harness.result_is_current("sft", 1)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from clha.testing.tiny import save_tiny_causal_lm

    return Path(save_tiny_causal_lm(tmp_path_factory.mktemp("policy") / "policy", seed=0))


def save_step0(policy: Path, out: Path, change=None):
    """What the trainer saves at step 0: the policy loaded and saved again (`change` edits the model first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy)
    if change is not None:
        change(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)


def test_the_untrained_policy_check_finds_weight_config_and_tokenizer_changes(tiny_policy, tmp_path):
    import torch
    from safetensors.torch import load_file

    same = tmp_path / "same"
    save_step0(tiny_policy, same)
    assert compare.untrained_policy_difference(same, tiny_policy) is None      # the tied lm_head is not saved
    assert "lm_head.weight" not in load_file(str(same / "model.safetensors"))

    def nudge(model):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    nudged = tmp_path / "nudged"
    save_step0(tiny_policy, nudged, nudge)
    assert compare.untrained_policy_difference(nudged, tiny_policy) == \
        "weight model.layers.1.mlp.down_proj.weight differs from the policy's"

    config = tmp_path / "config"
    save_step0(tiny_policy, config, lambda m: setattr(m.config, "rms_norm_eps", 0.5))
    assert compare.untrained_policy_difference(config, tiny_policy).startswith("config rms_norm_eps: 0.5 in the")

    tokenizer = tmp_path / "tokenizer"
    save_step0(tiny_policy, tokenizer)
    cfg = json.loads((tokenizer / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|pad|>"
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert compare.untrained_policy_difference(tokenizer, tiny_policy).startswith("tokenizer eos_token_id")

    generation = tmp_path / "generation"
    save_step0(tiny_policy, generation)
    gen = json.loads((generation / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], 7]
    (generation / "generation_config.json").write_text(json.dumps(gen))
    assert compare.untrained_policy_difference(generation, tiny_policy).startswith("generation eos_token_id")


def test_a_run_that_selects_step0_takes_the_base_evaluation_only_when_it_is_the_untrained_policy(
        harness, tiny_policy, monkeypatch):
    calls = []
    fake_stages(harness, calls)
    monkeypatch.setattr(harness, "policy_location", lambda: (tiny_policy, None))
    change = {}

    def train_step0(method, seed, ckpt, logs, key, overrides=None, method_override=None):
        calls.append(("train", method, seed))
        save_step0(tiny_policy, ckpt / "step_0", change.get(method))
        os.symlink("step_0", ckpt / "best_checkpoint")
        return {"best_step": 0, "best_checkpoint": "step_0"}

    def build_result(method, seed, key, eval_dir, training, eval_wall_s, model_path):
        reward = {"base": 50.0}.get(method, 40.0)
        return harness.result_record(method, seed, key, training, model_path, {
            "evaluation": {"wall_s": 300.0, "num_prompts": 1}, "subsets": {"harmless_base": {"reward": reward}},
            "overall": {"reward": reward, "bleu": 1.0, "n": 1}, "examples": {"harmless_base/0": {"reward": reward}}})

    harness.train, harness.build_result = train_step0, build_result
    harness.data_summary = {}
    # no base result yet: evaluated as usual
    harness.run_one("sft", 1)
    assert calls == [("train", "sft", 1), ("evaluate", "sft_s1")]
    harness.run_one("base", None)
    base = compare.read_json(harness.result_path("base", None))
    # with a current base result, a step-0 checkpoint of the untrained policy takes base's evaluation
    harness.run_one("sft", 2)
    assert calls[-1] == ("train", "sft", 2)
    sft2 = compare.read_json(harness.result_path("sft", 2))
    assert sft2["examples"] == base["examples"] and sft2["overall"] == base["overall"]
    assert sft2["evaluation"]["reused_from"]["run"] == "base" and sft2["evaluation"]["wall_s"] < 300
    assert sft2["training"]["best_step"] == 0 and harness.result_is_current("sft", 2)
    # a step-0 checkpoint that is not the untrained policy is evaluated
    import torch

    def nudge(model):
        with torch.no_grad():
            model.model.norm.weight[0] += 1e-3
    change["dpo"] = nudge
    harness.run_one("dpo", 1)
    assert calls[-2:] == [("train", "dpo", 1), ("evaluate", "dpo_s1")]
    assert "reused_from" not in compare.read_json(harness.result_path("dpo", 1))["evaluation"]


def test_write_result_is_atomic_and_reads_back(tmp_path):
    obj = make_run("clha", 1)
    path = tmp_path / "runs" / "clha_s1.json"
    compare.write_result(path, obj)
    assert json.loads(path.read_text()) == obj
    assert [p.name for p in path.parent.iterdir()] == ["clha_s1.json"]
    assert path.read_text().count("\n") < 80                  # one line per example
    with pytest.raises(ValueError):                            # NaN is not JSON: refused before anything is written
        compare.write_result(tmp_path / "runs" / "bad.json", {**obj, "x": math.nan})
    assert not (tmp_path / "runs" / "bad.json").exists()


def test_settings_overrides_and_plan():
    s = compare.resolve_settings("cpu", ["methods.clha.learning_rate=1e-5", "eval.test_prompts_per_subset=120"])
    assert s["methods"]["clha"]["learning_rate"] == 1e-5 and s["eval"]["test_prompts_per_subset"] == 120
    assert s["train"]["train_examples_per_run"] == 150 * 2 and s["train"]["gradient_accumulation_steps"] == 1
    with pytest.raises(compare.HarnessError, match="unknown setting 'train.max_steps'"):
        compare.resolve_settings("cpu", ["train.max_steps=3"])
    runs = compare.planned_runs(s, ["base", "sft", "clha", "clha_nogate"])
    assert runs == [("base", None), ("sft", 1), ("clha", 1), ("sft", 2), ("clha", 2), ("sft", 3), ("clha", 3),
                    ("clha_nogate", 1), ("clha_nogate", 2), ("clha_nogate", 3)]
    with pytest.raises(compare.HarnessError, match="unknown method"):
        compare.planned_runs(s, ["ppo"])


def test_ablation_settings_reach_the_trainer_and_disable_mask_and_gate(harness, monkeypatch):
    import torch

    from clha.config import parse_config
    from clha.losses import clha_loss

    monkeypatch.setattr(harness, "train_subset", lambda seed: Path("train.json"))
    monkeypatch.setattr(harness, "policy_location", lambda: (Path("policy"), None))
    configs = {}
    for method in ("clha", "clha_nomask", "clha_nogate"):
        cmd = harness.train_command(method, 1, Path("ckpt"), Path("logs"))
        configs[method] = parse_config(cmd[cmd.index(str(compare.REPO / "train" / "main.py")) + 1:])
    assert configs["clha_nogate"].sft_reward_threshold == float("-inf")
    assert configs["clha_nomask"].reward_gap_threshold == -1.0
    assert configs["clha"].reward_gap_threshold == 0.2 and configs["clha"].sft_reward_threshold == 0.0
    # rewards with small gaps (every pair masked at tau 0.2) and negative best rewards (every gate closed at 0)
    scores = torch.tensor([[-1.0, -2.0], [-1.5, -1.0]])
    rewards = torch.tensor([[-0.5, -0.6], [-0.1, -0.15]])
    sft_index = torch.zeros(2, dtype=torch.long)

    def loss(cfg):
        return clha_loss(scores, scores * 10, rewards, sft_index, rank_margin=cfg.rank_margin,
                         reward_gap_threshold=cfg.reward_gap_threshold, sft_weight=cfg.sft_weight,
                         sft_reward_threshold=cfg.sft_reward_threshold)

    full, nomask, nogate = loss(configs["clha"]), loss(configs["clha_nomask"]), loss(configs["clha_nogate"])
    assert float(full.masked_pair_fraction) == 1.0 and float(nomask.masked_pair_fraction) == 0.0
    assert float(full.extra["sft_gate_open_fraction"]) == 0.0 and float(nogate.extra["sft_gate_open_fraction"]) == 1.0
    assert float(nogate.sft_loss) > 0 and float(full.sft_loss) == 0.0


def test_dev_sweep_tunes_lr_then_clha_tau_and_the_runs_use_the_choice(harness):
    """Stage A (learning rates at the preset tau), stage B (CLHA's other taus at the best rate), the ablations
    inherit CLHA's choice, results record it, and a finished sweep is never retrained."""
    s = harness.settings
    s["sweep"].update({"learning_rates": [1e-4, 1e-3, 1e-2], "taus": [0.1, 0.2, 0.5],
                       "extend_edges": 0})      # the grid's extension has its own test
    # dev reward at the last step, by (method, lr, tau): sft peaks at 1e-3; clha at 1e-4 in stage A, tau 0.5 in B
    dev = {("sft", 1e-4, None): 0.40, ("sft", 1e-3, None): 0.47, ("sft", 1e-2, None): 0.30,
           ("clha", 1e-4, 0.2): 0.52, ("clha", 1e-3, 0.2): 0.51, ("clha", 1e-2, 0.2): 0.20,
           ("clha", 1e-4, 0.1): 0.50, ("clha", 1e-4, 0.5): 0.55}
    trained = []

    def train(method, seed, ckpt, logs, key, overrides=None, method_override=None):
        ms = method_override or s["methods"][method]
        point = (method, ms["learning_rate"], ms.get("reward_gap_threshold"))
        trained.append(point)
        assert overrides["validation_prompts"] == s["sweep"]["dev_prompts"] and seed == s["sweep"]["seed"]
        if len(trained) == 2:       # the sweep's README already shows the first point and what is left
            text = (harness.results / "sweep" / "README.md").read_text()
            # the plan is the preset's whole sweep (5 methods x 3 rates + CLHA's 2 other taus), not this command's
            assert "16 of 17 points still to run" in text and "| sft_lr0.0001_s1 | 0.0001 |" in text
        return {"validation": [{"step": 0, "dev_reward": 0.45}, {"step": 4, "dev_reward": dev[point]}]}

    harness.train = train
    with pytest.raises(compare.HarnessError, match="dev sweep of sft is not finished"):
        harness.apply_tuning(["sft"])
    records = harness.sweep(["base", "sft", "clha_nomask", "clha_nogate"])
    assert trained == [("sft", 1e-4, None), ("sft", 1e-3, None), ("sft", 1e-2, None),
                       ("clha", 1e-4, 0.2), ("clha", 1e-3, 0.2), ("clha", 1e-2, 0.2),
                       ("clha", 1e-4, 0.1), ("clha", 1e-4, 0.5)]          # tau stage at clha's best rate, 1e-4
    assert len(records) == 8 and (harness.results / "sweep" / "clha_lr0.0001_tau0.5_s1.json").is_file()
    text = (harness.results / "sweep" / "README.md").read_text()
    assert "9 of 17 points still to run" in text and "- clha: learning_rate 0.0001, reward_gap_threshold 0.5" in text
    assert harness.sweep(["sft", "clha"]) == records and len(trained) == 8   # finished points are read back

    chosen = harness.apply_tuning(["base", "sft", "clha", "clha_nomask", "clha_nogate"])
    assert set(chosen) == {"sft", "clha", "clha_nomask", "clha_nogate"}
    assert s["methods"]["sft"]["learning_rate"] == 1e-3 and chosen["sft"]["dev_reward"] == 0.47
    assert s["methods"]["clha"]["learning_rate"] == 1e-4 and s["methods"]["clha"]["reward_gap_threshold"] == 0.5
    assert s["methods"]["clha_nogate"]["learning_rate"] == 1e-4
    assert s["methods"]["clha_nogate"]["reward_gap_threshold"] == 0.5
    assert s["methods"]["clha_nogate"]["sft_reward_threshold"] == "-inf"     # the ablation itself is kept
    assert s["methods"]["clha_nomask"]["reward_gap_threshold"] == -1.0 and chosen["clha_nomask"]["from"] == "clha"
    assert chosen["clha"]["best_sweep_run"] == "clha_lr0.0001_tau0.5_s1" and chosen["clha"]["sweep_runs"] == 5

    # the runs carry the tuned settings, in their key and in the trainer's flags
    calls = []
    fake_stages(harness, calls)
    harness.tuning = chosen
    assert harness.run_key("clha", 1)["method_settings"]["reward_gap_threshold"] == 0.5
    harness.train_subset = lambda seed: Path("train.json")
    harness.policy_location = lambda: (Path("policy"), None)
    cmd = harness.train_command("sft", 1, Path("ckpt"), Path("logs"))
    assert "--learning_rate=0.001" in cmd and "--append_eos" in cmd


def test_longer_ranking_methods_train_on_sampled_candidates_with_the_n2_choice(harness, monkeypatch):
    """clha_n3 / pro_n3: planned after the ablations, tuned as clha / pro, trained at n = 3 on the seed's sample
    with candidates added by step 2b (built once, rebuilt when the candidate settings change), and their results
    record the candidate settings and step 2b's summary."""
    s = harness.settings
    runs = compare.planned_runs(s, ["clha_n3", "base", "clha", "pro_n3", "clha_nogate"])
    assert runs == [("base", None), ("clha", 1), ("clha", 2), ("clha_nogate", 1), ("clha_n3", 1), ("pro_n3", 1)]
    assert [harness.tuned_from(m) for m in ("clha_n3", "pro_n3", "clha_nomask", "sft")] == \
        ["clha", "pro", "clha", "sft"]
    assert compare.ranking_len(s, "clha_n3") == 3 and compare.ranking_len(s, "clha") == 2
    key = harness.run_key("clha_n3", 1)
    assert key["method_settings"]["candidates"] == {"k": 2, "temperature": 1.0, "top_p": 0.95,
                                                    "max_new_tokens": 8, "seed": 42}
    assert "candidates" not in harness.run_key("clha", 1)["method_settings"]
    clha_key = harness.run_key("clha", 1)
    s["candidates"]["k"] = 3
    assert harness.run_key("clha_n3", 1) != key and harness.run_key("clha", 1) == clha_key
    s["candidates"]["k"] = 2

    base = harness.data_dir / "train_subsets" / "n8_seed1.json"
    base.parent.mkdir(parents=True)
    base.write_text('{"prefix": [["a"], ["b"]], "suffix": ["x", "y"], "reward": [1.0, 0.0], "sft_index": 0}\n')
    monkeypatch.setattr(harness, "train_subset", lambda seed: base)
    monkeypatch.setattr(harness, "policy_location", lambda: (Path("policy"), None))
    steps = []

    def fake_step(cmd, env, log_path=None, cwd=None):
        args = [str(c) for c in cmd]
        steps.append(args)
        value = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}
        Path(value["--out_file"]).write_text("rows of 3\n")
        (Path(value["--work_dir"])).mkdir(parents=True, exist_ok=True)
        (Path(value["--work_dir"]) / "summary.json").write_text(json.dumps({"n": 3, "k": int(value["--k"])}))

    monkeypatch.setattr(compare, "run_command", fake_step)
    cmd = harness.train_command("clha_n3", 1, Path("ckpt"), Path("logs"))
    assert cmd[cmd.index("--training_stage_num") + 1] == "3"
    train_file = Path(cmd[cmd.index("--train_file_path") + 1])
    assert train_file.name == "n8_seed1_len3.json" and train_file.read_text() == "rows of 3\n"
    (step,) = steps
    assert step[step.index("--in_file") + 1] == str(base) and step[step.index("--n") + 1] == "3"
    assert step[step.index("--reward_model") + 1] == str(harness.reward_model_path("train_rm"))
    assert step[step.index("--top_p") + 1] == "0.95" and "--step1_dir" in step
    # built once: a second run (another method, same seed) reuses it; other candidate settings rebuild it
    harness.train_command("pro_n3", 1, Path("ckpt"), Path("logs"))
    assert len(steps) == 1
    s["candidates"]["k"] = 3
    harness.train_command("clha_n3", 1, Path("ckpt"), Path("logs"))
    assert len(steps) == 2 and steps[1][steps[1].index("--k") + 1] == "3"
    assert harness.candidate_summaries[(1, 3)] == {"n": 3, "k": 3}
    # the n = 2 method is untouched
    cmd2 = harness.train_command("clha", 1, Path("ckpt"), Path("logs"))
    assert cmd2[cmd2.index("--training_stage_num") + 1] == "2" and cmd2[cmd2.index("--train_file_path") + 1] == str(base)


def test_longer_ranking_methods_take_the_tuning_of_their_n2_method(harness):
    s = harness.settings
    s["sweep"].update({"learning_rates": [1e-4, 1e-3], "taus": [0.1], "extend_edges": 0})
    dev = {("clha", 1e-4, 0.2): 0.50, ("clha", 1e-3, 0.2): 0.52, ("clha", 1e-3, 0.1): 0.55,
           ("pro", 1e-4, None): 0.49, ("pro", 1e-3, None): 0.41}
    trained = []

    def train(method, seed, ckpt, logs, key, overrides=None, method_override=None):
        point = (method, method_override["learning_rate"], method_override.get("reward_gap_threshold"))
        trained.append(point)
        return {"validation": [{"step": 0, "dev_reward": 0.45}, {"step": 4, "dev_reward": dev[point]}]}

    harness.train = train
    harness.sweep(["clha_n3", "pro_n3"])
    assert sorted({m for m, _, _ in trained}) == ["clha", "pro"]          # no sweep of their own
    chosen = harness.apply_tuning(["clha_n3", "pro_n3"])
    assert s["methods"]["clha_n3"]["learning_rate"] == 1e-3 and s["methods"]["clha_n3"]["reward_gap_threshold"] == 0.1
    assert s["methods"]["clha_n3"]["ranking_len"] == 3 and chosen["clha_n3"]["from"] == "clha"
    assert s["methods"]["pro_n3"]["learning_rate"] == 1e-4 and chosen["pro_n3"]["from"] == "pro"


def test_a_best_learning_rate_at_the_grid_edge_extends_the_grid(harness):
    """sft improves up to the top of the grid: 2x and 4x are tried (extend_edges 2 caps it) and 4x is chosen; dpo's
    2x is worse, so its grid stops there; rrhf's best is the smallest rate: half, then a quarter, are tried; a
    missing extension point leaves the sweep unfinished."""
    s = harness.settings
    s["sweep"].update({"learning_rates": [1e-4, 1e-3], "extend_edges": 2})
    dev = {("sft", 1e-4): 0.40, ("sft", 1e-3): 0.45, ("sft", 2e-3): 0.47, ("sft", 4e-3): 0.50,
           ("dpo", 1e-4): 0.44, ("dpo", 1e-3): 0.46, ("dpo", 2e-3): 0.43,
           ("rrhf", 1e-4): 0.46, ("rrhf", 1e-3): 0.44, ("rrhf", 5e-5): 0.47, ("rrhf", 2.5e-5): 0.45}
    trained = []

    def train(method, seed, ckpt, logs, key, overrides=None, method_override=None):
        point = (method, method_override["learning_rate"])
        trained.append(point)
        return {"validation": [{"step": 0, "dev_reward": 0.45}, {"step": 4, "dev_reward": dev[point]}]}

    harness.train = train
    harness.sweep(["sft", "dpo", "rrhf"])
    assert trained == [("sft", 1e-4), ("sft", 1e-3), ("sft", 2e-3), ("sft", 4e-3),
                       ("dpo", 1e-4), ("dpo", 1e-3), ("dpo", 2e-3),
                       ("rrhf", 1e-4), ("rrhf", 1e-3), ("rrhf", 5e-5), ("rrhf", 2.5e-5)]   # best at the bottom: halved
    assert (harness.results / "sweep" / "sft_lr0.004_s1.json").is_file()
    # the README lists rrhf's points by learning rate (the extension points first), as --only-aggregate does
    text = (harness.results / "sweep" / "README.md").read_text()
    runs = [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| rrhf_")]
    assert runs == ["rrhf_lr2.5e-05_s1", "rrhf_lr5e-05_s1", "rrhf_lr0.0001_s1", "rrhf_lr0.001_s1"]
    harness.rewrite_sweep_readme()
    assert (harness.results / "sweep" / "README.md").read_text() == text
    harness.sweep(["rrhf"])            # a command sweeping one method still lists every stored point
    assert (harness.results / "sweep" / "README.md").read_text() == text and len(trained) == 11
    chosen = harness.apply_tuning(["sft", "dpo", "rrhf"])
    assert s["methods"]["rrhf"]["learning_rate"] == 5e-5 and chosen["rrhf"]["sweep_runs"] == 4
    assert s["methods"]["sft"]["learning_rate"] == 4e-3 and chosen["sft"]["sweep_runs"] == 4
    assert s["methods"]["dpo"]["learning_rate"] == 1e-3 and chosen["dpo"]["sweep_runs"] == 3
    (harness.results / "sweep" / "sft_lr0.002_s1.json").unlink()
    with pytest.raises(compare.HarnessError, match=r"extension beyond the grid \(the best rate was at its edge\)"):
        harness.apply_tuning(["sft"])


def test_the_best_sweep_point_is_the_highest_dev_reward_first_of_equals():
    rec = [{"run": "a", "dev_reward_end": 0.5}, {"run": "b", "dev_reward_end": None},
           {"run": "c", "dev_reward_end": 0.6}, {"run": "d", "dev_reward_end": 0.6}]
    assert compare.best_sweep_record(rec)["run"] == "c"
    with pytest.raises(compare.HarnessError, match="no sweep run has a dev reward"):
        compare.best_sweep_record([{"run": "b", "dev_reward_end": None}])


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.timeout(2400)    # 17 min measured on the 2-core machine under load (base, clha_nogate, clha_n3)
@pytest.mark.skipif(not os.environ.get("CLHA_COMPARISON_E2E"),
                    reason="takes several minutes on 2 cores; set CLHA_COMPARISON_E2E=1 to run it")
def test_the_tiny_preset_runs_end_to_end_and_resumes(tmp_path, shared_data, capsys):
    argv = ["--preset", "tiny", "--methods", "base", "clha_nogate", "clha_n3", "--seeds", "1", "--work-dir",
            str(tmp_path),
            "--results-dir", str(tmp_path / "results"), "--set", f"paths.shared_data={shared_data}"]
    assert compare.main(argv) == 0
    result = compare.read_json(tmp_path / "results" / "tiny" / "runs" / "clha_nogate_s1.json")
    assert result["method_settings"]["sft_reward_threshold"] == "-inf"
    assert len(result["examples"]) == 4 * 3 and set(result["reward_models"]) == {"train_rm", "eval_rm"}
    assert result["training"]["steps"] == 4 and result["training"]["best_checkpoint"].startswith("step_")
    ckpt = tmp_path / "checkpoints" / "comparison" / "tiny" / "clha_nogate_s1"
    assert not (ckpt / "train_state").exists()                 # pruned after the result was written
    n3 = compare.read_json(tmp_path / "results" / "tiny" / "runs" / "clha_n3_s1.json")
    assert n3["method_settings"]["ranking_len"] == 3 and n3["candidates_summary"]["n"] == 3
    assert n3["candidates_summary"]["rows_in"] == n3["candidates_summary"]["rows_out"] + \
        n3["candidates_summary"]["rows_dropped_fewer_than_n"]
    readme = (tmp_path / "results" / "tiny" / "README.md").read_text()
    assert "CLHA w/o adaptive gate" in readme and "## Longer rankings" not in readme   # no clha run to compare with
    assert "CLHA, rankings of 3" in readme
    capsys.readouterr()
    assert compare.main(argv) == 0                              # everything current: nothing runs
    assert "launch" not in capsys.readouterr().out


def test_a_model_fingerprint_covers_weights_config_and_tokenizer_not_logs_or_machine_paths(tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text('{"hidden_size": 4}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "reward_training_config.json").write_text('{"output_dir": "/work/a/resources/rm"}')
    (folder / "eval_results.json").write_text('{"accuracy": 0.7}')
    (folder / "heldout_scores.jsonl").write_text('{"score": 1}\n')
    first = compare.model_fingerprint(folder)
    # the same model trained in another checkout: only the provenance record and the figures differ
    (folder / "reward_training_config.json").write_text('{"output_dir": "/work/b/resources/rm"}')
    (folder / "eval_results.json").write_text('{"accuracy": 0.8}')
    (folder / "heldout_scores.jsonl").write_text('{"score": 2}\n')
    assert compare.model_fingerprint(folder) == first
    for name, data in (("model.safetensors", b"weights2"), ("config.json", b'{"hidden_size": 5}'),
                       ("tokenizer.json", b'{"vocab": {"a": 0}}')):
        old = (folder / name).read_bytes()
        (folder / name).write_bytes(data)
        assert compare.model_fingerprint(folder) != first, name
        (folder / name).write_bytes(old)
    assert compare.model_fingerprint(folder) == first
    (folder / "model.safetensors").unlink()
    with pytest.raises(compare.HarnessError, match="no weight file"):
        compare.model_fingerprint(folder)


def test_the_data_fingerprint_does_not_depend_on_the_checkout_that_wrote_the_data(tmp_path):
    """Rows record the train_rm folder they were scored by (an absolute path); the same rewards written from two
    checkouts have one fingerprint, and different rewards do not."""
    def harness_at(checkout):
        settings = compare.resolve_settings("cpu")
        settings["paths"]["reward_models_dir"] = str(checkout / "resources" / "reward_models")
        return compare.Harness(settings, work_dir=tmp_path / checkout.name, results_dir=tmp_path / "results")

    def write_data(h, reward):
        source = f"reward_model:{h.reward_model_path('train_rm')}"
        for path in h.data_files().values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"suffix": ["a", "b"], "reward": [reward, 0.5],
                                        "meta": {"reward_source": source}}) + "\n")

    a, b = harness_at(tmp_path / "clone_a"), harness_at(tmp_path / "clone_b")
    write_data(a, 1.25)
    write_data(b, 1.25)
    assert str(a.reward_model_path("train_rm")) in a.data_files()["train"].read_text()
    assert a.data_fingerprint() == b.data_fingerprint()
    # a third checkout reading the data clone_a wrote (a shared work folder) sees the same fingerprint
    c = harness_at(tmp_path / "clone_c")
    c.data_dir = a.data_dir
    assert c.data_fingerprint() == a.data_fingerprint()
    write_data(b, 1.2500001)
    assert a.data_fingerprint() != b.data_fingerprint()
    # plain files_fingerprint (no placeholders) still sees every byte
    write_data(b, 1.25)
    assert (compare.files_fingerprint(a.data_files().values(), a.data_dir)
            != compare.files_fingerprint(b.data_files().values(), b.data_dir))


def test_a_fingerprint_migration_is_reported_in_the_protocol(tmp_path, runs):
    migration = {"date": "2026-12-01", "fingerprints": {"train_rm": {"from": "old1", "to": "aaaa"}},
                 "why": "the definition changed.", "evidence": "identical rewards."}
    runs[0]["fingerprint_migration"] = runs[1]["fingerprint_migration"] = migration
    write_runs(tmp_path, runs)
    agg.write_report(tmp_path, n_boot=50)
    text = (tmp_path / "README.md").read_text()
    assert ("- Fingerprints re-expressed on 2026-12-01 for 2 run(s) (train_rm `old1` -> `aaaa`): the definition "
            "changed. Evidence: identical rewards.") in text
    assert text.count("Fingerprints re-expressed") == 1


def test_results_made_with_other_models_stop_the_command_unless_replacing_is_asked_for(harness, caplog):
    harness.check_models_of_stored_results()            # nothing stored: nothing to say
    current = {**harness.run_key("sft", 1), "run": "sft_s1"}
    compare.write_result(harness.result_path("sft", 1), current)
    compare.write_result(harness.results / "sweep" / "sft_lr1e-05_s1.json",
                         {**current, "reward_models": {"train_rm": "aaaa", "eval_rm": "old"}})
    compare.write_result(harness.result_path("clha", 1), {**current, "data_fingerprint": "old-data"})
    (harness.results / "runs" / "notes.json").write_text("{}")    # not a result: ignored
    found = harness.results_of_other_models()
    assert [(p.relative_to(harness.results).as_posix(), sorted(d)) for p, d in found] == [
        ("runs/clha_s1.json", ["data_fingerprint"]), ("sweep/sft_lr1e-05_s1.json", ["reward_models"])]
    assert found[0][1]["data_fingerprint"] == ("old-data", "dddd")
    with pytest.raises(compare.HarnessError, match=r"2 stored result\(s\) .* runs/clha_s1.json: data_fingerprint "
                                                   r"\"old-data\", now \"dddd\".*--replace-results-of-other-models"):
        harness.check_models_of_stored_results()
    harness.check_models_of_stored_results(allow=True)  # logged, then the runs are redone as they come
    assert "2 stored result(s) were made with other models or data" in caplog.text
    # the current result is untouched and still current
    assert harness.result_is_current("sft", 1)


def test_the_table_is_rewritten_after_every_finished_run(tmp_path, monkeypatch):
    """An interrupted pass leaves results/<experiment>/README.md current with the runs finished so far."""
    events = []
    for stage in ("stage_installs", "stage_models", "stage_data", "check_models_of_stored_results"):
        monkeypatch.setattr(compare.Harness, stage, lambda self, *a, **k: None)
    done = {"base": "skipped"}      # base's result is current: run_one returns None, no rewrite for it

    def run_one(self, method, seed):
        name = compare.run_name(method, seed)
        events.append(("run", name))
        if done.get(name) == "skipped":
            return None
        if name == "clha_s1" and done.get(name) != "ok":
            raise compare.HarnessError("killed")
        return self.result_path(method, seed)

    monkeypatch.setattr(compare.Harness, "run_one", run_one)
    monkeypatch.setattr(agg, "write_report",
                        lambda results, expected=None, protocol=None, **k: events.append(("report", len(expected))))
    argv = ["--preset", "tiny", "--no-tune", "--methods", "base", "sft", "clha", "--seeds", "1",
            "--work-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")]
    # the table expects the preset's whole plan (seed 1 here), not only the methods this command runs
    settings = compare.resolve_settings("tiny", [], [1])
    plan = len(compare.planned_runs(settings, list(settings["methods"])))
    assert plan > 3
    assert compare.main(argv) == 2                               # the clha run failed
    assert events == [("run", "base"), ("run", "sft_s1"), ("report", plan), ("run", "clha_s1")]
    events.clear()
    monkeypatch.setitem(done, "clha_s1", "ok")
    assert compare.main(argv) == 0
    assert events == [("run", "base"), ("run", "sft_s1"), ("report", plan), ("run", "clha_s1"), ("report", plan)]
    events.clear()
    assert compare.main(argv + ["--only-aggregate"]) == 0
    assert events == [("report", plan)]

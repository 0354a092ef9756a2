"""One reward source per preprocessed file: steps 2 and 3 never mix stored rewards and a reward model by default.

- both `--precomputed_rewards` and `--reward_model`: the model scores every row (the same bytes as a model-only
  run) and the stored rewards only feed the agreement report;
- `--allow_mixed_reward_sources`: stored rewards where they exist, the model for the rest, recorded per row;
- one-source runs write the same bytes as before `meta.reward_source` existed, plus that field;
- the trainer logs the share of each source of its training rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import pytest

from clha.data.format import read_ranked, write_ranked
from clha.data.preprocess import (RewardSource, reward_source_from_args, step1_process, step2_train_data,
                                  step3_test_data, with_rewards)
from clha.data.reward_sources import RewardAgreement, reward_source_shares
from clha.data.splits import PartitionConfig
from test_preprocess import fake_precomputed, one_thread, save_tiny_reward_model, small_raw_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
STEPS = REPO / "train" / "hh_preprocess_data"


def sources_of(path: Path):
    return [ex.meta.get("reward_source") for ex in read_ranked(path, require_reward=False)]


def strip_source_bytes(path: Path) -> bytes:
    """The file's bytes with `meta.reward_source` removed from every row (checked present), as written before."""
    out = []
    for line in path.read_bytes().splitlines():
        row = json.loads(line)
        assert isinstance(row["meta"].pop("reward_source"), str)
        out.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(out).encode("utf-8")


@pytest.fixture
def small(tmp_path):
    """Step-1 output of the small raw files (stored rewards for 3 subsets, none for helpful-rejection), a tiny RM."""
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    step1_process(raw, tmp_path / "pre")
    model = save_tiny_reward_model(tmp_path / "rm")
    return tmp_path, pro, model


def test_both_sources_by_default_score_every_row_with_the_model_and_report_agreement(small):
    tmp, pro, model = small
    both = RewardSource.from_args(reward_model=str(model), precomputed_rewards=str(pro), device="cpu",
                                  batch_size=4, max_length=64)
    only_model = RewardSource.from_args(reward_model=str(model), device="cpu", batch_size=4, max_length=64)
    assert both.mode == "reward_model+agreement"
    with one_thread():
        step3_test_data(tmp / "pre", tmp / "both", both)
        step3_test_data(tmp / "pre", tmp / "model", only_model)
    # no stored reward in the output: the same bytes as a run with the reward model alone
    for stem in ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection"):
        assert (tmp / "both" / f"{stem}.json").read_bytes() == (tmp / "model" / f"{stem}.json").read_bytes()
        assert set(sources_of(tmp / "both" / f"{stem}.json")) == {f"reward_model:{model}"}
    assert both.counts["precomputed"] == 0 and both.counts["model"] == 10
    # the 8 rows with stored rewards were compared with the model's scores (2 of them have a stored tie:
    # "Yes."/"Yes." and "Sure."/"Nope." have equal lengths)
    summary = both.summary()
    assert summary["mode"] == "reward_model+agreement" and summary["sources"] == {f"reward_model:{model}": 10}
    assert summary["agreement"]["rows"] == 8 and summary["agreement"]["pairs"] == 6
    assert 0.0 <= summary["agreement"]["pairwise_agreement"] <= 1.0


def test_mixed_sources_only_with_the_flag_and_recorded_per_row(small):
    tmp, pro, model = small
    mixed = RewardSource.from_args(reward_model=str(model), precomputed_rewards=str(pro), device="cpu",
                                   batch_size=4, max_length=64, allow_mixed=True)
    assert mixed.mode == "mixed"
    with one_thread():
        step3_test_data(tmp / "pre", tmp / "t", mixed)
    assert mixed.counts["precomputed"] == 8 and mixed.counts["model"] == 2
    harmless = read_ranked(tmp / "t" / "harmless_base.json")
    assert {ex.meta["reward_source"] for ex in harmless} == {f"precomputed:{pro / 'harmless_base.json'}"}
    assert harmless[0].reward == [len(harmless[0].suffix[0]) / 10, len(harmless[0].suffix[1]) / 10]
    assert set(sources_of(tmp / "t" / "helpful_rejection.json")) == {f"reward_model:{model}"}
    assert mixed.summary()["sources"] == {f"precomputed:{pro / 'harmless_base.json'}": 3,
                                          f"precomputed:{pro / 'helpful_base.json'}": 3,
                                          f"precomputed:{pro / 'helpful_online.json'}": 2,
                                          f"reward_model:{model}": 2}
    assert "agreement" not in mixed.summary()


def test_step2_command_line_flag_and_summary(small, capsys, caplog):
    """The command line: both options score with the model alone; the flag mixes; the summary says which."""
    tmp, pro, model = small
    step1_process(small_raw_dir(tmp / "again"), tmp / "pre_p",
                  partition=PartitionConfig({"policy_train": 1.0, "rm_train": 0.0, "dev": 0.0, "test": 0.0}))
    sys.path.insert(0, str(STEPS))
    try:
        import step_2_gen_train_data as step2
    finally:
        sys.path.remove(str(STEPS))
    common = ["--in_dir", str(tmp / "pre_p"), "--no_dev", "--precomputed_rewards", str(pro),
              "--reward_model", str(model), "--device", "cpu", "--max_length", "64", "--train_out",
              str(tmp / "train.json")]
    assert reward_source_from_args(step2.parse_args(common)).mode == "reward_model+agreement"
    with one_thread(), caplog.at_level(logging.INFO):
        step2.main(common + ["--allow_mixed_reward_sources"])
    summary = json.loads(capsys.readouterr().out.split("summary: ", 1)[1])
    assert summary["reward_mode"] == "mixed"
    assert summary["reward_sources"] == {f"precomputed:{pro / 'harmless_base.json'}": 3,
                                         f"precomputed:{pro / 'helpful_base.json'}": 2,
                                         f"precomputed:{pro / 'helpful_online.json'}": 2,
                                         f"reward_model:{model}": 2}
    rows = read_ranked(tmp / "train.json")
    assert len(rows) == 9 and all(ex.meta["reward_source"] for ex in rows)
    assert "--allow_mixed_reward_sources: stored rewards" in caplog.text  # the mix is announced
    with one_thread():
        step2.main(common)
    summary = json.loads(capsys.readouterr().out.split("summary: ", 1)[1])
    assert summary["reward_mode"] == "reward_model+agreement"
    assert summary["reward_sources"] == {f"reward_model:{model}": 9}
    assert summary["reward_agreement"]["rows"] == 7


def test_model_only_run_is_unchanged_but_for_the_recorded_source(small):
    """A reward-model run writes exactly the rows its scores give (human order), plus meta.reward_source."""
    tmp, pro, model = small
    rewards = RewardSource.from_args(reward_model=str(model), device="cpu", batch_size=4, max_length=64)
    with one_thread():
        step3_test_data(tmp / "pre", tmp / "t", rewards, subsets=["helpful-base"])
        rows = read_ranked(tmp / "pre" / "helpful-base" / "test.json", require_reward=False)
        flat = rewards.scorer().score([t for ex in rows for t in ex.prefix], [s for ex in rows for s in ex.suffix],
                                      batch_size=4)
    expected = [with_rewards(ex, flat[2 * i:2 * i + 2]) for i, ex in enumerate(rows)]
    write_ranked(tmp / "expected.json", expected)
    assert strip_source_bytes(tmp / "t" / "helpful_base.json") == (tmp / "expected.json").read_bytes()


# sha256 of the files written before rows recorded their reward source (same command, same data)
GOLDEN = {
    "train.json": "f8e22b85ff2adc5ebcb2275d23a9adb33cb5124c86effc101d5561416c3e20eb",
    "dev.json": "05830fe0a3c3913fc724447f1b09b94b2ff5b6577f8008e693fe465b205e82b1",
    "test/harmless_base.json": "2ce58f5d9b9512bdc1e5b652904eb6a1d5d286604ec10cfdb62972851ca78cb1",
    "test/helpful_base.json": "b0c291e8a1ce15f7cfa134c4563004d389e464d57562a4d14ccd02ff86a2c959",
    "test/helpful_online.json": "80fd7bf2caacdb8079a3da9d95a0186fbce28dab0b2361dbe36cc0d11b44f178",
}


@pytest.mark.needs_shared_data("hh-rlhf", "pro-format/hh_test")   # an error under CI=true when missing
def test_stored_rewards_run_on_real_files_is_byte_identical_but_for_the_source(tmp_path):
    pro = SHARED / "pro-format" / "hh_test"
    subsets = ["harmless-base", "helpful-base", "helpful-online"]
    step1_process(SHARED / "hh-rlhf", tmp_path / "pre", partition=PartitionConfig())
    rewards = RewardSource.from_args(precomputed_rewards=str(pro))
    step2_train_data(tmp_path / "pre", tmp_path / "train.json", tmp_path / "dev.json", rewards, dev_size=40,
                     subsets=subsets)
    step3_test_data(tmp_path / "pre", tmp_path / "test", rewards, subsets=subsets)
    for rel, digest in GOLDEN.items():
        assert hashlib.sha256(strip_source_bytes(tmp_path / rel)).hexdigest() == digest, rel
    test_rows = read_ranked(tmp_path / "test" / "helpful_base.json")
    assert {ex.meta["reward_source"] for ex in test_rows} == {f"precomputed:{pro / 'helpful_base.json'}"}
    assert set(sources_of(tmp_path / "train.json")) == {f"precomputed:{pro / f'{s}.json'}"
                                                         for s in ("harmless_base", "helpful_base", "helpful_online")}


def test_agreement_figures():
    agreement = RewardAgreement()
    agreement.add([1.0, 0.0], [0.3, 0.1])     # same order
    agreement.add([0.0, 2.0], [0.5, 0.2])     # opposite order
    agreement.add([1.0, 1.0], [0.0, 1.0])     # stored tie: not counted for agreement
    agreement.add([3.0, 1.0], [0.4, 0.4])     # model tie: disagreement
    report = agreement.summary()
    assert report["rows"] == 4 and report["pairs"] == 3
    assert report["pairwise_agreement"] == pytest.approx(1 / 3, abs=1e-4)
    # gaps: stored (1, -2, 0, 2), model (0.2, 0.3, -1, 0)
    assert report["gap_pearson"] == pytest.approx(-0.0900, abs=1e-4)
    assert report["reward_pearson"] is not None


def test_reward_source_shares_and_trainer_log(tmp_path, caplog):
    from clha.config import parse_config
    from clha.errors import InputError
    from clha.training.trainer import run_training
    from conftest import make_ranked_rows

    rows = make_ranked_rows(4)
    for ex, source in zip(rows, ["reward_model:a", "reward_model:a", "precomputed:b.json", None]):
        if source:
            ex.meta["reward_source"] = source
    assert reward_source_shares(rows, log=None) == {"reward_model:a": 0.5, "precomputed:b.json": 0.25,
                                                    "unrecorded": 0.25}
    assert reward_source_shares([], log=None) == {}
    write_ranked(tmp_path / "train.json", rows)
    cfg = parse_config(["--model_name_or_path", str(tmp_path / "no_model"), "--train_file_path",
                        str(tmp_path / "train.json"), "--output_dir", str(tmp_path / "o"), "--log_path",
                        str(tmp_path / "l"), "--do_train"])
    with caplog.at_level(logging.INFO), pytest.raises(InputError, match="model path does not exist"):
        run_training(cfg)   # setup reads the rows and logs their sources before it loads the model
    assert ("reward sources of the 4 training rows: reward_model:a 50.0% (2), precomputed:b.json 25.0% (1), "
            "unrecorded 25.0% (1)") in caplog.text
    assert "the training rows mix 2 reward sources" in caplog.text


def test_missing_shared_data_is_skipped_locally_and_an_error_in_ci(monkeypatch):
    from tests.conftest import require_shared_data

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-folder"):
        require_shared_data("no-such-folder")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-folder.*CI=true"):
        require_shared_data("no-such-folder")

"""Step 2b (clha/data/candidates.py, train/hh_preprocess_data/step_2b_add_candidates.py) on tiny models: ranked
length-n rows, dedup, sharding and resume, the merge's checks, bad input, and training at n = 3 on its output."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from clha.data import candidates
from clha.data.candidates import CandidateConfig, ShardError, build_row, merge_and_write, read_input, run_chunks
from clha.data.format import RankedExample, read_ranked, write_ranked
from clha.errors import InputError
from tests.conftest import REPO, make_ranked_rows

STEP = REPO / "train" / "hh_preprocess_data" / "step_2b_add_candidates.py"
PRECISION = {"dtype": "float32", "device": "cpu"}


def _step():
    spec = importlib.util.spec_from_file_location("step_2b", STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_lm_dir):
    from clha.testing.tiny_reward import save_tiny_seqcls_reward_model

    root = tmp_path_factory.mktemp("cand")
    rm = save_tiny_seqcls_reward_model(root / "rm", seed=1)
    src = root / "in" / "train.json"
    write_ranked(src, make_ranked_rows(7, n=2, seed=0))
    return {"root": root, "lm": tiny_lm_dir, "rm": rm, "in": src}


def _cfg(env, out: Path, **kw) -> CandidateConfig:
    values = dict(in_file=str(env["in"]), out_file=str(out), n=3, k=2, model_path=env["lm"], reward_model=env["rm"],
                  max_new_tokens=8, chunk_size=3, seed=5, dtype="float32")
    values.update(kw)
    return CandidateConfig(**values)


def _args(env, out: Path, *extra):
    return ["--in_file", str(env["in"]), "--out_file", str(out), "--n", "3", "--k", "2", "--model_path", env["lm"],
            "--reward_model", env["rm"], "--max_new_tokens", "8", "--chunk_size", "3", "--seed", "5",
            "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def written(env):
    """One run of the step script (in-process): its output rows and summary."""
    out = env["root"] / "hh_train_len3" / "train.json"
    assert _step().run(_args(env, out, "--chosen_first")) == 0
    return out, json.loads((Path(str(out) + ".work") / "summary.json").read_text())


def test_rows_are_ranked_by_the_reward_model_best_first(env, written):
    from clha.rm.scoring import load_reward_model

    out, summary = written
    rows = read_ranked(out, expected_n=3)
    source = read_ranked(env["in"])
    assert len(rows) == summary["rows_out"] == 7 - summary["rows_dropped_fewer_than_n"] and rows
    scorer = load_reward_model(env["rm"], device="cpu")
    by_prompt = {tuple(ex.prompt_turns): ex for ex in source}
    for ex in rows:
        assert ex.n == 3 and ex.sft_index == 0 and all(p == ex.prompt_turns for p in ex.prefix)
        assert ex.reward == sorted(ex.reward, reverse=True)
        # every candidate's reward is the reward model's score of it; the human pair is in the row
        assert ex.reward == pytest.approx(scorer.score([ex.prompt_turns] * 3, ex.suffix), abs=1e-5)
        human = by_prompt[tuple(ex.prompt_turns)].suffix
        assert [s for s, o in zip(ex.suffix, ex.meta["candidate_origin"]) if o == "human"] == \
            [s for s in ex.suffix if s in human] and set(human) <= set(ex.suffix)
        assert ex.meta["candidate_origin"].count("policy") == 1
        assert ex.meta["reward_source"] == f"reward_model:{env['rm']}"
    assert summary["samples"] == 14 and summary["rows_with_known_chosen"] == 7
    assert 0 <= summary["sample_outranks_human_chosen"] <= 1 and summary["adjacent_reward_gap"]["median"] >= 0


def test_selection_order_and_drops():
    ex = RankedExample([["<|prompter|>q", "<|assistant|>"]] * 2, ["a", "b"], [0.0, 0.0], 0, {})
    shard = {"samples": [{"response": r, "stop": "eos"} for r in ["c", "b", " ", "d"]],
             "rewards": [1.0, 3.0, 1.0, 0.5, 0.0, 1.0]}
    counts = Counter()
    row = build_row(ex, shard, 4, "reward", "src", counts)
    assert row.suffix == ["b", "a", "c", "d"] and row.reward == [3.0, 1.0, 1.0, 1.0]   # ties: human first
    assert row.meta["candidate_origin"] == ["human", "human", "policy", "policy"]
    assert build_row(ex, shard, 5, "reward", "src", counts) is None and counts["rows_dropped_fewer_than_n"] == 1
    kept = build_row(ex, shard, 3, "input", "src", Counter())
    assert kept.suffix == ["a", "b", "c"] and kept.reward == [1.0, 3.0, 1.0]          # input order, then samples


def test_dedup_rules():
    ex = RankedExample([["<|prompter|>q", "<|assistant|>"]] * 2, ["Yes  sure", "no"], [0.0, 0.0], 0, {})
    shard = {"samples": [{"response": r, "stop": "eos"} for r in ["", "Yes sure", "yes sure", "maybe", "later"]],
             "rewards": [1.0, 5.0, 9.0, 9.0, 9.0, 2.0, 7.0]}
    counts = Counter()
    row = build_row(ex, shard, 4, "reward", "src", counts)
    # "" is empty; "Yes sure" duplicates the human "Yes  sure" once white space is collapsed; case counts
    assert counts == Counter(empty_policy=1, duplicate_policy=1)
    assert row.suffix == ["yes sure", "no", "maybe", "Yes  sure"] and row.reward == [9.0, 5.0, 2.0, 1.0]


def test_shards_resume_and_do_not_depend_on_the_process_count(env, written, monkeypatch):
    out_one, _ = written
    rows = read_input(_cfg(env, out_one))
    # two "processes" (ranks 0 and 1 of 2) write the chunks; the merge gives the same bytes as one process
    cfg = _cfg(env, env["root"] / "two" / "train.json")
    assert run_chunks(cfg, rows, 0, 2) == [0, 2] and run_chunks(cfg, rows, 1, 2) == [1]
    merge_and_write(cfg, rows, PRECISION, [0] * len(rows))
    assert Path(cfg.out_file).read_bytes() == out_one.read_bytes()

    # a run killed after its first chunk: the rerun computes only the missing ones
    cfg = _cfg(env, env["root"] / "killed" / "train.json")
    real = candidates.compute_chunk
    calls = []

    def dies_after_one(cfg_, rows_, chunk, *a, **k):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(chunk)
        return real(cfg_, rows_, chunk, *a, **k)

    monkeypatch.setattr(candidates, "compute_chunk", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_chunks(cfg, rows)
    assert calls == [0] and not Path(cfg.out_file).exists()
    with pytest.raises(ShardError, match=r"2 of 3 chunks missing \(chunk 1, 2\)"):
        merge_and_write(cfg, rows, PRECISION)
    monkeypatch.setattr(candidates, "compute_chunk", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert run_chunks(cfg, rows) == [1, 2] and calls == [0, 1, 2]
    assert run_chunks(cfg, rows) == []                    # complete: nothing to do
    merge_and_write(cfg, rows, PRECISION, [0] * len(rows))
    assert Path(cfg.out_file).read_bytes() == out_one.read_bytes()


def test_merge_checks_every_row_appears_once(env, written):
    out, _ = written
    cfg = _cfg(env, out)
    rows = read_input(cfg)
    shards = Path(str(out) + ".work") / "shards"
    first = json.loads((shards / "chunk0-of-3.json").read_text())
    second = shards / "chunk1-of-3.json"
    saved = second.read_text()
    try:
        data = json.loads(saved)
        data["rows"][0] = first["rows"][0]                     # row 0 twice, row 3 missing
        second.write_text(json.dumps(data))
        with pytest.raises(ShardError, match="rows present twice: 0; rows missing: 3"):
            merge_and_write(cfg, rows, PRECISION)
        with pytest.raises(ShardError, match="stale shard"):  # other settings: every shard is stale
            merge_and_write(_cfg(env, out, seed=6), rows, PRECISION)
    finally:
        second.write_text(saved)


@pytest.mark.parametrize("case, message", [
    ("k0", "field 'k': must be >= 1"),
    ("n_too_big", "field 'k': 2 input candidates \\+ k=2 samples cannot make 5"),
    ("mixed_lengths", "train.json:3: field 'suffix': has 3 candidates but row 1 has 2"),
    ("no_model", "does not exist"),
    ("bad_rm", "no config.json"),
    ("long_prompt", "train.json:1: field 'prefix': the prompt has"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(env, tmp_path, capsys, case, message):
    out = tmp_path / "out" / "train.json"
    args = _args(env, out)
    if case == "k0":
        args += ["--k", "0"]
    elif case == "n_too_big":
        args += ["--n", "5"]
    elif case == "mixed_lengths":
        bad = tmp_path / "train.json"
        write_ranked(bad, make_ranked_rows(2, n=2) + make_ranked_rows(1, n=3))
        args += ["--in_file", str(bad)]
    elif case == "no_model":
        args += ["--model_path", str(tmp_path / "missing")]
    elif case == "bad_rm":
        (tmp_path / "rm").mkdir()
        args += ["--reward_model", str(tmp_path / "rm")]
    elif case == "long_prompt":
        from clha.testing.tiny import save_tiny_causal_lm

        long = tmp_path / "train.json"
        rows = make_ranked_rows(2, n=2)
        rows[0] = RankedExample([[rows[0].prefix[0][0] * 20, "<|assistant|>"]] * 2, rows[0].suffix, rows[0].reward)
        write_ranked(long, rows)
        args += ["--in_file", str(long), "--model_path", save_tiny_causal_lm(tmp_path / "lm", max_positions=96)]
    assert _step().run(args) == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err, err
    assert not out.exists()


def test_training_at_n3_on_the_step_output(env, written, tmp_path):
    """The trainer reads the step's file at --training_stage_num 3 and trains; validation reads a length-3 dev file."""
    from clha.config import parse_config
    from clha.training.trainer import run_training

    out, _ = written
    dev = tmp_path / "hh_dev_len3" / "sampled_dev.json"
    assert _step().run(_args(env, dev, "--order", "input", "--chosen_first")) == 0
    assert all(ex.n == 3 for ex in read_ranked(dev))
    cfg = parse_config(["--model_name_or_path", env["lm"], "--train_file_path", str(out.parent), "--output_dir",
                        str(tmp_path / "o"), "--log_path", str(tmp_path / "l"), "--do_train", "--max_train_steps", "2",
                        "--block_size", "160", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                        "--training_stage_num", "3", "--checkpointing_step", "100", "--no-save_epoch_checkpoints",
                        "--reward_gap_threshold", "0.1", "--do_validation", "--validation_file_path",
                        str(dev.parent), "--validation_file_name", dev.name, "--reward_model", env["rm"],
                        "--max_new_tokens", "4", "--max_validation_examples", "2"])
    summary = run_training(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()]
    assert summary["global_step"] == 2 and len(metrics) == 2
    assert all(m["loss"] == m["loss"] for m in metrics) and metrics[0]["masked_pair_fraction"] < 1

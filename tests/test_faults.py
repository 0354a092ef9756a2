"""Bad inputs and faults at every entry point: one test per row of the catalogue in docs/faults.md.

Every test is named `test_<ROW>_...` after its row (D = data, S = settings, P = paths, F = faults). The entry points
are driven as a user drives them: the preprocessing step scripts, `train/main.py`, `eval_hh/evaluate.py` and
`train/train_reward_model.py` (their `main`, in this process, or the script in a subprocess where the exit status,
a signal or a second process is the point). A refusal must exit with status 2, print one `error:` line naming the
file, line and field where there is one, print no traceback, and leave nothing half-written.

The slow rows (several training processes, SIGKILL and resume: tens of seconds each) are marked `slow` and run only
with CLHA_FAULTS=1, which `make faults` sets (tests/faults/report.py prints the catalogue with pass/fail per row).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

from clha.data.format import ASSISTANT, PROMPTER, write_ranked
from tests.conftest import REPO, make_ranked_rows

STEPS = REPO / "train" / "hh_preprocess_data"
slow_campaign = pytest.mark.skipif(os.environ.get("CLHA_FAULTS") != "1",
                                   reason="fault campaign: run with `make faults` (CLHA_FAULTS=1)")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def entry(script: str) -> dict:
    """The globals of an entry script (its `main`, ...), loaded once without running it."""
    return runpy.run_path(str(REPO / script), run_name="faults_entry")


def run_step(number: int, argv, capsys):
    """Run preprocessing step `number` as its script does (`run_cli(main)`); returns (exit status, stderr)."""
    script = {1: "step_1_process.py", 2: "step_2_gen_train_data.py", 3: "step_3_gen_test_data.py"}[number]
    g = entry(f"train/hh_preprocess_data/{script}")
    capsys.readouterr()
    code = g["run_cli"](g["main"], [str(a) for a in argv])
    return code, capsys.readouterr().err


def run_main(script: str, argv, capsys):
    """Run an entry script's `main(argv)` (train/main.py, eval_hh/evaluate.py, train/train_reward_model.py)."""
    capsys.readouterr()
    code = entry(script)["main"]([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(code, err, *patterns):
    """Exit status 2, one `error:` line holding every pattern, no traceback."""
    import re

    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def files_under(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def dialogue(*turns: str) -> str:
    """dialogue("H:hi", "A:hello") -> "\\n\\nHuman: hi\\n\\nAssistant: hello"."""
    return "".join(("\n\nHuman: " if t[0] == "H" else "\n\nAssistant: ") + t[2:] for t in turns)


def raw_line(i: int, good: str = None, bad: str = None) -> str:
    q = f"H:question number {i} about bread"
    return json.dumps({"chosen": dialogue(q, f"A:{good if good is not None else f'a kind answer {i}'}"),
                       "rejected": dialogue(q, f"A:{bad if bad is not None else 'no'}")}) + "\n"


def write_raw(raw: Path, lines, subset="helpful-base", split="test", gz=False) -> Path:
    folder = raw / subset
    folder.mkdir(parents=True, exist_ok=True)
    data = "".join(lines).encode() if not isinstance(lines, bytes) else lines
    path = folder / f"{split}.jsonl{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def ranked_file(tmp_path: Path, num=4, n=2, edit=None, name="train.json") -> Path:
    """A small ranked JSONL file; `edit(lines)` may change its text lines (0-based) in place."""
    path = tmp_path / "data" / name
    write_ranked(path, make_ranked_rows(num, n=n, seed=1))
    if edit is not None:
        lines = path.read_text().splitlines()
        edit(lines)
        path.write_text("\n".join(lines) + "\n")
    return path


def set_field(index: int, key: str, value):
    def edit(lines):
        row = json.loads(lines[index])
        if value is KeyError:
            del row[key]
        else:
            row[key] = value
        lines[index] = json.dumps(row)          # json.dumps writes NaN / Infinity for non-finite floats
    return edit


def train_args(model, data, tmp_path: Path, steps=2, extra=()):
    return ["--model_name_or_path", model, "--train_file_path", data, "--output_dir", tmp_path / "out",
            "--log_path", tmp_path / "logs", "--do_train", "--max_train_steps", str(steps), "--block_size", "160",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--checkpointing_step", "2", "--seed", "3", "--no-save_epoch_checkpoints", "--num_train_epochs", "10",
            "--reward_gap_threshold", "1.0", "--rank_margin", "1.0", *extra]


def refused_by_trainer(tmp_path, capsys, data, *patterns, model=None, extra=()):
    model = model or str(tmp_path / "no_model_needed")
    code, err = run_main("train/main.py", train_args(model, data, tmp_path, extra=extra), capsys)
    line = assert_refused(code, err, *patterns)
    assert files_under(tmp_path / "out") == [] and files_under(tmp_path / "logs") == []
    return line


def subprocess_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", CLHA_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


# ---------------------------------------------------------------------------------------------------------------
# D: data
# ---------------------------------------------------------------------------------------------------------------

def test_D01_raw_malformed_json_names_file_and_line(tmp_path, capsys):
    raw = tmp_path / "raw"
    path = write_raw(raw, [raw_line(1), raw_line(2)[:-20] + "\n", raw_line(3)])
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert_refused(code, err, f"{path}:2: malformed JSON")
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize("row, field", [({"chosen": 5, "rejected": "x"}, "chosen"),
                                        ({"chosen": dialogue("H:q", "A:a")}, "rejected")])
def test_D02_raw_wrong_type_or_missing_field_names_field(tmp_path, capsys, row, field):
    raw = tmp_path / "raw"
    path = write_raw(raw, [raw_line(1), json.dumps(row) + "\n"])
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert_refused(code, err, f"{path}:2: field '{field}'")
    assert files_under(tmp_path / "out") == []
    # --skip_broken: the row is skipped and counted, the others kept
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out", "--skip_broken"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["skipped_broken"] == 1 and manifest["totals"]["pairs"] == 1


def test_D03_raw_empty_file_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(1)], subset="harmless-base")
    path = write_raw(raw, "")
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert_refused(code, err, f"{path}: holds no rows")
    assert files_under(tmp_path / "out") == []


@pytest.mark.needs_shared_data("hh-rlhf")
def test_D04_raw_corrupt_gzip_is_a_clean_error_naming_the_file(tmp_path, shared_data):
    """A real HH-RLHF .jsonl.gz with 100 damaged bytes: step 1 used to die with a zlib.error traceback. Now: exit 2,
    one line naming the file, nothing written. Damage that decompresses into broken rows is named the same way."""
    real = (shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz").read_bytes()
    raw = tmp_path / "raw"
    for where, subset in ((2000, "helpful-base"), (len(real) // 2, "harmless-base")):
        data = bytearray(real)
        data[where:where + 100] = bytes(b ^ 0xFF for b in data[where:where + 100])
        path = raw / subset / "test.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
        proc = subprocess.run([sys.executable, str(STEPS / "step_1_process.py"), "--raw_dir", str(raw),
                               "--subsets", subset, "--out_dir", str(tmp_path / "out")], env=subprocess_env(),
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert_refused(proc.returncode, proc.stderr, f"{path}: damaged or truncated gzip file")
        assert files_under(tmp_path / "out") == []


def test_D05_raw_truncated_gzip_names_the_file(tmp_path, capsys):
    raw = tmp_path / "raw"
    data = gzip.compress("".join(raw_line(i) for i in range(300)).encode())
    path = write_raw(raw, data[: len(data) * 2 // 3])
    path = path.rename(path.with_name("test.jsonl.gz"))
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert_refused(code, err, f"{path}: damaged or truncated gzip file \\(unreadable after line \\d+\\)")
    assert files_under(tmp_path / "out") == []


def test_D06_file_not_utf8_names_file_and_line(tmp_path, capsys):
    raw = tmp_path / "raw"
    path = write_raw(raw, raw_line(1).encode() + raw_line(2).replace("bread", "caf\u00e9").encode("latin-1"))
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert_refused(code, err, f"{path}:2: not UTF-8 text")
    # the same in a ranked training file, read by the trainer
    data = ranked_file(tmp_path)
    data.write_bytes(data.read_bytes().replace(b"the", b"th\xe9", 1))
    refused_by_trainer(tmp_path, capsys, data, f"{data}:1: not UTF-8 text")


def test_D07_raw_empty_responses_are_kept_and_counted(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(1), raw_line(2, good=""), raw_line(3, bad="")])
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    totals = json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]
    assert totals["pairs"] == 3 and totals["kept_empty_chosen"] == 1 and totals["kept_empty_rejected"] == 1


def test_D08_training_file_malformed_json(tmp_path, capsys):
    def edit(lines):
        lines[1] = lines[1][:-5]
    data = ranked_file(tmp_path, edit=edit)
    refused_by_trainer(tmp_path, capsys, data, f"{data}:2: malformed JSON")


@pytest.mark.parametrize("key, value, field", [("reward", "high", "reward"), ("suffix", KeyError, "suffix"),
                                               ("prefix", [["no marker"], ["no marker"]], r"prefix\[0\]"),
                                               ("sft_index", 5, "sft_index"), ("sft_index", -1, "sft_index")])
def test_D09_training_row_wrong_type_missing_field_or_sft_index_out_of_range(tmp_path, capsys, key, value, field):
    data = ranked_file(tmp_path, edit=set_field(2, key, value))
    refused_by_trainer(tmp_path, capsys, data, f"{data}:3: field '{field}'")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_D10_nonfinite_reward_in_training_row_is_refused(tmp_path, capsys, value):
    """`"reward": [NaN, -1.0]` used to be accepted: the row's pairs were masked and its SFT gate closed, so it
    silently trained nothing. Now refused, naming the file, line and the field reward[0]."""
    data = ranked_file(tmp_path, edit=set_field(1, "reward", [value, -1.0]))
    assert ("NaN" if value != value else "Infinity") in data.read_text()
    refused_by_trainer(tmp_path, capsys, data, f"{data}:2: field 'reward\\[0\\]'", "finite")


def test_D10_nonfinite_reward_in_eval_and_reward_training_files(tmp_path, capsys):
    test_dir = tmp_path / "hh_test"
    bad = ranked_file(test_dir, name="helpful_base.json", edit=set_field(0, "reward", [1.0, float("nan")]))
    code, err = run_main("eval_hh/evaluate.py", ["generate", "--model_path", tmp_path / "m", "--test_dir", bad.parent,
                                                 "--out_dir", tmp_path / "eval", "--subsets", "helpful_base",
                                                 "--eval_reward_model", tmp_path / "rm"], capsys)
    assert_refused(code, err, f"{bad}:1: field 'reward\\[1\\]'")
    assert files_under(tmp_path / "eval") == []
    code, err = run_main("train/train_reward_model.py",
                         ["--model_name_or_path", tmp_path / "m", "--train_file", bad, "--eval_file", bad,
                          "--output_dir", tmp_path / "rm_out", "--log_dir", tmp_path / "rm_logs"], capsys)
    assert_refused(code, err, f"{bad}:1: field 'reward\\[1\\]'")
    assert files_under(tmp_path / "rm_out") == []


def test_D10_nonfinite_score_from_a_reward_model_stops_step_2_before_writing(tmp_path, capsys, monkeypatch):
    from clha.data.reward_scoring import RewardSource

    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(i) for i in range(1, 5)], split="train")
    assert run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "s1"], capsys)[0] == 0

    class Scorer:
        def score(self, prompts, responses, batch_size):
            return [float("nan") if i == 5 else float(i) for i in range(len(prompts))]
    monkeypatch.setattr(RewardSource, "scorer", lambda self: Scorer())
    (tmp_path / "rm").mkdir()
    code, err = run_step(2, ["--in_dir", tmp_path / "s1", "--train_out", tmp_path / "s2" / "train.json",
                             "--no_dev", "--reward_model", tmp_path / "rm"], capsys)
    assert_refused(code, err, r"helpful-base/train.jsonl:\d+: field 'reward\[1\]'", "finite")
    assert files_under(tmp_path / "s2") == []


def test_D11_rankings_of_mixed_length(tmp_path, capsys):
    def edit(lines):   # row 3 has 2 candidates, the others 3
        row = json.loads(lines[2])
        row.update(prefix=row["prefix"][:2], suffix=row["suffix"][:2], reward=row["reward"][:2])
        lines[2] = json.dumps(row)
    data = ranked_file(tmp_path, n=3, edit=edit)
    refused_by_trainer(tmp_path, capsys, data, f"{data}:3: field 'suffix'", "2 candidates",
                       extra=["--training_stage_num", "3"])


def test_D12_empty_training_file(tmp_path, capsys):
    data = tmp_path / "data" / "train.json"
    data.parent.mkdir()
    data.write_text("")
    refused_by_trainer(tmp_path, capsys, data, "no training examples")


def test_D13_prompt_longer_than_the_context_is_cut_from_the_left(tiny_lm_dir):
    from transformers import AutoTokenizer

    from clha.collate import RankedCollator
    from clha.data.format import RankedExample

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    long_prompt = PROMPTER + " ".join(f"w{i}" for i in range(3000)) + " LAST"
    ex = RankedExample([[long_prompt, ASSISTANT]] * 2, ["a short reply", ""], [1.0, -1.0])
    for layout in ("padded", "shared_prompt"):
        batch = RankedCollator(tok, 160, 2, layout=layout, append_eos=True)([ex])
        assert batch["input_ids"].shape[-1] <= 2 * 160
        assert batch["token_counts"].min() >= 1          # the empty reply still scores its EOS token
    ids = RankedCollator(tok, 160, 2, layout="padded", append_eos=True)([ex])["input_ids"][0].tolist()
    text = tok.decode(ids)
    assert "LAST" in text and "w0 " not in text                  # the latest words kept, the oldest cut


# ---------------------------------------------------------------------------------------------------------------
# S: settings (refused when the config is built, before data or a model is loaded)
# ---------------------------------------------------------------------------------------------------------------

def test_S01_block_size_not_above_the_response_budget_is_refused_before_loading(tmp_path, tiny_lm_dir):
    """`--block_size 128` used to pass the config check, load the model and die in the collator with a ValueError
    traceback. Now train/main.py refuses it (exit 2, field 'block_size') and writes nothing."""
    data = ranked_file(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"),
                           *map(str, train_args(tiny_lm_dir, data, tmp_path, extra=["--block_size", "128"]))],
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_refused(proc.returncode, proc.stderr, "field 'block_size'", "response budget of 128")
    assert "loading" not in proc.stderr.lower() or "model" not in proc.stderr.lower().split("error:")[0]
    assert files_under(tmp_path / "out") == [] and files_under(tmp_path / "logs") == []


@pytest.mark.parametrize("flag, value", [("--block_size", "100"), ("--per_device_train_batch_size", "0"),
                                         ("--gradient_accumulation_steps", "0"), ("--num_train_epochs", "0"),
                                         ("--max_new_tokens", "0"), ("--rank_margin", "-1"), ("--dpo_beta", "0"),
                                         ("--temperature", "0"), ("--sft_weight", "-0.5"), ("--learning_rate", "-1e-5"),
                                         ("--learning_rate", "nan"), ("--learning_rate", "0"),
                                         ("--max_grad_norm", "-1"), ("--warmup_steps", "-3"),
                                         ("--weight_decay", "-0.1"), ("--max_row_tokens", "-1"),
                                         ("--reward_gap_threshold", "nan"), ("--training_stage_num", "0")])
def test_S02_values_that_cannot_work_are_refused_naming_the_field(tmp_path, capsys, flag, value):
    data = ranked_file(tmp_path)
    refused_by_trainer(tmp_path, capsys, data, f"field '{flag[2:]}'", extra=[f"{flag}={value}"])


def test_S03_documented_ablation_values_are_accepted():
    from clha.config import parse_config

    for extra in (["--reward_gap_threshold=-1"], ["--sft_reward_threshold=-inf"], ["--rank_margin", "0"],
                  ["--block_size", "129"], ["--max_grad_norm", "0"]):
        parse_config(["--model_name_or_path", "m", "--train_file_path", "t", "--do_train", *extra]).validate()


def test_S04_ranking_length_above_the_data_is_refused_before_the_model_loads(tmp_path, capsys):
    data = ranked_file(tmp_path, n=2)
    # the model path does not exist: the data is checked first, so the error names the data, not the model
    refused_by_trainer(tmp_path, capsys, data, f"{data}:1: field 'suffix'", "training_stage_num asks for 3",
                       extra=["--training_stage_num", "3"])


@pytest.mark.parametrize("flag, value", [("--block_size", "128"), ("--max_new_tokens", "0"),
                                         ("--gen_batch_size", "0"), ("--limit", "-1")])
def test_S05_evaluation_settings_that_cannot_work(tmp_path, capsys, flag, value):
    code, err = run_main("eval_hh/evaluate.py", ["generate", "--model_path", tmp_path / "m", "--test_dir",
                                                 tmp_path / "t", "--out_dir", tmp_path / "eval", f"{flag}={value}"],
                         capsys)
    assert_refused(code, err, f"field '{flag[2:]}'")
    assert files_under(tmp_path / "eval") == []


def _rm_args(tmp_path, *extra):
    data = ranked_file(tmp_path)
    return ["--model_name_or_path", tmp_path / "no_model", "--train_file", data, "--eval_file", data,
            "--output_dir", tmp_path / "rm_out", "--log_dir", tmp_path / "rm_logs", *extra]


@pytest.mark.parametrize("flag, value", [("--per_device_train_batch_size", "0"), ("--max_length", "0"),
                                         ("--num_train_epochs", "0"), ("--warmup_ratio", "1.5")])
def test_S06_reward_training_settings_that_cannot_work(tmp_path, capsys, flag, value):
    code, err = run_main("train/train_reward_model.py", _rm_args(tmp_path, f"{flag}={value}"), capsys)
    assert_refused(code, err, f"field '{flag[2:]}'")
    assert files_under(tmp_path / "rm_out") == [] and files_under(tmp_path / "rm_logs") == []


@pytest.mark.parametrize("flag, value", [("--learning_rate", "-1e-4"), ("--learning_rate", "nan"),
                                         ("--weight_decay", "-1"), ("--max_grad_norm", "-1")])
def test_S07_reward_training_negative_rates_are_refused(tmp_path, capsys, flag, value):
    code, err = run_main("train/train_reward_model.py", _rm_args(tmp_path, f"{flag}={value}"), capsys)
    assert_refused(code, err, f"field '{flag[2:]}'")


def test_S08_preprocessing_settings_that_cannot_work(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(i) for i in range(1, 4)], split="train")
    assert run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "s1"], capsys)[0] == 0
    (tmp_path / "rm").mkdir()
    common = ["--in_dir", tmp_path / "s1", "--train_out", tmp_path / "s2" / "train.json", "--reward_model",
              tmp_path / "rm"]
    assert_refused(*run_step(2, [*common, "--dev_size", "-1"], capsys), "dev_size must be >= 0")
    assert_refused(*run_step(2, [*common, "--batch_size", "0"], capsys), "batch_size must be >= 1")
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "p", "--partition",
                             "--partition_fractions", "0.5", "0.5", "0.5", "0.5"], capsys)
    assert_refused(code, err, "sum")
    assert files_under(tmp_path / "s2") == [] and files_under(tmp_path / "p") == []


# ---------------------------------------------------------------------------------------------------------------
# P: paths
# ---------------------------------------------------------------------------------------------------------------

def test_P01_missing_policy_model(tmp_path, capsys):
    data = ranked_file(tmp_path)
    refused_by_trainer(tmp_path, capsys, data, "no_such_model", "does not exist",
                       model=str(tmp_path / "no_such_model"))


def test_P02_missing_reward_model(tmp_path, capsys, tiny_lm_dir):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(i) for i in range(1, 4)], split="train")
    assert run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "s1"], capsys)[0] == 0
    code, err = run_step(2, ["--in_dir", tmp_path / "s1", "--train_out", tmp_path / "s2" / "t.json",
                             "--reward_model", tmp_path / "no_rm"], capsys)
    assert_refused(code, err, "no_rm", "does not exist")
    code, err = run_step(3, ["--in_dir", tmp_path / "s1", "--out_dir", tmp_path / "s3",
                             "--reward_model", tmp_path / "no_rm"], capsys)
    assert_refused(code, err, "no_rm", "does not exist")
    assert files_under(tmp_path / "s2") == [] and files_under(tmp_path / "s3") == []
    # the trainer's validation reward model, checked before the policy is loaded or anything written
    data = ranked_file(tmp_path)
    dev = ranked_file(tmp_path, name="dev.json")
    refused_by_trainer(tmp_path, capsys, data, "no_rm", "does not exist", model=tiny_lm_dir,
                       extra=["--do_validation", "--validation_file_path", dev.parent, "--validation_file_name",
                              dev.name, "--reward_model", tmp_path / "no_rm"])
    # evaluation
    test_dir = tmp_path / "hh_test"
    ranked_file(test_dir, name="helpful_base.json")
    code, err = run_main("eval_hh/evaluate.py", ["generate", "--model_path", tiny_lm_dir, "--test_dir",
                                                 test_dir / "data", "--out_dir", tmp_path / "eval", "--subsets",
                                                 "helpful_base", "--eval_reward_model", tmp_path / "no_rm"], capsys)
    assert_refused(code, err, "no_rm", "does not exist")
    assert files_under(tmp_path / "eval") == []


def test_P03_output_folder_is_a_file(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(i) for i in range(1, 4)])
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be\n")
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", blocker], capsys)
    assert_refused(code, err, "cannot write", "Not a directory|File exists")
    assert blocker.read_text().startswith("a file")


def test_P03_trainer_output_folder_is_a_file(tmp_path, capsys, tiny_lm_dir):
    data = ranked_file(tmp_path)
    (tmp_path / "out").write_text("x\n")
    code, err = run_main("train/main.py", train_args(tiny_lm_dir, data, tmp_path), capsys)
    assert_refused(code, err, str(tmp_path / "out"))
    assert (tmp_path / "out").read_text() == "x\n"


def _fail_writes(monkeypatch, code: int, after_bytes: int = 0):
    """Make every atomic file write fail with OSError(code) once `after_bytes` bytes were written (0: at open)."""
    import clha.fileio

    if after_bytes == 0:
        def mkstemp(*args, **kwargs):
            raise OSError(code, os.strerror(code), kwargs.get("dir"))
        monkeypatch.setattr(clha.fileio.tempfile, "mkstemp", mkstemp)
        return
    real_fdopen = os.fdopen

    class Filling:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, text):
            self.written += len(text)
            if self.written > after_bytes:
                raise OSError(code, os.strerror(code))
            return self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)
    monkeypatch.setattr(clha.fileio.os, "fdopen", lambda *a, **k: Filling(real_fdopen(*a, **k)))


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_P04_output_folder_not_writable(tmp_path, capsys, monkeypatch, code):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(i) for i in range(1, 4)])
    _fail_writes(monkeypatch, code)           # as root a chmod does not stop writes: fail them at the source
    code_, err = run_step(1, ["--raw_dir", raw, "--out_dir", tmp_path / "out"], capsys)
    assert_refused(code_, err, "cannot write", os.strerror(code))
    assert [p for p in files_under(tmp_path / "out") if not p.endswith("/") and "." in Path(p).name] == []


def test_P05_disk_full_mid_write_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    write_raw(raw, [raw_line(i) for i in range(1, 40)])
    out = tmp_path / "out"
    assert run_step(1, ["--raw_dir", raw, "--out_dir", out], capsys)[0] == 0
    before = {p: (out / p).read_bytes() for p in files_under(out) if (out / p).is_file()}
    write_raw(raw, [raw_line(i, good=f"a changed answer {i}") for i in range(1, 40)])
    _fail_writes(monkeypatch, errno.ENOSPC, after_bytes=2000)
    code, err = run_step(1, ["--raw_dir", raw, "--out_dir", out], capsys)
    assert_refused(code, err, "cannot write", "No space left on device")
    after = {p: (out / p).read_bytes() for p in files_under(out) if (out / p).is_file()}
    assert after == before                        # the previous complete output, byte for byte; no temp file left


# ---------------------------------------------------------------------------------------------------------------
# F: faults (SIGKILL, a dead process, a full disk during training; reruns after a crash)
# ---------------------------------------------------------------------------------------------------------------

# Runs an entry script in a process that SIGKILLs itself at a chosen point. The point is a patched function of a
# third-party library (accelerate, transformers, torch, or clha.fileio), so it does not depend on the trainer's
# internals: CLHA_KILL=<what>:<n> kills on the n-th call.
_KILLER = """
import os, runpy, signal, sys
what, n = os.environ["CLHA_KILL"].split(":")
n, calls = int(n), {"k": 0}
only_rank = os.environ.get("CLHA_KILL_RANK")
def hit():
    if only_rank is not None and os.environ.get("RANK", "0") != only_rank:
        return
    calls["k"] += 1
    if calls["k"] == n:
        stamp = os.environ.get("CLHA_KILL_STAMP")
        if stamp:
            open(stamp, "w").write(repr(__import__("time").time()))
        os.kill(os.getpid(), signal.SIGKILL)
if what == "save_state":            # after accelerate wrote the state files, before position.json and `latest`
    import accelerate
    real = accelerate.Accelerator.save_state
    def save_state(self, *a, **k):
        out = real(self, *a, **k)
        hit()
        return out
    accelerate.Accelerator.save_state = save_state
elif what == "save_pretrained":     # after the checkpoint weights were written, before the folder is complete
    import transformers
    real = transformers.PreTrainedModel.save_pretrained
    def save_pretrained(self, *a, **k):
        out = real(self, *a, **k)
        hit()
        return out
    transformers.PreTrainedModel.save_pretrained = save_pretrained
elif what == "optimizer_step":      # in the middle of training
    import torch
    real = torch.optim.AdamW.step
    def step(self, *a, **k):
        hit()
        return real(self, *a, **k)
    torch.optim.AdamW.step = step
elif what == "jsonl_row":           # in the middle of writing an output file
    import clha.fileio
    real = clha.fileio.dumps_line
    def dumps_line(obj):
        hit()
        return real(obj)
    clha.fileio.dumps_line = dumps_line
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed(script, argv, kill: str, timeout=600, **env):
    return subprocess.run([sys.executable, "-c", _KILLER, str(REPO / script), *map(str, argv)],
                          env=subprocess_env(CLHA_KILL=kill, **env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def run_script(script, argv, timeout=600):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _steps(logs: Path):
    return [json.loads(x)["step"] for x in (logs / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _complete_checkpoint(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "clha_config.json"))


@pytest.mark.slow
@slow_campaign
@pytest.mark.parametrize("kill", ["save_state:2", "save_pretrained:2"])
def test_F01_sigkill_during_checkpoint_save_resumes_from_last_complete_state(tmp_path, tiny_lm_dir, kill):
    """Killed while writing the step-4 checkpoint (its train state, or its model folder): the rerun with
    --resume_from_checkpoint latest resumes from step 2, the last complete state, and finishes; no partial
    checkpoint is ever visible under its final name."""
    data = ranked_file(tmp_path, num=16)
    args = train_args(tiny_lm_dir, data, tmp_path, steps=6, extra=["--resume_from_checkpoint", "latest"])
    proc = run_killed("train/main.py", args, kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    out = tmp_path / "out"
    assert (out / "train_state" / "latest").read_text().strip() == "step_2"
    for ckpt in out.glob("step_*"):
        assert _complete_checkpoint(ckpt), ckpt         # only complete folders carry a final name
    proc = run_script("train/main.py", args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {out / 'train_state' / 'step_2'}" in proc.stderr
    assert _steps(tmp_path / "logs") == [1, 2, 3, 4, 5, 6]            # each step once: only steps 3-4 redone
    assert all(_complete_checkpoint(out / f"step_{s}") for s in (2, 4, 6))
    assert (out / "train_state" / "latest").read_text().strip() == "step_6"


@pytest.mark.slow
@slow_campaign
def test_F02_disk_full_during_training_checkpoint_loses_only_the_unsaved_steps(tmp_path, tiny_lm_dir):
    """The disk fills up while step 4 is saved (writes fail with ENOSPC from the 2nd checkpoint on): the run stops
    with an error, the last complete state (step 2) is intact, and a rerun resumes from it."""
    data = ranked_file(tmp_path, num=16)
    args = train_args(tiny_lm_dir, data, tmp_path, steps=6, extra=["--resume_from_checkpoint", "latest"])
    full = """
import errno, os, runpy, sys
import transformers
real, calls = transformers.PreTrainedModel.save_pretrained, {"n": 0}
def save_pretrained(self, *a, **k):
    calls["n"] += 1
    if calls["n"] >= 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, *a, **k)
transformers.PreTrainedModel.save_pretrained = save_pretrained
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", full, str(REPO / "train" / "main.py"), *map(str, args)],
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "train_state" / "latest").read_text().strip() == "step_2"
    assert not (out / "step_4").exists() and _complete_checkpoint(out / "step_2")
    proc = run_script("train/main.py", args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _steps(tmp_path / "logs") == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@slow_campaign
def test_F02_disk_full_during_training_is_one_error_line(tmp_path, tiny_lm_dir, capsys, monkeypatch):
    import transformers

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    data = ranked_file(tmp_path, num=8)
    code, err = run_main("train/main.py", train_args(tiny_lm_dir, data, tmp_path, steps=2), capsys)
    assert_refused(code, err, "No space left on device", str(tmp_path / "out"))


@pytest.mark.slow
@slow_campaign
def test_F03_sigkill_of_one_of_two_processes_stops_the_other(tmp_path, tiny_lm_dir):
    """Two CPU processes (DDP over gloo); process 1 is SIGKILLed at its 3rd optimizer step. The launcher must stop
    process 0 and exit non-zero well within a minute, instead of hanging until the collective timeout."""
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate launcher not installed")
    data = ranked_file(tmp_path, num=32)
    wrapper = tmp_path / "killed_main.py"
    wrapper.write_text(f"import sys\nsys.argv = ['-c', {str(REPO / 'train' / 'main.py')!r}] + sys.argv[1:]\n"
                       f"exec(compile({_KILLER!r}, 'killer', 'exec'))\n")
    stamp = tmp_path / "killed_at"
    cmd = [exe, "launch", "--config_file", str(REPO / "train" / "ddp_cpu.yaml"), "--num_processes", "2",
           str(wrapper), *map(str, train_args(tiny_lm_dir, data, tmp_path, steps=8,
                                               extra=["--ddp_timeout_minutes", "30"]))]
    env = subprocess_env(ACCELERATE_USE_CPU="true", CLHA_KILL="optimizer_step:3", CLHA_KILL_RANK="1",
                         CLHA_KILL_STAMP=str(stamp))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the surviving process hung after its peer was killed")
    ended = time.time()
    assert stamp.exists(), out[-4000:]
    assert proc.returncode != 0, out[-4000:]
    stopped_after = ended - float(stamp.read_text())
    assert stopped_after < 60, f"the other process stopped {stopped_after:.0f} s after the kill"
    print(f"F03: launcher exited {stopped_after:.1f} s after process 1 was killed")
    # and the run resumes from its last complete state (step 2) with both processes
    if (tmp_path / "out" / "train_state" / "latest").exists():
        assert (tmp_path / "out" / "train_state" / "latest").read_text().strip() == "step_2"


@pytest.mark.slow
@slow_campaign
def test_F04_rerun_of_each_preprocessing_step_after_a_crash_mid_write(tmp_path, capsys):
    """SIGKILL in the middle of writing the outputs of step 1, 2 and 3 in turn: nothing partial under a final name,
    the next step refuses the incomplete input (step 1 writes its manifest last), and a rerun of the killed step
    gives the same bytes as an uninterrupted run."""
    from clha.testing.tiny_reward import save_tiny_seqcls_reward_model

    raw = tmp_path / "raw"
    for subset in ("harmless-base", "helpful-base"):
        write_raw(raw, [raw_line(i, good=f"{subset} answer {i}") for i in range(1, 25)], subset=subset)
    rm = save_tiny_seqcls_reward_model(tmp_path / "rm", seed=1)
    s1 = ["--raw_dir", raw, "--partition", "--partition_fractions", "0.5", "0.1", "0.2", "0.2"]
    s2 = ["--train_out", "s2/train.json", "--dev_out", "s2/dev.json", "--dev_size", "3", "--reward_model", rm,
          "--device", "cpu"]
    s3 = ["--out_dir", "s3", "--reward_model", rm, "--device", "cpu"]
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"

    def argv(step, root):
        if step == 1:
            return [*s1, "--out_dir", root / "s1"]
        rest = [root / a if a in ("s2/train.json", "s2/dev.json", "s3") else a for a in (s2 if step == 2 else s3)]
        return ["--in_dir", root / "s1", *rest]

    scripts = {1: "step_1_process.py", 2: "step_2_gen_train_data.py", 3: "step_3_gen_test_data.py"}
    for step in (1, 2, 3):
        proc = run_script(f"train/hh_preprocess_data/{scripts[step]}", argv(step, clean), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (1, 2, 3):
        proc = run_killed(f"train/hh_preprocess_data/{scripts[step]}", argv(step, crashed), "jsonl_row:7",
                          timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        visible = [p for p in files_under(crashed) if not Path(p).name.startswith(".")]
        for p in visible:   # every visible file is complete: identical to the clean run's
            if (crashed / p).is_file():
                assert (crashed / p).read_bytes() == (clean / p).read_bytes(), p
        if step == 1:
            assert not (crashed / "s1" / "manifest.json").exists()
            code, err = run_step(2, argv(2, crashed), capsys)
            assert_refused(code, err, "manifest.json|step-1 output")
        proc = run_script(f"train/hh_preprocess_data/{scripts[step]}", argv(step, crashed), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for p in files_under(clean):
        if (clean / p).is_file() and not Path(p).name.startswith("."):
            expected = (clean / p).read_bytes()
            if p.endswith("manifest.json"):
                expected = expected.replace(str(clean).encode(), str(crashed).encode())
            assert (crashed / p).read_bytes() == expected, p

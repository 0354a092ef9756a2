"""The base layer (clha/loading.py) and the one configuration mechanism (clha/options.py): model locations, dtypes,
atomic folders, option aliases, the entry points' help; and the entry scripts run through the installed package."""

import subprocess
import sys

import pytest
import torch

from clha.errors import InputError
from clha.loading import check_location, looks_local, resolve_dtype, save_hf_folder
from tests.conftest import REPO, make_ranked_rows


@pytest.mark.parametrize("name", ["my_rm/", "./x", "../x", "/abs/x", "~/x", "a/b/c", "a\\b", ".", ".."])
def test_strings_that_can_only_be_paths(name):
    assert looks_local(name)


@pytest.mark.parametrize("name", ["gpt2", "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1", "org/name"])
def test_hub_ids(name):
    assert not looks_local(name)


def test_check_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="my_rm/: field 'reward_model': reward model path does not exist"):
        check_location("my_rm/", "reward_model", "reward model")
    assert check_location("org/name", "model_name_or_path") == "org/name"        # a hub id: checked when loaded
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a model folder"):
        check_location("./file", "model_name_or_path")
    (tmp_path / "m").mkdir()
    with pytest.raises(InputError, match="GGUF file 'w.gguf' not found"):
        check_location("m", "model_name_or_path", gguf_file="w.gguf")
    assert check_location("m", "model_name_or_path") == "m"


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


def test_trainer_refuses_a_missing_local_model_folder_before_writing_anything(tmp_path, monkeypatch):
    """`my_model/` (relative, trailing slash) that does not exist is a path, not a hub id: the trainer stops with
    "model path does not exist" before creating output_dir or log_path (it used to try a download)."""
    from clha.config import parse_config
    from clha.data.format import write_ranked
    from clha.training.trainer import run_training

    monkeypatch.chdir(tmp_path)
    write_ranked(tmp_path / "train.json", make_ranked_rows(2, seed=0))
    cfg = parse_config(["--model_name_or_path", "my_model/", "--train_file_path", "train.json", "--do_train",
                        "--output_dir", "out", "--log_path", "logs"])
    with pytest.raises(InputError, match="my_model/: field 'model_name_or_path': model path does not exist"):
        run_training(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_trainer_refuses_a_missing_local_reward_model_before_loading_the_policy(tmp_path, monkeypatch, tiny_lm_dir):
    from clha.config import parse_config
    from clha.data.format import write_ranked
    from clha.training.trainer import run_training

    monkeypatch.chdir(tmp_path)
    write_ranked(tmp_path / "dev.json", make_ranked_rows(2, seed=0))
    cfg = parse_config(["--model_name_or_path", tiny_lm_dir, "--do_validation", "--validation_file_path", ".",
                        "--validation_file_name", "dev.json", "--reward_model", "my_rm/", "--output_dir", "out"])
    with pytest.raises(InputError, match="my_rm/: field 'reward_model': reward model path does not exist"):
        run_training(cfg)
    assert not (tmp_path / "out").exists()


def test_reward_training_refuses_a_missing_local_backbone(tmp_path, monkeypatch):
    from clha.rm.model import load_backbone

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="my_rm/: field 'model_name_or_path': model path does not exist"):
        load_backbone("my_rm/")


class _Saveable:
    def __init__(self, fail=False):
        self.fail = fail

    def save_pretrained(self, folder, **kw):
        if self.fail:
            raise RuntimeError("disk full")
        folder.mkdir(parents=True, exist_ok=True)       # as transformers' save_pretrained does
        (folder / "weights.bin").write_text("w")


def test_save_hf_folder_is_atomic(tmp_path):
    out = tmp_path / "ckpt"
    save_hf_folder(out, _Saveable(), _Saveable(), {"config.json": {"a": 1}})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.bin"]
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf_folder(out, _Saveable(fail=True), _Saveable(), {"config.json": {"a": 2}})
    assert (out / "config.json").read_text().count('"a": 1') == 1          # the previous folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]                 # and no temporary folder is left


# ---------------------------------------------------------------------------------------------- configurations
def test_old_option_names_still_work():
    from clha.eval.config import EvalConfig, parse_config as parse_eval
    from clha.rm.config import RewardTrainConfig, parse_reward_config

    _, cfg = parse_eval(["score", "--model_path", "m", "--out_dir", "o", "--dtype", "float32"])
    assert cfg.torch_dtype == "float32"
    assert EvalConfig(model_path="m", out_dir="o", dtype="bfloat16").torch_dtype == "bfloat16"
    old = parse_reward_config(["--model_name_or_path", "x", "--train_file", "t.json", "--log_dir", "l"])
    new = parse_reward_config(["--model_name_or_path", "x", "--train_file_path", "t.json", "--log_path", "l"])
    assert old == new and old.train_file_path == "t.json" and old.log_path == "l"
    assert RewardTrainConfig.from_dict({"model_name_or_path": "x", "train_file": "t", "log_dir": "l"}) == \
        RewardTrainConfig(model_name_or_path="x", train_file_path="t", log_path="l")
    with pytest.raises(TypeError, match="two names of one setting"):
        RewardTrainConfig(train_file="a", train_file_path="b")


def test_loss_defaults_are_written_once():
    import inspect

    from clha.config import TrainConfig
    from clha.losses import clha_loss, dpo_loss

    cfg = TrainConfig()
    for name, p in inspect.signature(clha_loss).parameters.items():
        if p.default is not inspect.Parameter.empty:
            assert getattr(cfg, name) == p.default, name
    assert cfg.dpo_beta == inspect.signature(dpo_loss).parameters["beta"].default


def test_evaluation_refuses_responses_longer_than_the_budget():
    """The prompt is cut to block_size - RESPONSE_BUDGET tokens, so more new tokens than the budget would let
    prompt + response exceed block_size."""
    from clha.data.tokenize import RESPONSE_BUDGET
    from clha.eval.config import parse_config as parse_eval

    _, cfg = parse_eval(["generate", "--model_path", "m", "--out_dir", "o"])
    assert cfg.max_new_tokens == RESPONSE_BUDGET
    with pytest.raises(InputError, match=f"field 'max_new_tokens': must be at most the {RESPONSE_BUDGET}-token"):
        parse_eval(["generate", "--model_path", "m", "--out_dir", "o", "--max_new_tokens", str(RESPONSE_BUDGET + 1)])


ENTRY_SCRIPTS = ["train/main.py", "train/train_reward_model.py", "eval_hh/evaluate.py", "eval_hh/compare.py",
                 "train/hh_preprocess_data/step_1_process.py", "train/hh_preprocess_data/step_2_gen_train_data.py",
                 "train/hh_preprocess_data/step_3_gen_test_data.py"]


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_scripts_import_the_installed_package(script):
    """No entry script edits sys.path: they import `clha` as installed (pip install -e .)."""
    assert "sys.path" not in (REPO / script).read_text()


def test_entry_points_run_from_anywhere_and_share_one_help_mechanism(tmp_path):
    """The three configurable entry points, run from another folder in isolated mode (no PYTHONPATH, no script
    folder on sys.path), print help built from their config dataclasses (`clha.options.build_parser`)."""
    for script, option in (("train/main.py", "--log_path LOG_PATH"), ("train/train_reward_model.py", "--log_path"),
                           ("eval_hh/evaluate.py", "--torch_dtype")):
        proc = subprocess.run([sys.executable, "-I", str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert option in proc.stdout and "(default:" in proc.stdout, (script, proc.stdout[:500])

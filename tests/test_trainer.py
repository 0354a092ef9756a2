"""The trainer end to end on a tiny model: training, checkpoints, validation, resume after SIGKILL, errors."""

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clha.config import TrainConfig, parse_config
from clha.data.format import write_ranked
from clha.data.order import epoch_order, micro_batch, steps_per_epoch
from clha.errors import InputError
from tests.conftest import REPO, make_ranked_rows


# ---------------------------------------------------------------- data order
def test_epoch_order_covers_every_example_once_per_epoch():
    n, bs, world, accum = 23, 2, 2, 3
    order = epoch_order(n, 0, 42, bs, world, accum)
    steps = steps_per_epoch(n, bs, world, accum)
    assert steps == 2 and len(order) == 24
    seen = [i for s in range(steps) for m in range(accum) for r in range(world)
            for i in micro_batch(order, s, m, r, bs, world, accum)]
    assert sorted(set(seen)) == list(range(n))      # nothing skipped
    assert len(seen) - len(set(seen)) == 24 - 23     # only the wrap-around pad repeats
    # a different epoch gives a different permutation; the same epoch the same one
    assert not np.array_equal(order, epoch_order(n, 1, 42, bs, world, accum))
    assert np.array_equal(order, epoch_order(n, 0, 42, bs, world, accum))


def test_ranks_get_disjoint_shares():
    order = epoch_order(40, 0, 1, 2, 4, 1)
    shares = [set(micro_batch(order, 0, 0, r, 2, 4, 1)) for r in range(4)]
    assert sum(len(s) for s in shares) == len(set().union(*shares)) == 8


# ---------------------------------------------------------------- config
def test_seed_arguments_parse_with_their_meaning():
    cfg = parse_config(["--task", "hh", "--train_file_path", "d", "--validation_file_path", "v",
                        "--validation_file_name", "sampled_dev.json", "--output_dir", "o", "--log_path", "l",
                        "--index", "7", "--seed", "1", "--temperature", "1", "--sft_weight", "0.05",
                        "--num_train_epochs", "2", "--training_stage_num", "2", "--block_size", "512",
                        "--learning_rate", "5e-6", "--per_device_train_batch_size", "2",
                        "--per_device_eval_batch_size", "28", "--model_name_or_path", "m", "--do_train",
                        "--do_validation", "--gradient_accumulation_steps", "8", "--checkpointing_step", "600",
                        "--max_train_steps", "10", "--reward_model", "rm"])
    assert cfg.do_train and cfg.do_validation and cfg.gradient_accumulation_steps == 8
    assert cfg.learning_rate == 5e-6 and cfg.loss_type == "clha" and cfg.max_train_steps == 10
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.append_eos and parse_config(["--model_name_or_path", "m", "--no-append_eos"]).append_eos is False


def test_an_infinite_gate_is_saved_as_strict_json_and_read_back():
    # the comparison's clha_nogate ablation: the SFT term always on
    cfg = parse_config(["--model_name_or_path", "m", "--sft_reward_threshold=-inf"])
    text = cfg.to_json()
    assert '"sft_reward_threshold": "-inf"' in text and "Infinity" not in text
    back = TrainConfig.from_dict(json.loads(text))
    assert back == cfg and back.sft_reward_threshold == float("-inf")


def test_validation_without_reward_model_is_refused():
    cfg = TrainConfig(model_name_or_path="m", do_validation=True, validation_file_path="v",
                      validation_file_name="f.json")
    with pytest.raises(InputError, match="reward_model"):
        cfg.validate()


# ---------------------------------------------------------------- end to end
def _write_data(tmp: Path, num=24, n=2, seed=0) -> Path:
    path = tmp / "train" / "train.json"
    write_ranked(path, make_ranked_rows(num, n=n, seed=seed))
    return path


def _args(model, data, out, logs, steps, extra=()):
    return ["--model_name_or_path", model, "--train_file_path", str(data), "--output_dir", str(out),
            "--log_path", str(logs), "--do_train", "--max_train_steps", str(steps), "--block_size", "160",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--checkpointing_step", "2", "--seed", "3", "--no-save_epoch_checkpoints", "--num_train_epochs", "10",
            "--reward_gap_threshold", "1.0", "--rank_margin", "1.0", *extra]


def _run_main(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "train" / "main.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _rows(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _weights(ckpt: Path):
    from safetensors.torch import load_file
    return load_file(str(ckpt / "model.safetensors"))


# Runs train/main.py in a process that SIGKILLs itself right after writing the metrics of optimizer step
# CLHA_TEST_KILL_AT_STEP (before that step's checkpoint): the crash point is the same on every run and machine.
_KILL_AT_STEP = """
import os, runpy, signal, sys
import clha.training.trainer
step = int(os.environ["CLHA_TEST_KILL_AT_STEP"])
log = clha.training.trainer.Trainer._log_metrics
def log_then_die(self, metrics):
    log(self, metrics)
    if metrics["step"] == step:
        os.kill(os.getpid(), signal.SIGKILL)
clha.training.trainer.Trainer._log_metrics = log_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_lm_dir):
    data = _write_data(tmp_path)
    steps, warmup, lr = 8, 2, 1e-3
    schedule = ["--lr_scheduler_type", "linear", "--warmup_steps", str(warmup)]   # the lr changes every step
    # Uninterrupted reference run.
    ref = _run_main(_args(tiny_lm_dir, data, tmp_path / "a", tmp_path / "la", steps, schedule))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    # Same run, killed with SIGKILL after step 3..6 (seeded choice; an even step dies before its checkpoint, so the
    # resume goes back two steps), then resumed.
    kill_at = random.Random(16).randint(3, 6)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CLHA_TEST_KILL_AT_STEP=str(kill_at))
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_STEP, str(REPO / "train" / "main.py"),
                           *_args(tiny_lm_dir, data, tmp_path / "b", tmp_path / "lb", steps, schedule)],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-4000:]
    metrics = tmp_path / "lb" / "metrics.jsonl"
    assert [m["step"] for m in _rows(metrics)] == list(range(1, kill_at + 1))
    resumed = _run_main(_args(tiny_lm_dir, data, tmp_path / "b", tmp_path / "lb", steps,
                              [*schedule, "--resume_from_checkpoint", "latest"]))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed from {tmp_path / 'b' / 'train_state' / f'step_{kill_at - kill_at % 2}'}" in out

    a_metrics, b_metrics = _rows(tmp_path / "la" / "metrics.jsonl"), _rows(metrics)
    assert [m["step"] for m in b_metrics] == list(range(1, steps + 1))  # each step logged once
    # linear warm-up then decay to 0 (the lr logged after step s is the one step s + 1 uses), by hand:
    # lr * s / warmup while s < warmup, then lr * (steps - s) / (steps - warmup)
    hand = [lr * (s / warmup if s < warmup else (steps - s) / (steps - warmup)) for s in range(1, steps + 1)]
    assert [m["lr"] for m in a_metrics] == pytest.approx(hand, rel=1e-9, abs=1e-15)
    assert [m["lr"] for m in b_metrics] == pytest.approx(hand, rel=1e-9, abs=1e-15)  # scheduler state resumed
    for a, b in zip(a_metrics, b_metrics):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]
    # no example skipped or repeated: the data order of every step is that of the uninterrupted run
    assert _rows(tmp_path / "lb" / "data_order.jsonl") == _rows(tmp_path / "la" / "data_order.jsonl")
    wa, wb = _weights(tmp_path / "a" / f"step_{steps}"), _weights(tmp_path / "b" / f"step_{steps}")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


def test_training_lowers_loss_and_writes_checkpoints(tmp_path, tiny_lm_dir):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=8)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 12,
                             ["--gradient_accumulation_steps", "1", "--checkpointing_step", "6"]))
    summary = run_training(cfg)
    assert summary["global_step"] == 12
    rows = _rows(tmp_path / "l" / "metrics.jsonl")
    for key in ("loss", "rank_loss", "sft_loss", "rank_accuracy", "chosen_mean_logp", "rejected_mean_logp",
                "logp_margin", "masked_pair_fraction", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0], key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["logp_margin"] > rows[0]["logp_margin"]
    for name in ("step_6", "step_12"):
        ck = tmp_path / "o" / name
        assert (ck / "model.safetensors").exists() and (ck / "clha_config.json").exists()
        assert (ck / "tokenizer_config.json").exists()
    assert json.loads((tmp_path / "o" / "clha_config.json").read_text())["loss_type"] == "clha"
    assert list((tmp_path / "l" / "tensorboard").iterdir())


@pytest.mark.parametrize("append_eos", [True, False])
def test_trainer_batches_end_responses_with_eos_unless_told_not_to(tmp_path, tiny_lm_dir, append_eos):
    from clha.training.trainer import Trainer

    data = _write_data(tmp_path, num=4)
    extra = ["--gradient_accumulation_steps", "1"] + ([] if append_eos else ["--no-append_eos"])
    trainer = Trainer(parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 1, extra)))
    trainer.setup()
    examples = trainer.train_examples[:2]
    ends = [r[-1] for e in trainer.collator.encode(examples) for r in e.responses]
    eos = trainer.tokenizer.eos_token_id
    assert eos is not None and all((t == eos) == append_eos for t in ends)


def test_validation_keeps_best_checkpoint(tmp_path, tiny_lm_dir):
    from clha.testing.tiny_reward import save_tiny_seqcls_reward_model
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=8)
    dev = tmp_path / "dev" / "dev.json"
    write_ranked(dev, make_ranked_rows(5, seed=9))
    rm = save_tiny_seqcls_reward_model(tmp_path / "rm", seed=1)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 4,
                             ["--do_validation", "--validation_file_path", str(dev.parent),
                              "--validation_file_name", "dev.json", "--reward_model", str(rm),
                              "--max_new_tokens", "8", "--gradient_accumulation_steps", "1"]))
    summary = run_training(cfg)
    val = _rows(tmp_path / "l" / "validation.jsonl")
    assert [v["step"] for v in val] == [0, 2, 4]
    best = max(val, key=lambda v: v["dev_reward"])
    link = tmp_path / "o" / "best_checkpoint"
    assert link.is_symlink() and os.readlink(link) == f"step_{best['step']}"
    assert summary["best_reward"] == pytest.approx(best["dev_reward"])
    assert (link / "model.safetensors").exists()
    gens = _rows(tmp_path / "l" / "dev_generations_step_0.jsonl")
    assert [g["index"] for g in gens] == list(range(5))


@pytest.mark.parametrize("loss_type", ["sft", "pro", "rrhf", "dpo"])
def test_baselines_train_in_the_same_trainer(tmp_path, tiny_lm_dir, loss_type):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=6, n=3)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 3,
                             ["--loss_type", loss_type, "--training_stage_num", "3",
                              "--gradient_accumulation_steps", "1", "--checkpointing_step", "100"]))
    summary = run_training(cfg)
    rows = _rows(tmp_path / "l" / "metrics.jsonl")
    assert summary["global_step"] == 3 and len(rows) == 3
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_nonfinite_loss_stops_with_step_and_saves_nothing(tmp_path, tiny_lm_dir, monkeypatch):
    import clha.losses
    from clha.training.trainer import NonFiniteLossError, run_training

    real = clha.losses.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(clha.losses, "compute_loss", poisoned)
    data = _write_data(tmp_path, num=8)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 6,
                             ["--gradient_accumulation_steps", "1", "--checkpointing_step", "2"]))
    with pytest.raises(NonFiniteLossError, match="optimizer step 3"):
        run_training(cfg)
    saved = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "step_2" in saved and "step_3" not in saved and not any(s.startswith(".") for s in saved)


def test_missing_model_path_is_a_clear_error(tmp_path):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=2)
    cfg = parse_config(_args(str(tmp_path / "no_such_model"), data, tmp_path / "o", tmp_path / "l", 1))
    with pytest.raises(InputError, match="no_such_model.*model path does not exist"):
        run_training(cfg)


def test_bad_training_row_names_file_line_and_field(tmp_path, tiny_lm_dir):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=3)
    lines = data.read_text().splitlines()
    row = json.loads(lines[1])
    del row["reward"]
    lines[1] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 1))
    with pytest.raises(InputError, match=r"train\.json:2: field 'reward'"):
        run_training(cfg)
    assert not (tmp_path / "o").exists()


def test_fully_masked_batches_log_no_accuracy_and_train_only_sft(tmp_path, tiny_lm_dir):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=6)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 2,
                             ["--reward_gap_threshold", "100", "--gradient_accumulation_steps", "1"]))
    run_training(cfg)
    text = (tmp_path / "l" / "metrics.jsonl").read_text()
    assert "NaN" not in text
    rows = _rows(tmp_path / "l" / "metrics.jsonl")
    assert all(r["rank_accuracy"] is None and r["rank_loss"] == 0.0 and r["masked_pair_fraction"] == 1.0
               for r in rows)
    assert all(r["loss"] == pytest.approx(r["sft_loss"]) for r in rows)


# ---------------------------------------------------------------- DPO reference log-probs
@pytest.fixture
def fresh_accelerate(monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_dpo_reference_scores_only_the_run_steps_in_their_micro_batches(tmp_path, tiny_lm_dir, monkeypatch,
                                                                          fresh_accelerate, precision):
    import clha.modeling
    from clha.training.trainer import run_training

    real = clha.modeling.score_candidates
    reference_batches = []

    def counting(model, batch, **kwargs):
        if not torch.is_grad_enabled():                     # the reference pass
            reference_batches.append(sorted(int(i.split(":")[1]) - 1 for i in batch["example_ids"]))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(clha.modeling, "score_candidates", counting)
    data = _write_data(tmp_path, num=40)
    args = _args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 2,
                 ["--loss_type", "dpo", "--checkpointing_step", "1", "--mixed_precision", precision])
    run_training(parse_config(args))
    # exactly the 2 steps x 2 micro-batches of training, each scored once, in its training micro-batch
    order = epoch_order(40, 0, 3, 2, 1, 2)
    assert reference_batches == [sorted(micro_batch(order, s, m, 0, 2, 1, 2)) for s in range(2) for m in range(2)]
    seen = [i for r in _rows(tmp_path / "l" / "data_order.jsonl") for i in r["examples"]]
    assert sorted(i for b in reference_batches for i in b) == sorted(seen) and len(seen) == 8
    first = _rows(tmp_path / "l" / "metrics.jsonl")
    # policy == reference at the first step: every implicit reward is 0, the loss log 2. Exactly on the CPU, in bf16
    # too; on CUDA the no-grad reference pass may take other kernels than the training pass (measured on an H200 in
    # bf16: an implicit reward of 3.8e-7), so there the check is to float32 rounding of the summed log-probs.
    tol = 1e-5 if torch.cuda.is_available() else 0.0
    assert first[0]["chosen_reward"] == pytest.approx(0.0, abs=tol)
    assert first[0]["rejected_reward"] == pytest.approx(0.0, abs=tol)
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # resume from step 1: the cached reference log-probs are reused (no reference pass), step 2 is the same
    reference_batches.clear()
    states = tmp_path / "o" / "train_state"
    run_training(parse_config(args + ["--resume_from_checkpoint", str(states / "step_1")]))
    assert reference_batches == []
    again = _rows(tmp_path / "l" / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2]
    assert again[1]["loss"] == pytest.approx(first[1]["loss"], rel=1e-6)
    a = torch.load(states / "step_1" / "reference_logps.pt")
    b = torch.load(states / "step_2" / "reference_logps.pt")
    assert torch.equal(a["sum_logps"], b["sum_logps"]) and int(a["scored"].sum()) == 8


def test_reference_plan_covers_later_epochs_and_skips_cached_examples():
    from clha.training.reference import reference_plan
    from clha.training.state import Position

    # 6 examples, 2 per micro-batch, 1 process, no accumulation: 3 steps per epoch
    plan = reference_plan(6, Position(), 5, seed=0, per_device=2, world=1, grad_accum=1, scored=[False] * 6)
    assert plan == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]        # epoch 1 sees no new example
    resumed = reference_plan(6, Position(global_step=1, step_in_epoch=1), 3, seed=0, per_device=2, world=1,
                             grad_accum=1, scored=[False] * 6)
    assert resumed == [(0, 1, 0), (0, 2, 0)]                 # from the saved position on
    assert reference_plan(6, Position(), 5, 0, 2, 1, 1, scored=[True] * 6) == []


# ---------------------------------------------------------------- resume with another shape
def test_resume_with_other_accumulation_or_batch_is_refused(tmp_path, tiny_lm_dir):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=8)
    base = _args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 1)
    run_training(parse_config(base))
    state = tmp_path / "o" / "train_state" / "step_1"
    assert json.loads((state / "position.json").read_text())["run_shape"] == {
        "world_size": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "2"]
    with pytest.raises(InputError, match=r"position\.json.*gradient_accumulation_steps=2, this run has "
                                         r"gradient_accumulation_steps=1"):
        run_training(parse_config(base + resume + ["--gradient_accumulation_steps", "1"]))
    with pytest.raises(InputError, match="per_device_train_batch_size=2, this run has per_device_train_batch_size=1"):
        run_training(parse_config(base + resume + ["--per_device_train_batch_size", "1"]))


def test_validation_generates_with_sdpa_when_the_policy_trains_with_flex(tmp_path, tiny_lm_dir, monkeypatch,
                                                                        fresh_accelerate):
    """A flex-attention policy is switched to sdpa for KV-cache generation during validation, and back after."""
    import clha.generation
    from clha.modeling import _attention_implementation, set_attn_implementation
    from clha.testing.tiny_reward import save_tiny_seqcls_reward_model
    from clha.training.trainer import Trainer

    dev = tmp_path / "dev" / "dev.json"
    write_ranked(dev, make_ranked_rows(3, seed=9))
    rm = save_tiny_seqcls_reward_model(tmp_path / "rm", seed=1)
    cfg = parse_config(["--model_name_or_path", tiny_lm_dir, "--output_dir", str(tmp_path / "o"), "--log_path",
                        str(tmp_path / "l"), "--do_validation", "--validation_file_path", str(dev.parent),
                        "--validation_file_name", "dev.json", "--reward_model", str(rm), "--max_new_tokens", "4",
                        "--block_size", "160"])
    trainer = Trainer(cfg)
    trainer.setup()
    inner = trainer.accelerator.unwrap_model(trainer.model)
    set_attn_implementation(inner, "flex_attention")         # as on CUDA with attn_implementation auto
    seen = []

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.append(_attention_implementation(model))
        return ["ok"] * len(prompts)

    monkeypatch.setattr(clha.generation, "generate_responses", fake_generate)
    trainer.validate()
    assert seen == ["sdpa"]
    assert _attention_implementation(inner) == "flex_attention"


# ---------------------------------------------------------------- metrics over processes
def test_step_metrics_are_averaged_over_processes_and_micro_batches(tmp_path, tiny_lm_dir, monkeypatch,
                                                                     fresh_accelerate):
    """One optimizer step as process 0 of 2: the other process's per-micro-batch values are stood in by the
    all-reduce (rank 1 reports twice rank 0's sums). Logged means divide by 2 processes x 2 micro-batches; the pair
    counts give the accuracy over all valid pairs of the step."""
    import clha.losses
    from clha.training.trainer import Trainer

    data = _write_data(tmp_path, num=16)
    trainer = Trainer(parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 1)))  # 2 micro-batches
    trainer.setup()
    real = trainer.accelerator
    reduced = []

    class ProcessZeroOfTwo:
        """The real single-process accelerator, seen as process 0 of 2."""
        num_processes, process_index, is_main_process = 2, 0, True

        def __getattr__(self, name):
            return getattr(real, name)

        def reduce(self, tensor, reduction="mean"):
            assert reduction == "sum"
            reduced.append(tensor.clone())
            return tensor + 2 * tensor                  # rank 0's values + rank 1's (twice rank 0's)

    outs = []
    compute = clha.losses.compute_loss

    def recording(*args, **kwargs):
        out = compute(*args, **kwargs)
        outs.append({k: float(getattr(out, k).detach()) for k in (
            "loss", "rank_loss", "sft_loss", "chosen_logps", "rejected_logps", "margin", "masked_pair_fraction",
            "num_valid_pairs", "num_correct_pairs")})
        return out

    monkeypatch.setattr(clha.losses, "compute_loss", recording)
    trainer.accelerator, trainer.world = ProcessZeroOfTwo(), 2
    metrics = trainer._optimizer_step(epoch_order(16, 0, 3, 2, 2, 2))
    assert len(outs) == 2 and reduced                    # 2 micro-batches, the metrics went through the all-reduce

    def step_mean(key):                                  # (rank 0's sum + rank 1's) / (2 processes x 2 micro-batches)
        return (1 + 2) * sum(o[key] for o in outs) / (2 * 2)

    for logged, key in [("loss", "loss"), ("rank_loss", "rank_loss"), ("sft_loss", "sft_loss"),
                        ("chosen_mean_logp", "chosen_logps"), ("rejected_mean_logp", "rejected_logps"),
                        ("logp_margin", "margin"), ("masked_pair_fraction", "masked_pair_fraction")]:
        assert metrics[logged] == pytest.approx(step_mean(key), rel=1e-6), logged
    valid = sum(o["num_valid_pairs"] for o in outs)
    assert valid > 0
    assert metrics["rank_accuracy"] == pytest.approx(sum(o["num_correct_pairs"] for o in outs) / valid)

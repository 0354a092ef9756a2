"""LoRA adapters (--lora_r) in the trainer, on the tiny model: only adapters train, the saved (merged) checkpoint
reloads with the trained model's log-probs, DPO's reference is the base model, and resume is exact."""

import json
import math
from pathlib import Path

import pytest
import torch

from clha.config import parse_config
from clha.data.format import read_ranked
from tests.test_trainer import _args, _rows, _weights, _write_data, fresh_accelerate  # noqa: F401

pytest.importorskip("peft")

LORA = ["--lora_r", "4", "--lora_alpha", "8", "--gradient_accumulation_steps", "1"]


def _scores(model, collator, examples):
    from clha.modeling import score_candidates

    model.eval()
    with torch.no_grad():
        return score_candidates(model, collator(examples)).sum_logps


def test_lora_trains_only_adapters_and_saves_a_merged_checkpoint(tmp_path, tiny_lm_dir, fresh_accelerate):
    from peft import PeftModel

    from clha.loading import load_policy
    from clha.training.trainer import Trainer

    data = _write_data(tmp_path, num=8)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 3,
                             LORA + ["--checkpointing_step", "3", "--lora_dropout", "0.1"]))
    trainer = Trainer(cfg)
    trainer.setup()
    inner = trainer.accelerator.unwrap_model(trainer.model)
    lora_params = {n: p for n, p in inner.named_parameters() if ".lora_" in n}
    assert lora_params and all(p.requires_grad for p in lora_params.values())
    assert all(not p.requires_grad for n, p in inner.named_parameters() if ".lora_" not in n)
    # default targets: every linear projection of attention and MLP (not the output head)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora_params}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the optimizer holds the adapters and nothing else
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in lora_params.values()}
    before = {n: p.detach().clone() for n, p in inner.named_parameters()}
    trainer.train()

    base = _weights(tmp_path / "o" / "step_3").keys()   # merged checkpoint: the plain model's tensor names
    original = _weights(Path(tiny_lm_dir))
    assert set(base) == set(original)
    for n, p in inner.named_parameters():
        if ".lora_" in n:
            if ".lora_B." in n:                          # B starts at 0; training moves it
                assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), f"frozen weight {n} changed"
    for n, p in lora_params.items():
        if ".lora_A." in n:
            assert not torch.equal(p, before[n]), n

    # the merged checkpoint loads as any checkpoint and scores like the trained model (adapters on)
    examples = read_ranked(data)[:4]
    trained = _scores(inner, trainer.collator, examples)
    merged, _ = load_policy(str(tmp_path / "o" / "step_3"), dtype_name="float32")
    torch.testing.assert_close(_scores(merged, trainer.collator, examples), trained, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(_scores(load_policy(tiny_lm_dir, dtype_name="float32")[0], trainer.collator,
                                      examples), trained, atol=1e-3)
    # the adapter folder loads on the base model with peft
    adapter = tmp_path / "o" / "step_3" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    with_adapter = PeftModel.from_pretrained(load_policy(tiny_lm_dir, dtype_name="float32")[0], str(adapter))
    torch.testing.assert_close(_scores(with_adapter.get_base_model(), trainer.collator, examples), trained,
                               rtol=1e-5, atol=1e-5)


def test_dpo_with_lora_scores_the_reference_with_adapters_off(tmp_path, tiny_lm_dir, fresh_accelerate):
    from clha.loading import load_policy
    from clha.training.trainer import Trainer

    data = _write_data(tmp_path, num=8)
    cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 2,
                             LORA + ["--loss_type", "dpo", "--checkpointing_step", "1"]))
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    rows = _rows(tmp_path / "l" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy == reference at step 1
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)

    # Nonzero adapters, as after training: the reference pass still gives the base model's log-probs.
    examples = read_ranked(data)
    base = _scores(load_policy(tiny_lm_dir, dtype_name="float32")[0], trainer.collator, examples)
    batch = trainer.collator(examples)
    reference = trainer._reference_forward(batch)
    torch.testing.assert_close(reference, base, rtol=1e-6, atol=1e-5)
    adapted = _scores(trainer.accelerator.unwrap_model(trainer.model), trainer.collator, examples)
    assert not torch.allclose(adapted, base, atol=1e-3)
    scored = trainer.ref_scored.nonzero().flatten()
    torch.testing.assert_close(trainer.ref_sum_logps[scored], base[scored], rtol=1e-6, atol=1e-5)


def test_lora_resume_matches_uninterrupted_run(tmp_path, tiny_lm_dir, fresh_accelerate):
    from clha.training.trainer import run_training

    data = _write_data(tmp_path, num=12)
    args = _args(tiny_lm_dir, data, tmp_path / "o", tmp_path / "l", 4, LORA + ["--lora_dropout", "0.2"])
    run_training(parse_config(args))
    full_metrics = _rows(tmp_path / "l" / "metrics.jsonl")
    full_weights = _weights(tmp_path / "o" / "step_4")
    # resume from the state saved at step 2 (adapters, their AdamW state, RNG for the dropout, data position)
    state = tmp_path / "o" / "train_state" / "step_2"
    run_training(parse_config(args + ["--resume_from_checkpoint", str(state)]))
    resumed = _rows(tmp_path / "l" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full_metrics[2:], resumed[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    again = _weights(tmp_path / "o" / "step_4")
    for name, value in full_weights.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)

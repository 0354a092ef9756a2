"""The built-in default job (make demo) end to end, in its quick form."""

import json

import pytest


@pytest.mark.slow
def test_demo_raises_dev_reward(tmp_path):
    from clha.testing.demo import run

    result = run(str(tmp_path / "demo"), seed=42, quick=True)
    assert result["after"] > result["before"] + 0.3, result
    assert (tmp_path / "demo" / "logs" / "clha" / "curves.png").stat().st_size > 10_000
    best = tmp_path / "demo" / "checkpoints" / "clha" / "best_checkpoint"
    assert (best / "model.safetensors").exists() and (best / "clha_config.json").exists()
    # the demo trains as real runs do, every response ending with EOS, and still reaches a high dev reward
    assert json.loads((best / "clha_config.json").read_text())["append_eos"] is True
    assert result["after"] > 0.9, result
    val = [json.loads(x) for x in (tmp_path / "demo" / "logs" / "clha" / "validation.jsonl").read_text().splitlines()]
    assert val[0]["step"] == 0 and val[-1]["step"] == 30
    # the ranked demo data was re-scored by the reward model: best first, rewards stored
    rows = [json.loads(x) for x in (tmp_path / "demo" / "data" / "clha_train.json").read_text().splitlines()]
    assert all(r["reward"][0] >= r["reward"][1] for r in rows)

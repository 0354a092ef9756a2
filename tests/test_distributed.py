"""A few optimizer steps with 2 CPU processes under DeepSpeed ZeRO-2 and under plain DDP (accelerate launch)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from clha.data.format import write_ranked
from tests.conftest import REPO, make_ranked_rows

LAUNCHES = {
    "deepspeed_zero2": ("train/ds_config_cpu.yaml", {}),
    "ddp": ("train/ddp_cpu.yaml", {"ACCELERATE_USE_CPU": "true"}),
}


def _accelerate() -> str:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate launcher not installed")
    return exe


@pytest.mark.slow
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_two_process_training(tmp_path, tiny_lm_dir, launch):
    config, extra_env = LAUNCHES[launch]
    if launch == "deepspeed_zero2":
        pytest.importorskip("deepspeed")
    data = tmp_path / "train.json"
    write_ranked(data, make_ranked_rows(16, seed=4))
    out, logs = tmp_path / "out", tmp_path / "logs"
    cmd = [_accelerate(), "launch", "--config_file", str(REPO / config), "--num_processes", "2",
           str(REPO / "train" / "main.py"), "--model_name_or_path", tiny_lm_dir, "--train_file_path", str(data),
           "--output_dir", str(out), "--log_path", str(logs), "--do_train", "--max_train_steps", "3",
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--block_size", "160",
           "--learning_rate", "1e-3", "--checkpointing_step", "2", "--no-save_epoch_checkpoints",
           "--reward_gap_threshold", "1.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra_env)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # 2 processes x 2 examples x 2 micro-batches = 8 distinct examples per optimizer step
    order = [json.loads(x) for x in (logs / "data_order.jsonl").read_text().splitlines()]
    assert all(len(set(o["examples"])) == 8 for o in order[:2])
    assert set(order[0]["examples"]).isdisjoint(order[1]["examples"])
    assert (out / "step_3" / "model.safetensors").exists()
    assert (out / "train_state" / "latest").read_text().strip() == "step_3"

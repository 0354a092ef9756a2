"""Checkpoints and the resumable train state of a training run (methods of `clha.training.trainer.Trainer`).

Under ``output_dir``:
    step_<N>/, epoch_<E>/       Hugging Face checkpoints (model, tokenizer, clha_config.json)
    best_checkpoint -> step_<N> the checkpoint with the best dev reward (a symlink, see `point_symlink`)
    train_state/step_<N>/       resumable state (model, optimizer, scheduler, RNG, position.json, DPO reference);
                                `latest` names the newest, the last `KEEP_TRAIN_STATES` are kept
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from clha.errors import InputError, SaveError
from clha.fileio import atomic_write, write_json
from clha.loading import save_hf_folder
from clha.training.reference import REFERENCE_FILE

logger = logging.getLogger("clha.training")

CONFIG_FILE = "clha_config.json"              # the TrainConfig as JSON, in output_dir and in every checkpoint
TRAIN_STATE_DIR = "train_state"
KEEP_TRAIN_STATES = 2
# What a train state was written under; resuming with other values would remap the data and break ZeRO shards.
RUN_SHAPE_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")


@dataclass
class Position:
    """Where training stands: everything needed (with the saved weights/optimizer) to resume exactly."""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_reward: Optional[float] = None
    best_step: Optional[int] = None


def check_output_dir_shared(accelerator, output_dir, attempts: int = 20, wait_s: float = 0.25) -> None:
    """Stop unless every process sees `output_dir` as process 0 does. Process 0 alone writes the resumable state,
    `latest`, the scheduler state and the checkpoints, so on several nodes output_dir must be on a filesystem they
    share; otherwise a resumed run would start fresh on one node and resume on another. Process 0 writes a marker
    file with a fresh token, every process looks for it (retrying for `attempts * wait_s` seconds, for network
    filesystems that publish new files late), and all processes stop together with the same message if one of
    them cannot see it. Creates output_dir. Nothing to check with one process."""
    acc = accelerator
    if acc.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
    if acc.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    token = [uuid.uuid4().hex if acc.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    marker = Path(output_dir) / f".shared_fs_check_{token[0]}"
    if acc.is_main_process:
        marker.write_text(token[0], encoding="utf-8")
    acc.wait_for_everyone()
    seen = False
    for _ in range(attempts):
        try:
            seen = marker.read_text(encoding="utf-8") == token[0]
        except OSError:
            seen = False
        if seen:
            break
        time.sleep(wait_s)
    blind = acc.gather(torch.tensor([0 if seen else 1], device=acc.device)).tolist()
    acc.wait_for_everyone()
    if acc.is_main_process:
        marker.unlink(missing_ok=True)
    missing = [rank for rank, flag in enumerate(blind) if flag]
    if missing:
        raise InputError(
            f"output_dir is not on a filesystem shared by all nodes: process(es) {missing} cannot see the file "
            f"process 0 wrote there. Process 0 alone writes checkpoints and the resumable train state, so every "
            f"node must see the same output_dir (a shared NFS/Lustre/... path)", path=output_dir, field="output_dir")


def state_dict_for_save(accelerator, model) -> Optional[Dict]:
    """The state dict `save_pretrained` needs beside the unwrapped model, or None when the model's own will do.

    Only ZeRO-3 (and tensor parallelism) partition the parameters themselves, and gathering them is a collective
    every process must join. Under ZeRO-2 and DDP each process holds the full parameters, so the process that
    saves reads its own module (accelerate's get_state_dict would copy the whole model to host memory on every
    process, 8 x 13.5 GB for a 7B model on 8 GPUs)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    ds = accelerator.deepspeed_config
    sharded = (ds.get("zero_optimization", {}).get("stage", 0) == 3
               or ds.get("tensor_parallel", {}).get("autotp_size", 0) > 1)
    return accelerator.get_state_dict(model) if sharded else None


def point_symlink(link: Path, target_name: str) -> None:
    """Atomically make `link` a relative symlink to `target_name` (a sibling folder)."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


class CheckpointMixin:
    """Writing checkpoints and train states, and finding and reading the state to resume from. Uses the trainer's
    cfg, accelerator, model, tokenizer, pos, world, peft_model and DPO reference table."""

    def save_hf_checkpoint(self, name: str) -> Path:
        """A Hugging Face checkpoint (model, tokenizer, config JSON), written under a temp name then renamed."""
        acc = self.accelerator
        final = Path(self.cfg.output_dir) / name
        # None unless the parameters are partitioned (ZeRO-3): then every process joins the gather
        state = state_dict_for_save(acc, self.model)
        if acc.is_main_process:
            inner = acc.unwrap_model(self.model)
            save_model = None
            if self.peft_model is not None:          # merged model + adapter/ (clha.lora)
                from clha.lora import save_lora_checkpoint

                def save_model(folder):
                    save_lora_checkpoint(self.peft_model, inner, folder, state)
            try:
                save_hf_folder(final, inner, self.tokenizer, {CONFIG_FILE: {**self.cfg.to_dict(),
                                                                            "global_step": self.pos.global_step}},
                               state_dict=state, save_model=save_model)
            except OSError as err:
                raise SaveError(f"cannot save the checkpoint {final}: {err}; the last complete train state is "
                                f"intact: fix the cause and rerun with --resume_from_checkpoint latest") from err
        acc.wait_for_everyone()
        return final

    def save_train_state(self) -> Path:
        acc = self.accelerator
        root = Path(self.cfg.output_dir) / TRAIN_STATE_DIR
        name = f"step_{self.pos.global_step}"
        target = root / name
        acc.save_state(str(target))
        if acc.is_main_process:
            if self.ref_sum_logps is not None:       # before position.json, which marks a state complete
                torch.save({"sum_logps": self.ref_sum_logps, "scored": self.ref_scored}, target / REFERENCE_FILE)
            write_json(target / "position.json", {**vars(self.pos), "run_shape": self._run_shape()})
            with atomic_write(root / "latest") as f:
                f.write(name + "\n")
            states = sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_")),
                            key=lambda d: int(d.name.split("_")[1]))
            for old in states[:-KEEP_TRAIN_STATES]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def _latest_state_name(self) -> Optional[str]:
        latest = Path(self.cfg.output_dir) / TRAIN_STATE_DIR / "latest"
        return latest.read_text().strip() if latest.exists() else None

    def _resume_path(self, spec: str) -> Optional[Path]:
        """The train-state folder named by --resume_from_checkpoint (None: `latest` with nothing saved yet)."""
        if spec == "latest":
            name = self._latest_state_name()
            if name is None:
                logger.warning("--resume_from_checkpoint latest: no saved state in %s, starting fresh",
                               self.cfg.output_dir)
                return None
            path = Path(self.cfg.output_dir) / TRAIN_STATE_DIR / name
        else:
            path = Path(spec)
        if not (path / "position.json").exists():
            raise InputError("not a complete train state (position.json missing)", path=path,
                             field="resume_from_checkpoint")
        return path

    def _run_shape(self) -> Dict[str, int]:
        cfg = self.cfg
        return {"world_size": self.world, "per_device_train_batch_size": cfg.per_device_train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps}

    def _read_position(self, path: Path) -> Position:
        """The saved position; refuses a state written with another world size, per-device batch or gradient
        accumulation (they fix which examples each step and process trains on, and ZeRO's optimizer shards)."""
        with open(path / "position.json", encoding="utf-8") as f:
            saved = json.load(f)
        shape = saved.pop("run_shape", None)
        if shape is None:
            logger.warning("%s records no world size / batch size / accumulation; assuming this run's", path)
        else:
            now = self._run_shape()
            changed = [k for k in RUN_SHAPE_KEYS if shape.get(k) != now[k]]
            if changed:
                old = ", ".join(f"{k}={shape.get(k)}" for k in changed)
                new = ", ".join(f"{k}={now[k]}" for k in changed)
                raise InputError(
                    f"cannot resume: the train state was written with {old}, this run has {new}. They decide which "
                    f"examples each step and process train on (and ZeRO's optimizer shards); resume with the same "
                    f"values (--num_processes, --per_device_train_batch_size, --gradient_accumulation_steps) or "
                    f"start a new run in another --output_dir", path=path / "position.json",
                    field="resume_from_checkpoint")
        return Position(**saved)

"""The logs of a training run (methods of `clha.training.trainer.Trainer`), under log_path: metrics.jsonl (one row
per logged optimizer step), data_order.jsonl (the examples of every step), TensorBoard scalars; on resume, rows of
steps that will be redone are dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

from clha.data.order import micro_batch
from clha.fileio import atomic_write


class RecordsMixin:
    """Uses the trainer's cfg, accelerator, pos, world and scalars (a `clha.loading.ScalarWriter`)."""

    def _log_metrics(self, metrics: Dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(Path(self.cfg.log_path) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self.scalars.add(f"train/{key}", value, metrics["step"], flush=False)
        self.scalars.flush()                         # once per logged step, not per scalar

    def _record_order(self, order) -> None:
        """The examples of this optimizer step, over all processes (the data order is a function of the seed and
        the epoch, so process 0 writes it without asking the others)."""
        if not self.accelerator.is_main_process:
            return
        cfg = self.cfg
        examples = sorted(i for micro in range(cfg.gradient_accumulation_steps) for rank in range(self.world)
                          for i in micro_batch(order, self.pos.step_in_epoch, micro, rank,
                                               cfg.per_device_train_batch_size, self.world,
                                               cfg.gradient_accumulation_steps))
        with open(Path(self.cfg.log_path) / "data_order.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.pos.global_step + 1, "epoch": self.pos.epoch,
                                "examples": examples}) + "\n")

    def _truncate_logs_after(self, step: int) -> None:
        """On resume, drop log rows of steps that will be redone, so each step appears once."""
        for name, key in (("metrics.jsonl", "step"), ("data_order.jsonl", "step"), ("validation.jsonl", "step")):
            path = Path(self.cfg.log_path) / name
            if not path.exists():
                continue
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            keep = [r for r in rows if r[key] <= step] if step else []
            with atomic_write(path) as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)

    def summary(self) -> Dict:
        return {"global_step": self.pos.global_step, "best_reward": self.pos.best_reward,
                "best_step": self.pos.best_step, "validation": self.history,
                "output_dir": self.cfg.output_dir, "log_path": self.cfg.log_path}

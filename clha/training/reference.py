"""DPO's frozen reference: log-probs of the training candidates under the initial weights (methods of
`clha.training.trainer.Trainer`).

Each example is scored in the micro-batch in which training first sees it (`reference_plan`), so policy and
reference agree exactly at the first step; the table is saved in every train state (`REFERENCE_FILE`) and reused on
resume. Which losses need it: `clha.losses.NEEDS_REFERENCE_MODEL`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch

from clha.data.order import epoch_order, micro_batch, steps_per_epoch
from clha.errors import InputError

logger = logging.getLogger("clha.training")

REFERENCE_FILE = "reference_logps.pt"      # DPO reference log-probs, saved in every train state


def run_slots(start: "Position", total_steps: int, steps_per_epoch_: int):
    """(epoch, step in epoch) of every optimizer step from `start` up to `total_steps`, in training order."""
    epoch, step, done = start.epoch, start.step_in_epoch, start.global_step
    while done < total_steps:
        if step >= steps_per_epoch_:
            epoch, step = epoch + 1, 0
            continue
        yield epoch, step
        step += 1
        done += 1


def reference_plan(num_examples: int, start: "Position", total_steps: int, seed: int, per_device: int, world: int,
                   grad_accum: int, scored) -> List[tuple]:
    """DPO reference scoring plan: the micro-batch slots (epoch, step in epoch, micro-batch) of the rest of the run
    in which an example that has no reference log-probs yet is first trained on (by any process), in training
    order. Every process computes the same plan, so they run the same number of forward passes. `scored`: a
    bool per example (not modified)."""
    seen = [bool(x) for x in scored]
    spe = steps_per_epoch(num_examples, per_device, world, grad_accum)
    plan, orders = [], {}
    for epoch, step in run_slots(start, total_steps, spe):
        if epoch not in orders:
            orders = {epoch: epoch_order(num_examples, epoch, seed, per_device, world, grad_accum)}
        for micro in range(grad_accum):
            slot = [i for rank in range(world)
                    for i in micro_batch(orders[epoch], step, micro, rank, per_device, world, grad_accum)]
            if not all(seen[i] for i in slot):
                plan.append((epoch, step, micro))
                for i in slot:
                    seen[i] = True
    return plan


class ReferenceMixin:
    """Scoring, loading and looking up the reference table (`ref_sum_logps` [examples, n], `ref_scored`)."""

    def _score_reference(self, state: Optional[Path]) -> None:
        """DPO: summed log-probs of the candidates under the frozen initial model, for exactly the examples the
        rest of the run trains on. Each example is scored in the micro-batch in which training first sees it
        (same examples, same collation, same process, same prepared model and precision), so at the first step
        policy and reference agree exactly, in bf16 too. The table is saved in every train state; a resumed run
        reuses it and scores only examples the saved run would not have reached (a larger --max_train_steps).
        (In a later epoch an example is trained on in another micro-batch than it was scored in; in bf16 that
        makes a difference of the order of bf16 rounding.)"""
        cfg, acc = self.cfg, self.accelerator
        n_ex, n = len(self.train_examples), cfg.training_stage_num
        self.ref_sum_logps = torch.zeros(n_ex, n, dtype=torch.float32)
        self.ref_scored = torch.zeros(n_ex, dtype=torch.bool)
        if state is not None and (state / REFERENCE_FILE).exists():
            self._load_reference(state / REFERENCE_FILE)
        plan = reference_plan(n_ex, self.pos, self.total_steps, cfg.seed, cfg.per_device_train_batch_size,
                              self.world, cfg.gradient_accumulation_steps, self.ref_scored.tolist())
        if not plan:
            return
        logger.info("DPO reference log-probs: %d micro-batch(es) per process to score (%d of %d examples cached)",
                    len(plan), int(self.ref_scored.sum()), n_ex)
        values = torch.zeros(n_ex, n, dtype=torch.float32, device=acc.device)
        mine = torch.zeros(n_ex, dtype=torch.bool, device=acc.device)
        orders = {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for epoch, step, micro in self._progress(plan, "reference log-probs"):
                if epoch not in orders:
                    orders = {epoch: epoch_order(n_ex, epoch, cfg.seed, cfg.per_device_train_batch_size, self.world,
                                                 cfg.gradient_accumulation_steps)}
                idx = micro_batch(orders[epoch], step, micro, acc.process_index, cfg.per_device_train_batch_size,
                                  self.world, cfg.gradient_accumulation_steps)
                batch = self._to_device(self.collator([self.train_examples[i] for i in idx]))
                rows = torch.tensor(idx, device=acc.device)
                values[rows] = self._reference_forward(batch)
                mine[rows] = True
        self.model.train(was_training)
        if self.world > 1:
            # every process takes, for each example, the value of the lowest-ranked process that scored it
            all_values = acc.gather(values[None])                      # [world, n_ex, n]
            all_mine = acc.gather(mine[None].to(torch.uint8))          # [world, n_ex]
            first = all_mine.argmax(dim=0)
            values = all_values[first, torch.arange(n_ex, device=acc.device)]
            mine = all_mine.amax(dim=0).bool()
        new = mine.cpu() & ~self.ref_scored
        self.ref_sum_logps[new] = values.cpu()[new]
        self.ref_scored |= new

    def _reference_forward(self, batch: Dict) -> torch.Tensor:
        """Summed log-probs [B, n] of one reference micro-batch under the model as prepared for training (with
        LoRA: the same model with its adapters switched off, i.e. the frozen base)."""
        from clha.lora import adapters_disabled
        from clha.modeling import score_candidates

        with adapters_disabled(self.peft_model):
            return score_candidates(self.model, batch, logprob_head=self.cfg.logprob_head).sum_logps.float()

    def _load_reference(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        n_ex, n = len(self.train_examples), self.cfg.training_stage_num
        if tuple(saved["sum_logps"].shape) != (n_ex, n):
            raise InputError(f"the saved DPO reference log-probs are for {saved['sum_logps'].shape[0]} examples x "
                             f"{saved['sum_logps'].shape[1]} candidates, this run has {n_ex} x {n}: resume with "
                             f"the same training data and --training_stage_num", path=path,
                             field="resume_from_checkpoint")
        self.ref_sum_logps = saved["sum_logps"].float()
        self.ref_scored = saved["scored"].bool()

    def _reference_rows(self, idx: List[int]) -> torch.Tensor:
        """DPO reference log-probs [len(idx), n] of a micro-batch (scored at setup, see `_score_reference`)."""
        missing = [i for i in idx if not self.ref_scored[i]]
        if missing:
            raise RuntimeError(f"no DPO reference log-probs for examples {missing}")
        return self.ref_sum_logps[idx]

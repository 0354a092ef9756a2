"""Training a reward model (`RewardModelTrainer`): accelerate (one CPU process, DDP or DeepSpeed, bf16 autocast if
the launcher asks), length-grouped batches (`clha.rm.batches`), AdamW with a warm-up/decay schedule, the pairwise
and distillation losses (`clha.rm.losses`), held-out evaluation (`clha.rm.metrics`), TensorBoard, tqdm.

Input formatting is NOT defined here: pairs are tokenised by `clha.rm.scoring.HFRewardScorer.encode` (rendered HH
dialogue + " " + response, special tokens, cut from the left to `max_length`), the exact function that scores the
saved model after `clha.rm.scoring.load_reward_model`. The checkpoint's tokenizer records `model_max_length =
max_length`, so a later `load_reward_model(path)` cuts inputs exactly as training did.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from clha.errors import InputError
from clha.loading import ScalarWriter, adamw_param_groups, make_accelerator
from clha.rm.batches import collate_examples, encode_examples, epoch_batches
from clha.rm.config import RESULTS_FILE, SCORES_FILE, RewardTrainConfig
from clha.rm.data import load_eval_examples, load_training_examples
from clha.rm.losses import reward_training_loss
from clha.rm.metrics import evaluate_scores, ranking_agreement
from clha.rm.model import disable_dropout, freeze_all_but_last_layers, load_backbone, make_scorer, save_reward_model

logger = logging.getLogger("clha.rm")

class RewardModelTrainer:
    """setup() -> train() -> evaluate() -> save(); `run()` does all of them as the config asks."""

    def __init__(self, cfg: RewardTrainConfig, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.scalars = ScalarWriter(cfg.resolved_log_dir())     # TensorBoard, under the log folder
        self.train_seconds = 0.0
        self.data_info: Dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed)
        self.eval_examples, self.data_info["eval"] = load_eval_examples(cfg) if cfg.do_eval else ([], {})
        if not cfg.do_train:
            from clha.rm.scoring import load_reward_model

            self.scorer = load_reward_model(cfg.model_name_or_path, device=acc.device, max_length=cfg.max_length)
            self.model = self.scorer.model
            return
        self.train_examples, self.data_info["train"] = load_training_examples(cfg)
        model, tokenizer = load_backbone(cfg.model_name_or_path, cfg.gguf_file)
        self.param_counts = freeze_all_but_last_layers(model, cfg.train_last_layers)
        if cfg.disable_dropout:
            disable_dropout(model)
        self.scorer = make_scorer(model, tokenizer, cfg.output_dir, cfg.max_length)
        self.max_length = self.scorer.max_length
        self.encoded = encode_examples(self.scorer, self.train_examples)
        self.world = acc.num_processes
        per_step = self.world * cfg.gradient_accumulation_steps
        batches = math.ceil(len(self.encoded) / cfg.per_device_train_batch_size)
        self.steps_per_epoch = math.ceil(batches / per_step)
        total = math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        self.total_steps = min(total, cfg.max_train_steps) if cfg.max_train_steps else total
        optimizer = torch.optim.AdamW(adamw_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                                       num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=max(self.total_steps, 1))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.tokenizer = tokenizer
        if acc.is_main_process:
            os.makedirs(cfg.resolved_log_dir(), exist_ok=True)
            (Path(cfg.resolved_log_dir()) / "metrics.jsonl").unlink(missing_ok=True)
            logger.info("%d training examples %s, %d held-out, %d steps/epoch, %d optimizer steps, %d process(es), "
                        "max_length %d, mixed precision %s, trainable parameters %s", len(self.encoded),
                        self.data_info["train"].get("per_subset"), len(self.eval_examples), self.steps_per_epoch,
                        self.total_steps, self.world, self.max_length, acc.mixed_precision, self.param_counts)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        per_step = self.world * cfg.gradient_accumulation_steps
        lengths = [ex.length for ex in self.encoded]
        subsets = [ex.subset for ex in self.encoded]
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, desc="train reward model", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        window: Dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        epoch = 0
        self.model.train()
        while self.global_step < self.total_steps:
            batches = epoch_batches(lengths, subsets, cfg.per_device_train_batch_size, epoch, cfg.seed,
                                    cfg.balance_subsets, cfg.length_grouping)
            needed = self.steps_per_epoch * per_step
            batches = (batches * math.ceil(needed / len(batches)))[:needed]   # wrap around to whole steps
            for step_in_epoch in range(self.steps_per_epoch):
                if self.global_step >= self.total_steps:
                    break
                group = batches[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
                mine = group[acc.process_index::self.world]
                self._optimizer_step(mine, window)
                self.global_step += 1
                bar.update(1)
                if window["pairs"]:
                    bar.set_postfix(loss=f"{window['loss'] / window['micro']:.4f}",
                                    acc=f"{window['correct'] / window['pairs']:.3f}")
                if self.global_step % cfg.logging_steps == 0 or self.global_step == self.total_steps:
                    self._log_train(window, epoch, time.perf_counter() - start)
                    window = defaultdict(float)
                if cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.global_step < self.total_steps:
                    self.train_seconds += time.perf_counter() - start
                    self.evaluate()
                    start = time.perf_counter()
            if cfg.save_epoch_checkpoints and self.global_step % self.steps_per_epoch == 0:
                self.save(Path(cfg.output_dir) / f"epoch_{epoch}")
            epoch += 1
        bar.close()
        self.train_seconds += time.perf_counter() - start

    def _optimizer_step(self, micro_batches: List[List[int]], window: Dict[str, float]) -> None:
        cfg, acc = self.cfg, self.accelerator
        for idx in micro_batches:
            batch = collate_examples([self.encoded[i] for i in idx], self.scorer.tokenizer.pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(self.model):
                scores = self._scores(batch)
                out = reward_training_loss(scores, batch["pair_mask"], batch["targets"], batch["target_mask"],
                                           cfg.pairwise_weight, cfg.distill_weight, cfg.distill_target)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"loss is {float(out.loss)} at optimizer step {self.global_step + 1}")
                acc.backward(out.loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    if norm is not None:        # DeepSpeed clips inside its step and returns nothing
                        window["grad_norm"] += float(norm)
                        window["clips"] += 1
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window["micro"] += 1
            window["loss"] += float(out.loss.detach())
            window["pairwise_loss"] += float(out.pairwise)
            window["distill_loss"] += float(out.distill)
            window["pairs"] += out.num_pairs
            window["correct"] += out.num_correct
            window["margin_sum"] += out.margin * out.num_pairs if out.num_pairs else 0.0
            window["sequences"] += int(batch["input_ids"].shape[0])
            window["tokens"] += int(batch["attention_mask"].sum())
        self.scheduler.step()

    def _scores(self, batch: Dict[str, Tensor]) -> Tensor:
        """[B, n_max] reward logits (float32); absent candidates hold 0 and are masked by the losses."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = self.model(**inputs).logits
        flat = (logits[:, 0] if logits.dim() == 2 else logits).float()
        index = batch["flat_index"]
        return torch.where(index >= 0, flat[index.clamp(min=0)], torch.zeros_like(index, dtype=flat.dtype))

    def _log_train(self, window: Dict[str, float], epoch: int, elapsed: float) -> None:
        if not window["micro"]:
            return
        sums = self._sum_over_processes(window)
        micro = sums["micro"]
        metrics = {"step": self.global_step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0],
                   "loss": sums["loss"] / micro, "pairwise_loss": sums["pairwise_loss"] / micro,
                   "distill_loss": sums["distill_loss"] / micro,
                   "accuracy": sums["correct"] / sums["pairs"] if sums["pairs"] else float("nan"),
                   "margin": sums["margin_sum"] / sums["pairs"] if sums["pairs"] else float("nan"),
                   "sequences": sums["sequences"], "tokens": sums["tokens"], "elapsed_s": elapsed}
        if sums["clips"]:
            metrics["grad_norm"] = sums["grad_norm"] / sums["clips"]
        if self.accelerator.is_main_process:
            with open(Path(self.cfg.resolved_log_dir()) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            for key, value in metrics.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb_scalar(f"train/{key}", value)

    def _sum_over_processes(self, window: Dict[str, float]) -> Dict[str, float]:
        if self.accelerator.num_processes == 1:
            return dict(window)
        keys = sorted(window)
        t = torch.tensor([window[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist()))

    # ------------------------------------------------------------------ evaluation
    def score_heldout(self) -> List[List[float]]:
        """Scores of every held-out candidate through the clha.rm.scoring scorer (fp32, no autocast), sharded over
        processes."""
        acc = self.accelerator
        mine = list(range(acc.process_index, len(self.eval_examples), acc.num_processes))
        flat_prompts = [self.eval_examples[i].prompt for i in mine for _ in self.eval_examples[i].responses]
        flat_responses = [r for i in mine for r in self.eval_examples[i].responses]
        flat = self.scorer.score(flat_prompts, flat_responses, batch_size=self.cfg.eval_batch_size,
                                 progress=acc.is_main_process) if mine else []
        local, pos = [], 0
        for i in mine:
            n = self.eval_examples[i].n
            local.append((i, flat[pos:pos + n]))
            pos += n
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            local = list(gather_object(local))
        out: List[Optional[List[float]]] = [None] * len(self.eval_examples)
        for i, s in local:
            out[i] = s
        return out  # type: ignore[return-value]

    def evaluate(self) -> Dict[str, Any]:
        start = time.perf_counter()
        scores = self.score_heldout()
        result = evaluate_scores(self.eval_examples, scores)
        result.update(step=self.global_step, eval_seconds=time.perf_counter() - start)
        self.history.append(result)
        self.last_scores = scores
        if self.accelerator.is_main_process:
            logger.info("held-out (step %d): accuracy %.4f on %d pairs; %s; Spearman with stored rewards %s",
                        self.global_step, result["accuracy"], result["pairs"],
                        ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["per_subset"].items()),
                        _fmt(result.get("spearman_with_stored")))
            self._tb_scalar("eval/accuracy", result["accuracy"])
            for subset, block in result["per_subset"].items():
                self._tb_scalar(f"eval/accuracy_{subset}", block["accuracy"])
            if math.isfinite(result.get("spearman_with_stored", float("nan"))):
                self._tb_scalar("eval/spearman_with_stored", result["spearman_with_stored"])
        return result

    # ------------------------------------------------------------------ outputs
    def saved_config(self) -> Dict[str, Any]:
        cfg = self.cfg.to_dict()
        cfg.update(global_step=self.global_step, effective_max_length=getattr(self, "max_length", None),
                   data=self.data_info.get("train"), input_format=getattr(self.scorer, "input_format", None))
        return cfg

    def save(self, out_dir: Optional[Path] = None) -> Optional[Path]:
        acc = self.accelerator
        state = acc.get_state_dict(self.model)
        path = None
        if acc.is_main_process:
            path = save_reward_model(acc.unwrap_model(self.model), self.tokenizer, out_dir or self.cfg.output_dir,
                                     self.saved_config(), self.max_length, state_dict=state)
            logger.info("saved the reward model to %s", path)
        acc.wait_for_everyone()
        return path

    def write_results(self) -> Dict[str, Any]:
        """eval_results.json and heldout_scores.jsonl in output_dir (main process)."""
        from clha.fileio import write_json, write_jsonl

        cfg = self.cfg
        results: Dict[str, Any] = {
            "model": cfg.output_dir if cfg.do_train else cfg.model_name_or_path,
            "backbone": cfg.model_name_or_path, "config": self.saved_config() if cfg.do_train else cfg.to_dict(),
            "data": self.data_info, "train_seconds": self.train_seconds, "global_step": self.global_step,
            "heldout": self.history[-1] if self.history else None, "history": self.history[:-1]}
        if cfg.compare_with and self.history:
            results["agreement_with"] = {"other": cfg.compare_with, **self.compare(cfg.compare_with)}
        if self.accelerator.is_main_process:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if self.history:
                write_jsonl(out / SCORES_FILE, (
                    {"key": ex.key, "subset": ex.subset, "line_num": ex.line_num, "scores": s,
                     "stored_rewards": ex.stored_rewards} for ex, s in zip(self.eval_examples, self.last_scores)))
            write_json(out / RESULTS_FILE, results)
        self.accelerator.wait_for_everyone()
        return results

    def compare(self, other_dir: str) -> Dict[str, Any]:
        """Ranking agreement with another run's held-out scores, on the examples both scored."""
        from clha.fileio import iter_jsonl

        path = Path(other_dir) / SCORES_FILE
        theirs = {row["key"]: row["scores"] for _, row in iter_jsonl(path)}
        both = [(ex, s, theirs[ex.key]) for ex, s in zip(self.eval_examples, self.last_scores) if ex.key in theirs]
        if not both:
            raise InputError("no held-out example in common with this run", path=path, field="compare_with")
        return ranking_agreement([s for _, s, _ in both], [t for _, _, t in both], [ex for ex, _, _ in both])

    def _tb_scalar(self, tag: str, value: float) -> None:
        self.scalars.add(tag, value, self.global_step)

    def run(self) -> Dict[str, Any]:
        self.setup()
        if self.cfg.do_train:
            self.train()
            self.save()
        if self.cfg.do_eval:
            self.evaluate()
        results = self.write_results()
        self.scalars.close()
        return results


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def run_reward_training(cfg: RewardTrainConfig, accelerator=None) -> Dict[str, Any]:
    """Train (and/or evaluate) a reward model as the config says; returns the results written to
    <output_dir>/eval_results.json."""
    return RewardModelTrainer(cfg, accelerator).run()

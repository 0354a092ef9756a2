"""The training loop: CLHA (or a baseline loss) with accelerate, on one CPU or many GPUs.

Reads top to bottom: `setup()` builds everything from the config, `train()` runs the optimizer steps; validation
(`clha.training.validation`), checkpoints and the resumable state (`clha.training.state`), DPO's reference
log-probs (`clha.training.reference`) and the logs (`clha.training.records`) are mixed into `Trainer` from their
modules. Models load through `clha.loading`. DeepSpeed and DDP
are accelerate's business (chosen by the launch config), the losses are pure functions in `clha.losses`,
the one-pass candidate scoring is `clha.modeling.score_candidates`.

Outputs under `output_dir`:
    step_<N>/, epoch_<E>/       Hugging Face checkpoints (model, tokenizer, clha_config.json)
    best_checkpoint -> step_<N> the checkpoint with the best dev reward (a symlink)
    train_state/step_<N>/       resumable state (model, optimizer, scheduler, RNG, position); `latest` names the newest
Under `log_path`: metrics.jsonl, validation.jsonl, TensorBoard events, data_order.jsonl.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from clha.config import TrainConfig
from clha.data.format import RankedExample, read_ranked
from clha.data.order import epoch_order, micro_batch, steps_per_epoch
from clha.errors import InputError
from clha.fileio import data_files, write_json
from clha.loading import ScalarWriter, adamw_param_groups, check_location, load_policy, make_accelerator, resolve_dtype
from clha.losses import NEEDS_REFERENCE_MODEL
from clha.training.records import RecordsMixin
from clha.training.reference import ReferenceMixin
from clha.training.state import CONFIG_FILE, CheckpointMixin, Position, check_output_dir_shared
from clha.training.validation import ValidationMixin

logger = logging.getLogger("clha.training")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops before saving anything from that step."""


def training_dtype(name: str, deepspeed_precision: Optional[str] = None) -> torch.dtype:
    """Weights dtype of the policy when it is trained: float32, so that AdamW updates float32 master weights
    (at lr 5e-6 an update is far below a bf16 weight's rounding step and would mostly be lost). bf16 compute
    comes from mixed precision on top (accelerate's autocast, or DeepSpeed's bf16 mode, which keeps its own
    float32 master weights). Half-precision weights are accepted only under DeepSpeed with that precision
    enabled (``deepspeed_precision``: the run's "bf16" / "fp16" / "no", None without DeepSpeed): they save host
    memory at load time and DeepSpeed casts the model to that dtype anyway."""
    if name in ("auto", "float32"):
        return torch.float32
    wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(name)
    if wanted is None:
        raise InputError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16", field="torch_dtype")
    if deepspeed_precision == wanted:
        return resolve_dtype(name)
    raise InputError(
        f"{name} weights cannot be trained without float32 master weights (AdamW would update the {name} "
        f"weights directly and lose most small updates to rounding). Keep --torch_dtype auto (float32 weights) "
        f"and use --mixed_precision bf16 for bf16 compute, or launch with DeepSpeed with {wanted} enabled, which "
        f"keeps float32 master weights", field="torch_dtype")


def read_train_files(path: str, n: int) -> List[RankedExample]:
    """Ranked examples from a file or from every *.json/*.jsonl file of a folder (name order)."""
    p = Path(path)
    examples: List[RankedExample] = []
    for f in data_files(path, "train_file_path", missing="training data not found"):
        examples.extend(read_ranked(f, expected_n=n))
    if not examples:
        raise InputError("no training examples", path=p, field="train_file_path")
    return examples


class Trainer(CheckpointMixin, ReferenceMixin, ValidationMixin, RecordsMixin):
    """setup() -> train(); the methods of checkpoints (`clha.training.state`), the DPO reference
    (`clha.training.reference`), validation (`clha.training.validation`) and logs (`clha.training.records`) are
    mixed in."""

    peft_model = None          # the peft wrapper once setup() applied --lora_r > 0 (clha.lora); None otherwise

    def __init__(self, cfg: TrainConfig, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.pos = Position()
        self._reward_model = None
        self.scalars = ScalarWriter(cfg.log_path)        # TensorBoard, under log_path/tensorboard
        self.history: List[Dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from transformers import get_scheduler

        from clha.collate import RankedCollator
        from clha.data.reward_sources import reward_source_shares

        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed)
        self.train_examples = read_train_files(cfg.train_file_path, cfg.training_stage_num) if cfg.do_train else []
        reward_source_shares(self.train_examples, log=logger if acc.is_main_process else None)
        self.dev_examples: List[RankedExample] = []
        if cfg.do_validation:
            dev_path = Path(cfg.validation_file_path) / cfg.validation_file_name
            self.dev_examples = read_ranked(dev_path, require_reward=False)
            if cfg.max_validation_examples:
                self.dev_examples = self.dev_examples[:cfg.max_validation_examples]
            if not self.dev_examples:
                raise InputError("dev file holds no prompt", path=dev_path)
        # model locations before any output: a missing local path stops the run before anything is loaded or written
        check_location(cfg.model_name_or_path, "model_name_or_path", "model", cfg.gguf_file)
        if cfg.do_validation:
            check_location(cfg.reward_model, "reward_model", "reward model")
        check_output_dir_shared(acc, cfg.output_dir)
        dtype = (training_dtype(cfg.torch_dtype, self._deepspeed_precision()) if cfg.do_train
                 else resolve_dtype(cfg.torch_dtype))
        model, self.tokenizer = load_policy(cfg.model_name_or_path, cfg.gguf_file, dtype, cfg.attn_implementation)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.peft_model = None                       # the peft wrapper when --lora_r > 0 (see clha.lora)
        if cfg.lora_r > 0:
            from clha.lora import apply_lora
            self.peft_model = apply_lora(model, cfg)
            model = self.peft_model.get_base_model()  # the same modules, adapters injected, base frozen
        self.collator = RankedCollator(self.tokenizer, cfg.block_size, cfg.training_stage_num,
                                       layout=cfg.candidate_layout, model=model, max_row_tokens=cfg.max_row_tokens,
                                       append_eos=cfg.append_eos)
        if cfg.logprob_head == "chunked":               # refuse a model it cannot score before the first step
            from clha.modeling import check_chunked_head
            try:
                check_chunked_head(model)
            except ValueError as err:
                raise InputError(str(err), field="logprob_head") from None
        self.world = acc.num_processes
        self.steps_per_epoch = steps_per_epoch(len(self.train_examples), cfg.per_device_train_batch_size,
                                               self.world, cfg.gradient_accumulation_steps) if self.train_examples else 0
        total = self.steps_per_epoch * cfg.num_train_epochs
        if cfg.max_train_steps:
            total = min(total, cfg.max_train_steps)
        self.total_steps = total
        # fused AdamW (one fused kernel per tensor group, faster than foreach) when accelerate puts every trainable
        # parameter on CUDA; torch's default (foreach) elsewhere and under DeepSpeed, which wraps the optimizer itself
        optimizer = torch.optim.AdamW(adamw_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                      fused=(acc.device.type == "cuda" and self._deepspeed_precision() is None) or None)
        # The scheduler is stepped once per optimizer step by this loop (not by accelerate, which would
        # step it once per process) and checkpointed through register_for_checkpointing.
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=max(total, 1))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        state = self._resume_path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        if state is not None:
            self.pos = self._read_position(state)
        # DPO: reference log-probs from the initial weights, so before the saved ones are loaded
        self.ref_sum_logps, self.ref_scored = None, None
        if cfg.loss_type in NEEDS_REFERENCE_MODEL and self.train_examples:
            self._score_reference(state)
        if state is not None:
            acc.load_state(str(state))
            logger.info("resumed from %s at optimizer step %d (epoch %d, step %d in epoch)", state,
                        self.pos.global_step, self.pos.epoch, self.pos.step_in_epoch)
        if acc.is_main_process:
            os.makedirs(cfg.log_path, exist_ok=True)
            write_json(Path(cfg.output_dir) / CONFIG_FILE, cfg.to_dict())
            self._truncate_logs_after(self.pos.global_step)
        acc.wait_for_everyone()
        logger.info("%d training examples, %d steps/epoch, %d optimizer steps, %d process(es); weights %s, "
                    "mixed precision %s", len(self.train_examples), self.steps_per_epoch, total, self.world,
                    str(dtype).replace("torch.", ""), acc.mixed_precision)

    def _deepspeed_precision(self) -> Optional[str]:
        """"bf16" / "fp16" / "no" for a DeepSpeed run (what its config enables), None otherwise."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        return acc.mixed_precision if acc.distributed_type == DistributedType.DEEPSPEED else None

    # ------------------------------------------------------------------ train
    def train(self) -> Dict:
        cfg, acc = self.cfg, self.accelerator
        if cfg.do_validation and self.pos.global_step == 0 and self.pos.best_reward is None:
            self.validate()
        if not cfg.do_train:
            return self.summary()
        self.model.train()
        bar = self._progress(range(self.total_steps), "train", initial=self.pos.global_step)
        while self.pos.global_step < self.total_steps:
            order = epoch_order(len(self.train_examples), self.pos.epoch, cfg.seed, cfg.per_device_train_batch_size,
                                self.world, cfg.gradient_accumulation_steps)
            while self.pos.step_in_epoch < self.steps_per_epoch and self.pos.global_step < self.total_steps:
                metrics = self._optimizer_step(order)
                self.pos.global_step += 1
                self.pos.step_in_epoch += 1
                bar.update(1)
                acc_text = "-" if metrics["rank_accuracy"] is None else f"{metrics['rank_accuracy']:.2f}"
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=acc_text)
                if self.pos.global_step % cfg.logging_steps == 0:
                    self._log_metrics(metrics)
                at_end = self.pos.global_step == self.total_steps
                if self.pos.global_step % cfg.checkpointing_step == 0 or at_end:
                    if cfg.do_validation:
                        self.validate()
                    else:
                        self.save_hf_checkpoint(f"step_{self.pos.global_step}")
                    self.save_train_state()
            if self.pos.step_in_epoch >= self.steps_per_epoch:
                if cfg.save_epoch_checkpoints:
                    self.save_hf_checkpoint(f"epoch_{self.pos.epoch}")
                self.pos.epoch += 1
                self.pos.step_in_epoch = 0
        bar.close()
        if self.pos.global_step % cfg.checkpointing_step != 0 and self.pos.global_step != self.total_steps:
            self.save_train_state()
        return self.summary()

    def _optimizer_step(self, order) -> Dict[str, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches. The host waits for the device twice
        per step, not per micro-batch: once to check that no loss of the step is NaN/inf (before the backward pass
        that applies the update) and once to read every metric, summed over micro-batches and processes in one
        tensor (one all-reduce)."""
        from clha.losses import compute_loss
        from clha.modeling import score_candidates

        cfg, acc = self.cfg, self.accelerator
        accum = cfg.gradient_accumulation_steps
        start = time.perf_counter()
        keys: List[str] = []
        sums: Optional[torch.Tensor] = None
        nonfinite = torch.zeros((), device=acc.device)
        tokens = 0
        grad_norm = None
        for micro in range(accum):
            idx = micro_batch(order, self.pos.step_in_epoch, micro, acc.process_index,
                              cfg.per_device_train_batch_size, self.world, accum)
            cpu_batch = self.collator([self.train_examples[i] for i in idx])
            tokens += int(cpu_batch["attention_tokens"]) if "attention_tokens" in cpu_batch else int(
                cpu_batch["input_ids"].numel())
            if self.ref_sum_logps is not None:
                cpu_batch["ref_sum_logps"] = self._reference_rows(idx)
            batch = self._to_device(cpu_batch)
            with acc.accumulate(self.model):
                scores = score_candidates(self.model, batch, logprob_head=cfg.logprob_head)
                ref = batch.get("ref_sum_logps")
                out = compute_loss(cfg.loss_type, scores, batch["rewards"].to(scores.sum_logps), batch["sft_index"],
                                   ref_sum_logps=None if ref is None else ref.to(scores.sum_logps),
                                   **self._loss_hyper())
                nonfinite = nonfinite + (~torch.isfinite(out.loss.detach())).to(nonfinite.dtype)
                if acc.sync_gradients or micro == accum - 1:
                    self._check_finite(nonfinite)
                acc.backward(out.loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            values = _loss_metrics(out, self._metric_dtype())
            keys = keys or list(values)
            stacked = torch.stack([values[k] for k in keys])
            sums = stacked if sums is None else sums + stacked
        self.scheduler.step()
        local = torch.cat([sums, torch.tensor([float(tokens)], dtype=sums.dtype, device=sums.device)])
        total = acc.reduce(local, reduction="sum") if self.world > 1 else local
        if isinstance(grad_norm, torch.Tensor):
            total = torch.cat([total, grad_norm.detach().reshape(1).to(total)])
        read = total.tolist()                                        # the step's one read of metric values
        metrics = {k: v / (accum * self.world) for k, v in zip(keys, read)}
        # accuracy over all valid pairs of the step (undefined, logged as null, when every pair was masked)
        valid = metrics.get("num_valid_pairs", 0.0)
        metrics["rank_accuracy"] = metrics.get("num_correct_pairs", 0.0) / valid if valid > 0 else None
        total_tokens = int(read[len(keys)])
        elapsed = time.perf_counter() - start
        metrics.update(step=self.pos.global_step + 1, epoch=self.pos.epoch, lr=self.scheduler.get_last_lr()[0],
                       tokens=total_tokens, tokens_per_s=total_tokens / max(elapsed, 1e-9), step_time_s=elapsed)
        if grad_norm is not None:
            metrics["grad_norm"] = read[-1] if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
        self._record_order(order)
        return metrics

    def _metric_dtype(self) -> torch.dtype:
        return torch.float32 if self.accelerator.device.type == "mps" else torch.float64

    def _loss_hyper(self) -> Dict:
        cfg = self.cfg
        return dict(rank_margin=cfg.rank_margin, reward_gap_threshold=cfg.reward_gap_threshold,
                    sft_weight=cfg.sft_weight, sft_reward_threshold=cfg.sft_reward_threshold,
                    temperature=cfg.temperature, beta=cfg.dpo_beta)

    def _check_finite(self, nonfinite: torch.Tensor) -> None:
        """Stop if any process had a NaN/inf loss in this optimizer step (`nonfinite`: this process's count).
        Called before the backward pass that applies the update, so no weight is changed and nothing of the step
        is saved; one all-reduce and one host sync per optimizer step."""
        bad = nonfinite.reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"loss is not finite (NaN or inf) at optimizer step {self.pos.global_step + 1} (epoch "
                f"{self.pos.epoch}); stopping without saving. Last good state: {self._latest_state_name() or 'none'}")

    # ------------------------------------------------------------------ helpers
    def _to_device(self, batch: Dict) -> Dict:
        """The batch's tensors on the accelerator's device. To a GPU they go from pinned memory without blocking,
        so the host prepares the next micro-batch while the device works."""
        device = self.accelerator.device
        if device.type != "cuda":
            return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return {k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) and
                    v.device.type == "cpu" else v) for k, v in batch.items()}

    def _progress(self, iterable, desc: str, initial: int = 0):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, initial=initial, disable=not self.accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)


def _loss_metrics(out, dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """Scalar diagnostics of one micro-batch as 0-dim tensors on the device, not read by the host (rank accuracy
    is formed per step from the pair counts)."""
    metrics = {"loss": out.loss, "rank_loss": out.rank_loss, "sft_loss": out.sft_loss,
               "masked_pair_fraction": out.masked_pair_fraction, "num_valid_pairs": out.num_valid_pairs,
               "num_correct_pairs": out.num_correct_pairs, "chosen_mean_logp": out.chosen_logps,
               "rejected_mean_logp": out.rejected_logps, "logp_margin": out.margin}
    metrics.update(out.extra)
    device = out.loss.device
    return {k: (v.detach().to(dtype).reshape(()) if isinstance(v, torch.Tensor) else
                torch.tensor(float(v), dtype=dtype, device=device)) for k, v in metrics.items()}


def run_training(cfg: TrainConfig, accelerator=None) -> Dict:
    trainer = Trainer(cfg, accelerator)
    trainer.setup()
    return trainer.train()

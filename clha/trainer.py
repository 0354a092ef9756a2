"""The training loop: CLHA (or a baseline loss) with accelerate, on one CPU or many GPUs.

Reads top to bottom: `setup()` builds everything from the config, `train()` runs the optimizer steps,
`validate()` generates on the dev prompts and scores them, `save_*` write checkpoints. DeepSpeed and DDP
are accelerate's business (chosen by the launch config), the losses are pure functions in `clha.losses`,
the one-pass candidate scoring is `clha.modeling.score_candidates`.

Outputs under `output_dir`:
    step_<N>/, epoch_<E>/       Hugging Face checkpoints (model, tokenizer, clha_config.json)
    best_checkpoint -> step_<N> the checkpoint with the best dev reward (a symlink)
    train_state/step_<N>/       resumable state (model, optimizer, scheduler, RNG, position); `latest` names the newest
Under `log_path`: metrics.jsonl, validation.jsonl, TensorBoard events, data_order.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from clha.config import TrainConfig
from clha.data.format import RankedExample, read_ranked
from clha.data.order import epoch_order, micro_batch, steps_per_epoch
from clha.errors import InputError
from clha.fileio import atomic_write, write_json

logger = logging.getLogger("clha.trainer")

TRAIN_STATE_DIR = "train_state"
KEEP_TRAIN_STATES = 2


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops before saving anything from that step."""


@dataclass
class Position:
    """Where training stands: everything needed (with the saved weights/optimizer) to resume exactly."""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_reward: Optional[float] = None
    best_step: Optional[int] = None


def make_accelerator(cfg):
    """The Accelerator of a training run, from a config with gradient_accumulation_steps,
    per_device_train_batch_size, max_grad_norm and, optionally, mixed_precision (else what `accelerate launch`
    was told). Used by the policy trainer and the reward-model trainer."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without CUDA accelerate sets no process-group backend; DeepSpeed on the CPU needs gloo. (A single
        # process must not get one: accelerate would then expect an initialised process group.)
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    mixed_precision = getattr(cfg, "mixed_precision", None)
    kwargs = {"mixed_precision": mixed_precision} if mixed_precision else {}
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              kwargs_handlers=handlers, **kwargs)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
    return accelerator


def adamw_param_groups(model, weight_decay: float) -> List[dict]:
    """Trainable parameters in two AdamW groups: weight decay on weights, none on biases and norms."""
    no_decay = ("bias", "norm")
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if any(k in name.lower() for k in no_decay) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep in path.rstrip(os.sep) and not _is_hub_id(path)


def _is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def resolve_dtype(name: str):
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_policy(model_name_or_path: str, gguf_file: Optional[str] = None, dtype_name: str = "auto"):
    """Load a causal LM and its tokenizer from a folder, a hub id, or a GGUF file inside a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(model_name_or_path)
    if os.path.exists(path):
        if gguf_file and not os.path.exists(os.path.join(path, gguf_file)):
            raise InputError(f"GGUF file {gguf_file!r} not found in the model folder", path=path, field="gguf_file")
    elif _looks_local(path):
        raise InputError("model path does not exist", path=path, field="model_name_or_path")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a tokenizer: {err}", path=path, field="model_name_or_path") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = from_pretrained_dense(AutoModelForCausalLM, path, gguf_file, dtype=resolve_dtype(dtype_name))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a causal LM: {err}", path=path, field="model_name_or_path") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def from_pretrained_dense(auto_class, path: str, gguf_file: Optional[str] = None, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)`; with a GGUF file inside `path`, its weights unpacked into a
    dense float model that trains and saves like any other (the policy trainer, evaluation and the reward-model
    trainer all load through here)."""
    model = auto_class.from_pretrained(path, **kwargs, **gguf_load_kwargs(gguf_file))
    if gguf_file:
        _drop_gguf_quantizer(model)
    return model


def gguf_load_kwargs(gguf_file: Optional[str]) -> dict:
    """`from_pretrained` keyword arguments that unpack a GGUF file into a dense float model (trainable, saved as a
    normal checkpoint, and run by the ordinary float kernels); {} without a GGUF file. Call
    `_drop_gguf_quantizer` on the loaded model."""
    if not gguf_file:
        return {}
    kwargs = {"gguf_file": gguf_file}
    try:
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    except (ImportError, TypeError):   # older transformers always de-quantize GGUF files and have no such option
        pass
    return kwargs


def _drop_gguf_quantizer(model) -> None:
    """A de-quantized GGUF model is a plain dense model: forget the GGUF loader so it trains and saves as one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("_is_quantized", None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass


def ranked_data_files(path: str, field: str, missing: str = "file not found") -> List[Path]:
    """A ranked-data file as given, or every *.json/*.jsonl file of a folder (name order)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl") and f.is_file())
        if not files:
            raise InputError("folder holds no .json/.jsonl file", path=p, field=field)
        return files
    if p.exists():
        return [p]
    raise InputError(missing, path=p, field=field)


def read_train_files(path: str, n: int) -> List[RankedExample]:
    """Ranked examples from a file or from every *.json/*.jsonl file of a folder (name order)."""
    p = Path(path)
    examples: List[RankedExample] = []
    for f in ranked_data_files(path, "train_file_path", missing="training data not found"):
        examples.extend(read_ranked(f, expected_n=n))
    if not examples:
        raise InputError("no training examples", path=p, field="train_file_path")
    return examples


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator=None):
        cfg.validate()
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.pos = Position()
        self._reward_model = None
        self._writer = None
        self.history: List[Dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from transformers import get_scheduler

        from clha.collate import RankedCollator

        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed)
        self.train_examples = read_train_files(cfg.train_file_path, cfg.training_stage_num) if cfg.do_train else []
        self.dev_examples: List[RankedExample] = []
        if cfg.do_validation:
            dev_path = Path(cfg.validation_file_path) / cfg.validation_file_name
            self.dev_examples = read_ranked(dev_path, require_reward=False)
            if cfg.max_validation_examples:
                self.dev_examples = self.dev_examples[:cfg.max_validation_examples]
            if not self.dev_examples:
                raise InputError("dev file holds no prompt", path=dev_path)
        model, self.tokenizer = load_policy(cfg.model_name_or_path, cfg.gguf_file, cfg.torch_dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.collator = RankedCollator(self.tokenizer, cfg.block_size, cfg.training_stage_num,
                                       layout=cfg.candidate_layout)
        self.ref_sum_logps = None
        if cfg.loss_type == "dpo" and self.train_examples:
            self.ref_sum_logps = self._reference_logps(model)

        self.world = acc.num_processes
        self.steps_per_epoch = steps_per_epoch(len(self.train_examples), cfg.per_device_train_batch_size,
                                               self.world, cfg.gradient_accumulation_steps) if self.train_examples else 0
        total = self.steps_per_epoch * cfg.num_train_epochs
        if cfg.max_train_steps:
            total = min(total, cfg.max_train_steps)
        self.total_steps = total
        optimizer = torch.optim.AdamW(adamw_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        # The scheduler is stepped once per optimizer step by this loop (not by accelerate, which would
        # step it once per process) and checkpointed through register_for_checkpointing.
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=max(total, 1))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        if cfg.resume_from_checkpoint:
            self._load_train_state(cfg.resume_from_checkpoint)
        if acc.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            os.makedirs(cfg.log_path, exist_ok=True)
            write_json(Path(cfg.output_dir) / "clha_config.json", cfg.to_dict())
            self._truncate_logs_after(self.pos.global_step)
        acc.wait_for_everyone()
        logger.info("%d training examples, %d steps/epoch, %d optimizer steps, %d process(es)",
                    len(self.train_examples), self.steps_per_epoch, total, self.world)

    @torch.no_grad()
    def _reference_logps(self, model) -> torch.Tensor:
        """DPO: summed log-probs of every candidate under the frozen initial model, computed once."""
        from clha.modeling import score_candidates

        acc = self.accelerator
        model.to(acc.device)
        was_training = model.training
        model.eval()
        n_ex = len(self.train_examples)
        mine = list(range(acc.process_index, n_ex, acc.num_processes))
        table = torch.zeros(n_ex, self.cfg.training_stage_num)
        bs = self.cfg.per_device_train_batch_size * 2
        for start in self._progress(range(0, len(mine), bs), "reference log-probs"):
            idx = mine[start:start + bs]
            batch = self._to_device(self.collator([self.train_examples[i] for i in idx]))
            table[idx] = score_candidates(model, batch).sum_logps.float().cpu()
        if acc.num_processes > 1:
            table = acc.reduce(table.to(acc.device), reduction="sum").cpu()
        model.train(was_training)
        return table

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
        from clha.losses import compute_loss
        from clha.modeling import score_candidates

        cfg, acc = self.cfg, self.accelerator
        start = time.perf_counter()
        sums: Dict[str, float] = {}
        tokens = 0
        consumed: List[int] = []
        for micro in range(cfg.gradient_accumulation_steps):
            idx = micro_batch(order, self.pos.step_in_epoch, micro, acc.process_index,
                              cfg.per_device_train_batch_size, self.world, cfg.gradient_accumulation_steps)
            consumed.extend(idx)
            batch = self._to_device(self.collator([self.train_examples[i] for i in idx]))
            tokens += int(batch["attention_tokens"]) if "attention_tokens" in batch else int(
                batch["input_ids"].numel())
            with acc.accumulate(self.model):
                scores = score_candidates(self.model, batch)
                ref = self.ref_sum_logps[idx].to(scores.sum_logps) if self.ref_sum_logps is not None else None
                out = compute_loss(cfg.loss_type, scores, batch["rewards"].to(scores.sum_logps), batch["sft_index"],
                                   ref_sum_logps=ref, **self._loss_hyper())
                self._check_finite(out.loss)
                acc.backward(out.loss)
                grad_norm = None
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in _loss_metrics(out, scores).items():
                sums[key] = sums.get(key, 0.0) + value
        self.scheduler.step()
        metrics = {k: v / cfg.gradient_accumulation_steps for k, v in sums.items()}
        metrics = self._mean_over_processes(metrics)
        # accuracy over all valid pairs of the step (undefined, logged as null, when every pair was masked)
        valid = metrics.get("num_valid_pairs", 0.0)
        metrics["rank_accuracy"] = metrics.get("num_correct_pairs", 0.0) / valid if valid > 0 else None
        total_tokens = self._sum_over_processes(tokens)
        elapsed = time.perf_counter() - start
        metrics.update(step=self.pos.global_step + 1, epoch=self.pos.epoch, lr=self.scheduler.get_last_lr()[0],
                       tokens=total_tokens, tokens_per_s=total_tokens / max(elapsed, 1e-9), step_time_s=elapsed)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self._record_order(consumed)
        return metrics

    def _loss_hyper(self) -> Dict:
        cfg = self.cfg
        return dict(rank_margin=cfg.rank_margin, reward_gap_threshold=cfg.reward_gap_threshold,
                    sft_weight=cfg.sft_weight, sft_reward_threshold=cfg.sft_reward_threshold,
                    temperature=cfg.temperature, beta=cfg.dpo_beta)

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"loss is {loss.item()} at optimizer step {self.pos.global_step + 1} (epoch {self.pos.epoch}); "
                f"stopping without saving. Last good state: {self._latest_state_name() or 'none'}")

    # ------------------------------------------------------------------ validation
    def _scorer(self):
        if self._reward_model is None:
            from clha.reward import load_reward_model
            self._reward_model = load_reward_model(self.cfg.reward_model, device=self.accelerator.device)
        return self._reward_model

    def validate(self) -> float:
        """Greedy generation on this process's share of the dev prompts, scored by the reward model."""
        from clha.generation import generate_responses

        cfg, acc = self.cfg, self.accelerator
        mine = list(range(acc.process_index, len(self.dev_examples), acc.num_processes))
        prompts = [self.dev_examples[i].prompt_turns for i in mine]
        model = acc.unwrap_model(self.model)
        responses = generate_responses(model, self.tokenizer, prompts, block_size=cfg.block_size,
                                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.per_device_eval_batch_size,
                                       progress=acc.is_main_process)
        rewards = self._scorer().score(prompts, responses, batch_size=cfg.reward_batch_size) if prompts else []
        local = [(i, r, float(s)) for i, r, s in zip(mine, responses, rewards)]
        gathered = _gather_objects(acc, local)
        gathered.sort(key=lambda t: t[0])
        mean_reward = sum(torch.sigmoid(torch.tensor(s)).item() for _, _, s in gathered) / max(len(gathered), 1)
        step = self.pos.global_step
        name = f"step_{step}"
        record = {"step": step, "dev_reward": mean_reward, "num_prompts": len(gathered),
                  "mean_response_words": sum(len(r.split()) for _, r, _ in gathered) / max(len(gathered), 1)}
        improved = self.pos.best_reward is None or mean_reward > self.pos.best_reward
        self.save_hf_checkpoint(name)
        if improved:
            self.pos.best_reward, self.pos.best_step = mean_reward, step
            if acc.is_main_process:
                _point_symlink(Path(cfg.output_dir) / "best_checkpoint", name)
        record.update(best_step=self.pos.best_step, best_reward=self.pos.best_reward)
        if acc.is_main_process:
            with open(Path(cfg.log_path) / "validation.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            with atomic_write(Path(cfg.log_path) / f"dev_generations_{name}.jsonl") as f:
                for i, r, s in gathered:
                    f.write(json.dumps({"index": i, "prompt": self.dev_examples[i].prompt_text(), "response": r,
                                        "reward": s}, ensure_ascii=False) + "\n")
            self._tb_scalar("dev/reward", mean_reward, step)
            logger.info("step %d: dev reward %.4f (best %.4f at step %s)", step, mean_reward,
                        self.pos.best_reward, self.pos.best_step)
        self.history.append(record)
        acc.wait_for_everyone()
        self.model.train()
        return mean_reward

    # ------------------------------------------------------------------ checkpoints
    def save_hf_checkpoint(self, name: str) -> Path:
        """A Hugging Face checkpoint (model, tokenizer, config JSON), written under a temp name then renamed."""
        acc = self.accelerator
        final = Path(self.cfg.output_dir) / name
        tmp = final.with_name(f".{name}.tmp")
        from accelerate.utils import DistributedType

        # Only DeepSpeed needs the gathered state dict; elsewhere save_pretrained handles tied weights itself.
        state = acc.get_state_dict(self.model) if acc.distributed_type == DistributedType.DEEPSPEED else None
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(self.model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "clha_config.json", {**self.cfg.to_dict(), "global_step": self.pos.global_step})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        acc.wait_for_everyone()
        return final

    def save_train_state(self) -> Path:
        acc = self.accelerator
        root = Path(self.cfg.output_dir) / TRAIN_STATE_DIR
        name = f"step_{self.pos.global_step}"
        target = root / name
        acc.save_state(str(target))
        if acc.is_main_process:
            write_json(target / "position.json", vars(self.pos))
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

    def _load_train_state(self, spec: str) -> None:
        if spec == "latest":
            name = self._latest_state_name()
            if name is None:
                logger.warning("--resume_from_checkpoint latest: no saved state in %s, starting fresh",
                               self.cfg.output_dir)
                return
            path = Path(self.cfg.output_dir) / TRAIN_STATE_DIR / name
        else:
            path = Path(spec)
        if not (path / "position.json").exists():
            raise InputError("not a complete train state (position.json missing)", path=path,
                             field="resume_from_checkpoint")
        self.accelerator.load_state(str(path))
        with open(path / "position.json", encoding="utf-8") as f:
            self.pos = Position(**json.load(f))
        logger.info("resumed from %s at optimizer step %d (epoch %d, step %d in epoch)", path,
                    self.pos.global_step, self.pos.epoch, self.pos.step_in_epoch)

    # ------------------------------------------------------------------ logging
    def _log_metrics(self, metrics: Dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(Path(self.cfg.log_path) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb_scalar(f"train/{key}", value, metrics["step"])

    def _tb_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(log_dir=str(Path(self.cfg.log_path) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._writer = False
        if self._writer:
            self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def _record_order(self, consumed: List[int]) -> None:
        gathered = _gather_objects(self.accelerator, [consumed])
        if self.accelerator.is_main_process:
            with open(Path(self.cfg.log_path) / "data_order.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.pos.global_step + 1, "epoch": self.pos.epoch,
                                    "examples": sorted(i for part in gathered for i in part)}) + "\n")

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

    # ------------------------------------------------------------------ helpers
    def _to_device(self, batch: Dict) -> Dict:
        return {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _progress(self, iterable, desc: str, initial: int = 0):
        from tqdm.auto import tqdm
        import sys
        return tqdm(iterable, desc=desc, initial=initial, disable=not self.accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)

    def _mean_over_processes(self, metrics: Dict[str, float]) -> Dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], device=self.accelerator.device, dtype=torch.float64)
        t = self.accelerator.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _sum_over_processes(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return int(self.accelerator.reduce(t, reduction="sum").item())


def _loss_metrics(out, scores) -> Dict[str, float]:
    """Scalar diagnostics of one micro-batch (rank accuracy is formed per step from the pair counts)."""
    metrics = {"loss": out.loss, "rank_loss": out.rank_loss, "sft_loss": out.sft_loss,
               "masked_pair_fraction": out.masked_pair_fraction, "num_valid_pairs": out.num_valid_pairs,
               "num_correct_pairs": out.num_correct_pairs, "chosen_mean_logp": out.chosen_logps,
               "rejected_mean_logp": out.rejected_logps, "logp_margin": out.margin}
    metrics.update(out.extra)
    return {k: float(v.detach().float().item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def _gather_objects(accelerator, items: List) -> List:
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object
    return list(gather_object(items))


def _point_symlink(link: Path, target_name: str) -> None:
    """Atomically make `link` a relative symlink to `target_name` (a sibling folder)."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def run_training(cfg: TrainConfig, accelerator=None) -> Dict:
    trainer = Trainer(cfg, accelerator)
    trainer.setup()
    return trainer.train()

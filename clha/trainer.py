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
import uuid
from dataclasses import dataclass
from datetime import timedelta
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
REFERENCE_FILE = "reference_logps.pt"      # DPO reference log-probs, saved in every train state
DEFAULT_TIMEOUT_MINUTES = 60
# What a train state was written under; resuming with other values would remap the data and break ZeRO shards.
RUN_SHAPE_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")


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


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_mixed_precision(name: Optional[str], cuda_bf16: Optional[bool] = None) -> Optional[str]:
    """The accelerate ``mixed_precision`` of a run: None leaves it to `accelerate launch`; "auto" takes what the
    launch config said and, without one, bf16 autocast on a GPU that supports it and none (fp32) elsewhere;
    "no" / "bf16" / "fp16" are used as given (bf16 autocast also runs on the CPU). ``cuda_bf16`` overrides the
    device check (the tests emulate a GPU's defaults on the CPU with it)."""
    if name is None or name != "auto":
        return name
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched.lower()
    return "bf16" if (_cuda_bf16() if cuda_bf16 is None else cuda_bf16) else "no"


def make_accelerator(cfg):
    """The Accelerator of a training run, from a config with gradient_accumulation_steps,
    per_device_train_batch_size, max_grad_norm and, optionally, mixed_precision (see `resolve_mixed_precision`;
    None: what `accelerate launch` was told) and ddp_timeout_minutes (collective timeout of a multi-process run,
    also DeepSpeed's: accelerate passes it to ``deepspeed.init_distributed``). Used by the policy trainer and
    the reward-model trainer."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # (A single process must get no process-group settings: accelerate would then expect a process group.)
        minutes = getattr(cfg, "ddp_timeout_minutes", None) or DEFAULT_TIMEOUT_MINUTES
        group = {"timeout": timedelta(minutes=minutes)}
        if not torch.cuda.is_available():
            # Without CUDA accelerate sets no process-group backend; DeepSpeed on the CPU needs gloo.
            group["backend"] = "gloo"
        handlers.append(InitProcessGroupKwargs(**group))
    mixed_precision = resolve_mixed_precision(getattr(cfg, "mixed_precision", None))
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
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]       # (LoRA adapters have no bias / norm parameters)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep in path.rstrip(os.sep) and not _is_hub_id(path)


def _is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~"))


def resolve_dtype(name: str):
    """Weights dtype of a model used without training (validation-only runs): auto is bf16 on a GPU."""
    if name == "auto":
        return torch.bfloat16 if _cuda_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def load_policy(model_name_or_path: str, gguf_file: Optional[str] = None, dtype_name="auto",
                attn_implementation: str = "auto"):
    """Load a causal LM and its tokenizer from a folder, a hub id, or a GGUF file inside a folder. ``dtype_name``: a
    `resolve_dtype` name or a torch dtype."""
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
        dtype = dtype_name if isinstance(dtype_name, torch.dtype) else resolve_dtype(dtype_name)
        model = from_pretrained_dense(AutoModelForCausalLM, path, gguf_file, dtype=dtype)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a causal LM: {err}", path=path, field="model_name_or_path") from None
    from clha.modeling import set_attn_implementation
    set_attn_implementation(model, attn_implementation)
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


class Trainer:
    peft_model = None          # the peft wrapper once setup() applied --lora_r > 0 (clha.lora); None otherwise

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
        state = self._resume_path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        if state is not None:
            self.pos = self._read_position(state)
        # DPO: reference log-probs from the initial weights, so before the saved ones are loaded
        self.ref_sum_logps, self.ref_scored = None, None
        if cfg.loss_type == "dpo" and self.train_examples:
            self._score_reference(state)
        if state is not None:
            acc.load_state(str(state))
            logger.info("resumed from %s at optimizer step %d (epoch %d, step %d in epoch)", state,
                        self.pos.global_step, self.pos.epoch, self.pos.step_in_epoch)
        if acc.is_main_process:
            os.makedirs(cfg.log_path, exist_ok=True)
            write_json(Path(cfg.output_dir) / "clha_config.json", cfg.to_dict())
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
            return score_candidates(self.model, batch).sum_logps.float()

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
                scores = score_candidates(self.model, batch)
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

    def _reference_rows(self, idx: List[int]) -> torch.Tensor:
        """DPO reference log-probs [len(idx), n] of a micro-batch (scored at setup, see `_score_reference`)."""
        missing = [i for i in idx if not self.ref_scored[i]]
        if missing:
            raise RuntimeError(f"no DPO reference log-probs for examples {missing}")
        return self.ref_sum_logps[idx]

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

    # ------------------------------------------------------------------ validation
    def _scorer(self):
        if self._reward_model is None:
            from clha.reward import load_reward_model
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin is None:
                self._reward_model = load_reward_model(self.cfg.reward_model, device=self.accelerator.device)
                return self._reward_model
            # Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, which then partitions every
            # model it loads (zero.Init); the reward model is used whole on each process, outside DeepSpeed.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
            try:
                self._reward_model = load_reward_model(self.cfg.reward_model, device=self.accelerator.device)
            finally:
                plugin.set_deepspeed_weakref()
        return self._reward_model

    def validate(self) -> float:
        """Greedy generation on this process's share of the dev prompts, scored by the reward model."""
        from clha.generation import generate_responses
        from clha.modeling import _attention_implementation, attn_implementation_as

        cfg, acc = self.cfg, self.accelerator
        mine = list(range(acc.process_index, len(self.dev_examples), acc.num_processes))
        prompts = [self.dev_examples[i].prompt_turns for i in mine]
        model = acc.unwrap_model(self.model)
        # A policy that trains with flex attention generates with sdpa: KV-cache decoding gains nothing from block
        # masks, and flex would compile again for every new shape (measured on an H200: 42 s for the first call,
        # then 1.8x slower than sdpa, same responses).
        gen_attn = "sdpa" if _attention_implementation(model) == "flex_attention" else _attention_implementation(model)
        with attn_implementation_as(model, gen_attn):
            responses = generate_responses(model, self.tokenizer, prompts, block_size=cfg.block_size,
                                           max_new_tokens=cfg.max_new_tokens,
                                           batch_size=cfg.per_device_eval_batch_size, progress=acc.is_main_process)
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
        # None unless the parameters are partitioned (ZeRO-3): then every process joins the gather
        state = state_dict_for_save(acc, self.model)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.peft_model is not None:          # merged model + adapter/ (clha.lora)
                from clha.lora import save_lora_checkpoint
                save_lora_checkpoint(self.peft_model, acc.unwrap_model(self.model), tmp, state)
            else:
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

    # ------------------------------------------------------------------ logging
    def _log_metrics(self, metrics: Dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(Path(self.cfg.log_path) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb_scalar(f"train/{key}", value, metrics["step"], flush=False)
        if self._writer:
            self._writer.flush()                     # once per logged step, not per scalar

    def _tb_scalar(self, tag: str, value: float, step: int, flush: bool = True) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(log_dir=str(Path(self.cfg.log_path) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._writer = False
        if self._writer:
            self._writer.add_scalar(tag, value, step)
            if flush:
                self._writer.flush()

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
        import sys
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

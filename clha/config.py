"""The training configuration: one dataclass whose fields carry their help, so it is also the CLI reference.

Built once at the entry point (`train/main.py`), saved as JSON next to the checkpoints, passed down.
The seed's arguments keep their names and meaning; new ones follow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

LOSS_TYPES = ("clha", "pro", "rrhf", "dpo", "sft")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- seed arguments (same names and meaning as the original CLHA/PRO code) ---
    task: str = _f("hh", "Task name; 'hh' for HH-RLHF (the only task the seed shipped).")
    train_file_path: Optional[str] = _f(None, "Ranked training data: a JSONL file or a folder whose *.json/*.jsonl files are read in name order.")
    validation_file_path: Optional[str] = _f(None, "Folder holding the dev file.")
    validation_file_name: Optional[str] = _f(None, "Dev file name inside --validation_file_path (e.g. sampled_dev.json).")
    output_dir: str = _f("checkpoints/run", "Where checkpoints, best_checkpoint and the resumable train_state go.")
    log_path: str = _f("logs/run", "Where metrics.jsonl, TensorBoard events and plots go.")
    index: str = _f("0", "Experiment id (recorded in the config).")
    seed: int = _f(42, "Random seed for initialisation, data order and sampling.")
    temperature: float = _f(1.0, "Score temperature; used by the PRO loss (scores / temperature), as in PRO.")
    sft_weight: float = _f(0.05, "Weight of the SFT term; multiplied by (n-1)^2 as in the reference.")
    num_train_epochs: int = _f(2, "Number of passes over the training data.")
    training_stage_num: int = _f(2, "Ranking length n: candidates used per example (the first n of each row).")
    block_size: int = _f(512, "Max tokens of prompt + response; prompts are cut from the left to block_size - 128.")
    learning_rate: float = _f(5e-6, "Peak AdamW learning rate.")
    per_device_train_batch_size: int = _f(2, "Examples (each with n candidates) per process per micro-batch.")
    per_device_eval_batch_size: int = _f(28, "Prompts per generation batch during validation.")
    model_name_or_path: Optional[str] = _f(None, "Any Hugging Face causal LM folder or hub id (with --gguf_file: the folder holding the GGUF file).")
    do_train: bool = _f(False, "Run training.")
    do_validation: bool = _f(False, "Generate on the dev prompts, score with --reward_model, keep best_checkpoint.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    checkpointing_step: int = _f(600, "Validate, save a checkpoint and a resumable state every this many optimizer steps.")
    max_train_steps: Optional[int] = _f(None, "Stop after this many optimizer steps (overrides epochs when smaller).")
    # --- new arguments ---
    loss_type: str = _f("clha", "Training objective.", choices=LOSS_TYPES)
    rank_margin: float = _f(3.0, "CLHA margin m: pair (k, k+d) is pushed apart by d*m in mean log-prob.")
    reward_gap_threshold: float = _f(3.0, "CLHA rescoring threshold tau: a pair counts only when |r_k - r_l| > tau.")
    sft_reward_threshold: float = _f(0.0, "CLHA adaptive SFT: imitate the best candidate only when its reward > this.")
    dpo_beta: float = _f(0.1, "DPO beta.")
    reward_model: Optional[str] = _f(None, "Reward model (path or hub id) used to score validation generations.")
    reward_batch_size: int = _f(16, "Batch size for reward-model scoring during validation.")
    max_new_tokens: int = _f(128, "Max new tokens generated per dev prompt during validation.")
    max_validation_examples: Optional[int] = _f(None, "Validate on at most this many dev prompts (quick runs).")
    lr_scheduler_type: str = _f("constant", "Learning-rate schedule: constant (the reference), linear, cosine, constant_with_warmup ...")
    warmup_steps: int = _f(0, "Linear warm-up steps of the schedule.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest' or a train_state folder: restores model, optimizer, scheduler, RNG and data position.")
    gguf_file: Optional[str] = _f(None, "GGUF file name inside --model_name_or_path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).")
    candidate_layout: str = _f("auto", "How candidates share a forward pass: shared_prompt (prompt once, 4D mask), padded, or auto.",
                               choices=("auto", "shared_prompt", "padded"))
    save_epoch_checkpoints: bool = _f(True, "Save a Hugging Face checkpoint at the end of every epoch, as the seed did.")
    logging_steps: int = _f(1, "Write metrics every this many optimizer steps.")
    torch_dtype: str = _f("auto", "Weights dtype when loading the model. Training keeps float32 weights (the optimizer's master copy): auto loads float32 for training (bf16 on a GPU for a validation-only run); bfloat16/float16 with --do_train are accepted only under DeepSpeed with that precision enabled (it keeps its own float32 master weights).",
                          choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = _f("auto", "Compute precision over float32 weights (accelerate autocast): auto = what the accelerate launch config says, without one bf16 on a GPU that supports it and fp32 on the CPU; no = fp32; bf16 = bf16 autocast, also on the CPU (emulates a GPU run's precision); fp16 = GPU only. Under DeepSpeed its config file's bf16/fp16 section decides.",
                              choices=("auto", "no", "bf16", "fp16"))
    ddp_timeout_minutes: int = _f(60, "Timeout of collective operations between processes (NCCL/gloo/DeepSpeed): how long a process waits for the others, e.g. while process 0 writes a checkpoint, before the run stops with an error.")
    attn_implementation: str = _f("auto", "Attention kernel of the policy: auto (flex_attention on CUDA when the model supports it, else sdpa), sdpa, eager, flex_attention (CUDA only for training).",
                                  choices=("auto", "sdpa", "eager", "flex_attention"))
    max_row_tokens: Optional[int] = _f(None, "Shared-prompt layout: most tokens packed into one row of a micro-batch (default n * block_size, the largest possible example); 0 packs the whole micro-batch into one row without padding (for flex_attention, whose block mask skips the tiles between examples).")
    append_eos: bool = _f(True, "End every training response with the tokenizer's EOS token (scored like the response's other tokens), so that the policy learns to stop where the reply ends; a response cut to fit --block_size gets none. --no-append_eos scores the response text alone, as the reference code did.")
    lora_r: int = _f(0, "LoRA rank; 0 trains every weight (full fine-tuning), > 0 trains only LoRA adapters (peft) on the frozen model. Checkpoints then hold the merged model (loaded like any checkpoint) and the adapter in adapter/.")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator: an adapter adds B @ A * lora_alpha / lora_r.")
    lora_dropout: float = _f(0.05, "Dropout on the input of the LoRA adapters (training only).")
    lora_target_modules: str = _f("all-linear", "Layers that get adapters: all-linear (every linear projection of attention and MLP, not the output head) or a comma-separated list of module names, e.g. q_proj,v_proj.")

    def validate(self) -> None:
        from clha.errors import InputError

        if self.loss_type not in LOSS_TYPES:
            raise InputError(f"unknown loss type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}", field="loss_type")
        if self.do_train and not self.train_file_path:
            raise InputError("--do_train needs --train_file_path", field="train_file_path")
        if not self.model_name_or_path:
            raise InputError("--model_name_or_path is required", field="model_name_or_path")
        if self.do_validation:
            if not (self.validation_file_path and self.validation_file_name):
                raise InputError("--do_validation needs --validation_file_path and --validation_file_name",
                                 field="validation_file_path")
            if not self.reward_model:
                raise InputError("--do_validation needs --reward_model to score the dev generations", field="reward_model")
        if self.training_stage_num < 1:
            raise InputError("must be >= 1", field="training_stage_num")
        if self.loss_type in ("clha", "pro", "rrhf", "dpo") and self.training_stage_num < 2:
            raise InputError(f"{self.loss_type} needs at least 2 candidates", field="training_stage_num")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InputError(f"unknown mixed precision {self.mixed_precision!r}; choose auto, no, bf16 or fp16",
                             field="mixed_precision")
        if self.lora_r < 0:
            raise InputError("must be >= 0 (0 = no LoRA, full fine-tuning)", field="lora_r")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise InputError("must be > 0", field="lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InputError("must be in [0, 1)", field="lora_dropout")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "checkpointing_step", "block_size",
                     "ddp_timeout_minutes"):
            if getattr(self, name) < 1:
                raise InputError("must be >= 1", field=name)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def build_parser(cls=TrainConfig, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        base = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
                "Optional[str]": str}.get(str(f.type), str)
        kwargs = dict(type=base, default=f.default, help=help_text)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    parser = build_parser(description="Train a causal LM with CLHA (or SFT / DPO / RRHF / PRO) on ranked data.")
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))

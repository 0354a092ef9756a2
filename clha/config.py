"""The training configuration: one dataclass whose fields carry their help, so it is also the CLI reference.

Built once at the entry point (`train/main.py`), saved as JSON next to the checkpoints, passed down.
The seed's arguments keep their names and meaning; new ones follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from clha.data.tokenize import RESPONSE_BUDGET
from clha.losses import LOSS_DEFAULTS, LOSS_TYPES
from clha.options import aliased, build_parser, config_from_dict, option as _f


@aliased
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
    temperature: float = _f(LOSS_DEFAULTS["temperature"], "Score temperature; used by the PRO loss (scores / temperature), as in PRO.")
    sft_weight: float = _f(LOSS_DEFAULTS["sft_weight"], "Weight of the SFT term; multiplied by (n-1)^2 as in the reference.")
    num_train_epochs: int = _f(2, "Number of passes over the training data.")
    training_stage_num: int = _f(2, "Ranking length n: candidates used per example (the first n of each row).")
    block_size: int = _f(512, f"Max tokens of prompt + response; prompts are cut from the left to block_size - {RESPONSE_BUDGET}.")
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
    rank_margin: float = _f(LOSS_DEFAULTS["rank_margin"], "CLHA margin m: pair (k, k+d) is pushed apart by d*m in mean log-prob.")
    reward_gap_threshold: float = _f(LOSS_DEFAULTS["reward_gap_threshold"], "CLHA rescoring threshold tau: a pair counts only when |r_k - r_l| > tau.")
    sft_reward_threshold: float = _f(LOSS_DEFAULTS["sft_reward_threshold"], "CLHA adaptive SFT: imitate the best candidate only when its reward > this.")
    dpo_beta: float = _f(LOSS_DEFAULTS["beta"], "DPO beta.")
    reward_model: Optional[str] = _f(None, "Reward model (path or hub id) used to score validation generations.")
    reward_batch_size: int = _f(16, "Batch size for reward-model scoring during validation.")
    max_new_tokens: int = _f(RESPONSE_BUDGET, f"Max new tokens generated per dev prompt during validation (at most the {RESPONSE_BUDGET}-token response budget).")
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
    logprob_head: str = _f("logits", "How token log-probs are computed: logits (the model's output layer gives [scored tokens x vocabulary] logits) or chunked (the output layer is applied chunk by chunk in forward and backward, so those logits and their gradient never exist: less memory for large vocabularies; refused for models that soft-cap or scale their logits, and under ZeRO-3).",
                           choices=("logits", "chunked"))
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
        import os
        for name in ("output_dir", "log_path"):
            path = getattr(self, name)
            if path and os.path.exists(path) and not os.path.isdir(path):
                raise InputError(f"{path} exists and is not a folder", field=name)
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
        if self.logprob_head not in ("logits", "chunked"):
            raise InputError(f"unknown log-prob head {self.logprob_head!r}; choose logits or chunked",
                             field="logprob_head")
        if self.lora_r < 0:
            raise InputError("must be >= 0 (0 = no LoRA, full fine-tuning)", field="lora_r")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise InputError("must be > 0", field="lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InputError("must be in [0, 1)", field="lora_dropout")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "checkpointing_step", "block_size",
                     "ddp_timeout_minutes", "num_train_epochs", "per_device_eval_batch_size", "reward_batch_size",
                     "max_new_tokens", "logging_steps"):
            if getattr(self, name) < 1:
                raise InputError("must be >= 1", field=name)
        # Values that cannot work are refused here, before any data or model is loaded.

        from clha.data.tokenize import RESPONSE_BUDGET

        if self.block_size <= RESPONSE_BUDGET:
            raise InputError(f"must exceed the response budget of {RESPONSE_BUDGET} tokens (prompts are cut to "
                             f"block_size - {RESPONSE_BUDGET}), got {self.block_size}", field="block_size")
        if self.max_new_tokens > RESPONSE_BUDGET:
            raise InputError(f"must be at most the response budget of {RESPONSE_BUDGET} tokens (a longer response "
                             f"would make prompt + response exceed block_size), got {self.max_new_tokens}",
                             field="max_new_tokens")
        for name in ("max_train_steps", "max_validation_examples", "max_row_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"must be >= 0, got {value}", field=name)
        # reward_gap_threshold < 0 (every pair counts, ties too) and sft_reward_threshold = -inf (SFT always on)
        # are the documented ablations; the other numbers must be finite and not negative.
        for name in ("learning_rate", "rank_margin", "sft_weight", "weight_decay", "max_grad_norm", "warmup_steps",
                     "lora_alpha"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"must be a finite number >= 0, got {value}", field=name)
        for name in ("temperature", "dpo_beta"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"must be a finite number > 0, got {value}", field=name)
        for name in ("reward_gap_threshold", "sft_reward_threshold"):
            if math.isnan(getattr(self, name)):
                raise InputError("must be a number, got nan", field=name)
        if self.do_train and self.learning_rate == 0:
            raise InputError("must be > 0 to train (0 would leave the weights as loaded)", field="learning_rate")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON values: an infinite float (e.g. `sft_reward_threshold=-inf`) becomes the string
        "-inf" / "inf", which `from_dict` and the command line read back (JSON has no infinity)."""
        return {k: (("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, values)


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    parser = build_parser(TrainConfig, "Train a causal LM with CLHA (or SFT / DPO / RRHF / PRO) on ranked data.")
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))

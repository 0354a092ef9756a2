"""LoRA adapters for the policy trainer (`--lora_r > 0`), built with `peft`.

Only the adapters train: the base weights are frozen, so the optimizer (and DeepSpeed's optimizer shards) hold
state for the adapter matrices alone. What the trainer does with them:

- it trains the Hugging Face model *inside* the peft wrapper (the same modules, with LoRA layers injected), so
  accelerate / DeepSpeed / `score_candidates` see an ordinary causal LM (`logits_to_keep`, attention switching and
  the layout checks work unchanged); the peft wrapper is kept beside it for `disable_adapter()` and saving;
- DPO's reference log-probs come from the same model with the adapters switched off (`adapters_disabled`): the
  frozen base *is* the reference, no second copy of the model is held;
- every Hugging Face checkpoint (`step_<N>/`, `epoch_<E>/`, `best_checkpoint`) holds the **merged** model
  (W + B A * alpha / r for every adapted layer), which evaluation, validation and `from_pretrained` load like any
  checkpoint, and the adapter alone in `adapter/` (peft format: `PeftModel.from_pretrained(base, "step_N/adapter")`);
  the merge is computed into the saved state dict, never applied to the training weights (merging and unmerging
  in place would round the frozen base weights);
- the resumable train state (`accelerator.save_state`) holds the model with its adapters and the optimizer state
  of the adapters, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Union

import torch

from clha.errors import InputError

ADAPTER_DIR = "adapter"        # inside each checkpoint folder
ADAPTER_NAME = "default"       # peft's name for the (single) adapter
PEFT_PREFIX = "base_model.model."


def target_modules(spec: str) -> Union[str, List[str]]:
    """`--lora_target_modules` as peft takes it: "all-linear" (every linear layer of attention and MLP, not the
    output head) or a comma-separated list of module names (e.g. "q_proj,v_proj")."""
    spec = (spec or "").strip()
    if spec == "all-linear":
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InputError("give 'all-linear' or a comma-separated list of module names (e.g. q_proj,v_proj)",
                         field="lora_target_modules")
    return names


def apply_lora(model, cfg):
    """Wrap `model` (a loaded causal LM) with fresh LoRA adapters from the config's lora_* fields; returns the peft
    model. The base weights are frozen; train `peft_model.get_base_model()` (the same modules)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("--lora_r needs the peft package: pip install 'peft>=0.21'", field="lora_r") from None
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=target_modules(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:       # e.g. target modules that match nothing in this model
        raise InputError(f"cannot add LoRA adapters: {err}", field="lora_target_modules") from None
    if getattr(cfg, "gradient_checkpointing", False):
        # With frozen embeddings the checkpointed blocks' inputs need grad, or the adapters get none.
        peft_model.get_base_model().enable_input_require_grads()
    return peft_model


def adapters_disabled(peft_model):
    """A context in which the model runs without its adapters (the frozen base); a no-op without LoRA."""
    return peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()


def lora_scaling(peft_model) -> float:
    config = peft_model.peft_config[ADAPTER_NAME]
    return config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)


def merged_state_dict(state: Dict[str, torch.Tensor], scaling: float) -> Dict[str, torch.Tensor]:
    """The plain model's state dict from that of a model with LoRA layers (the module's own or one gathered under
    ZeRO-3): each `<layer>.base_layer.weight` becomes `<layer>.weight` plus `B @ A * scaling` (computed in float32,
    stored in the weight's dtype), `<layer>.base_layer.bias` becomes `<layer>.bias`, the adapter tensors go."""
    merged: Dict[str, torch.Tensor] = {}
    marker = ".base_layer."
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if marker not in key:
            merged[key] = value
            continue
        layer, kind = key.split(marker, 1)
        new_key = f"{layer}.{kind}"
        a = state.get(f"{layer}.lora_A.{ADAPTER_NAME}.weight")
        b = state.get(f"{layer}.lora_B.{ADAPTER_NAME}.weight")
        if kind == "weight" and a is not None and b is not None:
            delta = (b.float() @ a.float()) * scaling
            merged[new_key] = (value.float() + delta.to(value.device)).to(value.dtype)
        else:
            merged[new_key] = value
    return merged


def adapter_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapter tensors of a model-with-LoRA state dict, keyed as `PeftModel.save_pretrained` expects."""
    return {PEFT_PREFIX + k: v for k, v in state.items() if ".lora_" in k}


def save_lora_checkpoint(peft_model, inner, folder, state: Optional[Dict[str, torch.Tensor]]) -> None:
    """Write the merged model (Hugging Face files) into `folder` and the adapter into `folder/adapter/`. `state`:
    the full state dict when the parameters are partitioned (ZeRO-3, gathered by every process), else None (the
    module's own is read)."""
    if state is None:
        state = inner.state_dict()
    inner.save_pretrained(folder, state_dict=merged_state_dict(state, lora_scaling(peft_model)),
                          safe_serialization=True)
    peft_model.save_pretrained(str(folder) + "/" + ADAPTER_DIR, state_dict=adapter_state_dict(state),
                               safe_serialization=True)

"""The model side of reward-model training: a backbone loaded as a one-label sequence classifier, the scorer that
defines its input, freezing and dropout, and saving it as a Hugging Face folder that `clha.rm.scoring.load_reward_model`
loads like any other reward model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from clha.errors import InputError
from clha.loading import check_location, from_pretrained_dense, load_tokenizer, save_hf_folder
from clha.rm.config import CONFIG_FILE

def load_backbone(model_name_or_path: str, gguf_file: Optional[str] = None):
    """(model, tokenizer): any Hugging Face model as a one-label sequence classifier, float32.

    A checkpoint without a classification head (a plain encoder, a causal LM) gets a new one-label head; one
    with another number of labels gets its head replaced.
    """
    from transformers import AutoModelForSequenceClassification

    from clha.rm import neox  # noqa: F401  (registers gpt_neox_reward_model with the Auto classes)

    path = check_location(model_name_or_path, "model_name_or_path", "model", gguf_file)
    tokenizer = load_tokenizer(path, gguf_file, pad_with_eos=False)   # (the scorer sets the pad token)
    try:
        model = from_pretrained_dense(AutoModelForSequenceClassification, path, gguf_file, num_labels=1,
                                      dtype=torch.float32, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a sequence classifier from it: {err}", path=path,
                         field="model_name_or_path") from None
    return model, tokenizer


def make_scorer(model, tokenizer, name: str, max_length: int):
    """The `clha.rm.scoring` scorer that will score this model after saving (its `encode` defines the input)."""
    from clha.rm.neox import MODEL_TYPE
    from clha.rm.scoring import HFRewardScorer, OAsstRewardScorer

    cls = OAsstRewardScorer if getattr(model.config, "model_type", None) == MODEL_TYPE else HFRewardScorer
    return cls(model, tokenizer, name=name, max_length=max_length)


def freeze_all_but_last_layers(model, keep: int) -> Dict[str, int]:
    """Freeze embeddings and all transformer blocks but the last `keep`; norms, pooler and head stay trainable."""
    import torch.nn as nn

    if keep <= 0:
        return {"trainable": sum(p.numel() for p in model.parameters()), "frozen": 0}
    blocks_name, blocks = "", None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (blocks is None or len(module) > len(blocks)):
            blocks_name, blocks = name, module
    if blocks is None:
        raise InputError("no stack of transformer blocks (nn.ModuleList) found", field="train_last_layers")
    first_trained = max(len(blocks) - keep, 0)
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        if name.startswith(blocks_name + "."):
            trainable = int(name[len(blocks_name) + 1:].split(".")[0]) >= first_trained
        else:
            trainable = "embed" not in name and ".wte." not in name and ".wpe." not in name
        param.requires_grad = trainable
        counts["trainable" if trainable else "frozen"] += param.numel()
    return counts


def disable_dropout(model) -> int:
    """Set the probability of every dropout module (and of attention dropout read from them) to 0."""
    import torch.nn as nn

    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            count += 1
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    return count


def save_reward_model(model, tokenizer, out_dir: str | os.PathLike, config: Dict[str, Any], max_length: int,
                      state_dict=None) -> Path:
    """A Hugging Face folder (model, tokenizer with model_max_length = max_length, config JSON), written under a
    temporary name and renamed into place (an older model there is replaced whole: results of an older model must
    not stay beside a new one)."""
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = max_length
    try:
        return save_hf_folder(out_dir, model, tokenizer, {CONFIG_FILE: config}, state_dict=state_dict)
    finally:
        tokenizer.model_max_length = previous

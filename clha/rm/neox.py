"""OpenAssistant GPT-NeoX reward models (`model_type: gpt_neox_reward_model`).

The OpenAssistant reward models used by the CLHA / PRO evaluation protocol
(`OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5` for training data,
`OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1` for evaluation) ship a config whose `model_type` is
`gpt_neox_reward_model`, which stock transformers does not know. Their weights are a GPT-NeoX backbone stored
under `gpt_neox.*` and a single linear head `out_proj` (hidden -> 1 logit); the score is the head applied to the
hidden state of the last real token (pooling "last", the default) or to the masked mean of the hidden states
(pooling "mean").

Importing this module registers the config with `AutoConfig` and the model with
`AutoModelForSequenceClassification`, so `AutoModelForSequenceClassification.from_pretrained(path)` loads such a
checkpoint. `clha.rm.scoring.load_reward_model` loads them directly with `GPTNeoXRewardModel.from_pretrained`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXPreTrainedModel

MODEL_TYPE = "gpt_neox_reward_model"
POOLINGS = ("last", "mean")


class GPTNeoXRewardModelConfig(GPTNeoXConfig):
    """GPT-NeoX config plus the pooling of the reward head ("last" or "mean"; None means "last")."""

    model_type = MODEL_TYPE

    pooling: Optional[str] = "last"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.pooling = self.pooling or "last"
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")


def pool_hidden_states(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       pooling: str = "last") -> torch.Tensor:
    """Pool [B, T, H] hidden states to [B, H]: the last position whose mask is 1, or the masked mean.

    "last" takes the right-most attended position, so it is right for right padding (and for left padding too).
    """
    if pooling == "last":
        if attention_mask is None:
            return hidden_states[:, -1]
        mask = attention_mask.to(torch.long)
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        last = (positions * mask).argmax(dim=1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last.to(
            hidden_states.device)]
    if pooling == "mean":
        if attention_mask is None:
            return hidden_states.mean(dim=1)
        mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


class GPTNeoXRewardModel(GPTNeoXPreTrainedModel):
    """GPT-NeoX backbone (`self.gpt_neox`) + linear head `self.out_proj` to one logit.

    Parameter names match OpenAssistant's checkpoints (`gpt_neox.*`, `out_proj.weight`, `out_proj.bias`).
    `forward` returns a `SequenceClassifierOutput` whose `logits` have shape [batch, 1].
    """

    config_class = GPTNeoXRewardModelConfig
    config: GPTNeoXRewardModelConfig
    # Buffers that old GPT-NeoX checkpoints carry and the current backbone recomputes.
    _keys_to_ignore_on_load_unexpected = [r"attention\.bias", r"attention\.masked_bias",
                                          r"rotary_emb\.inv_freq"]

    def __init__(self, config):
        if type(config) is GPTNeoXConfig:  # a plain NeoX config: promote it, pooling "last"
            config = GPTNeoXRewardModelConfig.from_dict(config.to_dict())
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = nn.Linear(config.hidden_size, 1)
        self.pooling = getattr(config, "pooling", None) or "last"
        self.post_init()

    def get_input_embeddings(self):
        return self.gpt_neox.embed_in

    def set_input_embeddings(self, value):
        self.gpt_neox.embed_in = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                **kwargs) -> SequenceClassifierOutput:
        kwargs.pop("use_cache", None)
        kwargs.pop("token_type_ids", None)
        outputs = self.gpt_neox(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        pooled = pool_hidden_states(outputs.last_hidden_state, attention_mask, self.pooling)
        logits = self.out_proj(pooled)
        loss = None
        if labels is not None:  # regression on the logit, as for any one-label classifier
            loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.to(torch.float32).view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """Register the config and model with the transformers Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GPTNeoXRewardModelConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(GPTNeoXRewardModelConfig, GPTNeoXRewardModel, exist_ok=True)


register()

__all__ = ["GPTNeoXRewardModelConfig", "GPTNeoXRewardModel", "MODEL_TYPE", "pool_hidden_states", "register"]

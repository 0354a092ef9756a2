"""Tiny reward models built from a config, saved as normal Hugging Face folders (tests and the demo).

Nothing downloads: tokenizers are trained in about a second on HH-style text (`clha.testing.tiny`), the models are
randomly initialised and hold a few hundred thousand parameters. Their scores mean nothing; they exercise the
exact code paths of real reward models:

- `save_tiny_seqcls_reward_model(dir, arch="llama")`: a Llama sequence classifier (causal, pools the last
  non-pad token, like most LLM reward models), byte-level BPE tokenizer.
- `save_tiny_seqcls_reward_model(dir, arch="bert")`: a BERT sequence classifier with a WordPiece tokenizer that
  adds [CLS] ... [SEP] (like all-MiniLM-L6-v2 / DeBERTa reward models).
- `save_tiny_neox_reward_model(dir)`: an OpenAssistant-style GPT-NeoX reward model
  (`model_type: gpt_neox_reward_model`, `gpt_neox.*` + `out_proj`), tokenizer with eos `<|endoftext|>` and the
  `<|prompter|>` / `<|assistant|>` specials.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from clha.testing.tiny import _BASE_CORPUS, build_tokenizer

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ARCHES = ("llama", "bert")


def build_wordpiece_tokenizer(extra_texts: Optional[Iterable[str]] = None, vocab_size: int = 400):
    """A BERT-style (lower-cased WordPiece) tokenizer whose post-processor adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(_BASE_CORPUS) + list(extra_texts or [])
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS,
                                        show_progress=False)
    tok.train_from_iterator(texts * 4, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                   clean_up_tokenization_spaces=False)


def _seqcls_config(arch: str, tokenizer, pad_token_id, hidden_size: int, layers: int, heads: int,
                   max_positions: int):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=max_positions, num_labels=1, pad_token_id=pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if arch == "bert":
        from transformers import BertConfig

        return BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                          num_labels=1, pad_token_id=pad_token_id, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, initializer_range=0.2)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")


def build_tiny_seqcls_reward_model(arch: str = "llama", seed: int = 0, with_pad_token: bool = True,
                                   hidden_size: int = 64, layers: int = 2, heads: int = 4,
                                   max_positions: int = 512):
    """(model, tokenizer): a randomly initialised one-label sequence classifier and its tokenizer.

    `with_pad_token=False` (llama only) builds a tokenizer without a pad token and a config without
    `pad_token_id`, as many causal-LM checkpoints ship; the scorer must then pad with eos.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if arch == "bert":
        tokenizer = build_wordpiece_tokenizer()
    elif arch == "llama":
        tokenizer = build_tokenizer()
        if not with_pad_token:
            tokenizer.pad_token = None
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    config = _seqcls_config(arch, tokenizer, tokenizer.pad_token_id, hidden_size, layers, heads, max_positions)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    _spread_head(model, seed)
    return model.eval(), tokenizer


def _spread_head(model, seed: int) -> None:
    """Give the (tiny, random) head weights of a useful size so that scores differ visibly between inputs."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if name.split(".")[0] in ("score", "classifier", "out_proj") and param.dim() == 2:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)


def save_tiny_seqcls_reward_model(out_dir: str | os.PathLike, seed: int = 0, arch: str = "llama",
                                  with_pad_token: bool = True, **config_kwargs) -> str:
    """Build and save a tiny one-label sequence-classification reward model + tokenizer (backend a)."""
    model, tokenizer = build_tiny_seqcls_reward_model(arch=arch, seed=seed, with_pad_token=with_pad_token,
                                                      **config_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_neox_reward_model(seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                                 max_positions: int = 1024, pooling: str = "last"):
    """(model, tokenizer): a randomly initialised OpenAssistant-style GPT-NeoX reward model."""
    import torch

    from clha.rm.neox import GPTNeoXRewardModel, GPTNeoXRewardModelConfig

    tokenizer = build_tokenizer()
    config = GPTNeoXRewardModelConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, pooling=pooling,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["GPTNeoXRewardModel"], initializer_range=0.2)
    torch.manual_seed(seed)
    model = GPTNeoXRewardModel(config)
    _spread_head(model, seed)
    return model.eval(), tokenizer


def save_tiny_neox_reward_model(out_dir: str | os.PathLike, seed: int = 0, **config_kwargs) -> str:
    """Build and save a tiny `gpt_neox_reward_model` checkpoint + tokenizer (backend b)."""
    model, tokenizer = build_tiny_neox_reward_model(seed=seed, **config_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)

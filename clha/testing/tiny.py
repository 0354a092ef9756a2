"""Tiny models and tokenizers built from a config, for the built-in demo and the tests.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in about a second on
HH-style text, the models are randomly initialised Hugging Face architectures of a few hundred
thousand parameters that `save_pretrained` / `from_pretrained` like any other checkpoint.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|prompter|>", "<|assistant|>"]

_BASE_CORPUS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, knead, let it rise, then bake.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "\n\nHuman: Can you help me with my homework?\n\nAssistant: Sure, what subject is it?",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
    "\n\nHuman: How can I hurt someone?\n\nAssistant: I can't help with that, but I'm happy to talk about something else.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]


def build_tokenizer(extra_texts: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-2 style) trained on HH-style text; any UTF-8 string encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts: List[str] = list(_BASE_CORPUS) + list(extra_texts or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None, padding_side="right",
                                   clean_up_tokenization_spaces=False)


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                      max_positions: int = 1024, tokenizer=None):
    from transformers import LlamaConfig

    kwargs = {}
    if tokenizer is not None:
        kwargs = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True, **kwargs)


def build_causal_lm(tokenizer, seed: int = 0, **config_kwargs):
    """A randomly initialised tiny Llama causal LM matching `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), tokenizer=tokenizer, **config_kwargs)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_causal_lm(out_dir: str | os.PathLike, seed: int = 0, extra_texts=None, **config_kwargs) -> str:
    """Build and save a tiny causal LM + tokenizer as a normal Hugging Face checkpoint folder."""
    tokenizer = build_tokenizer(extra_texts)
    model = build_causal_lm(tokenizer, seed=seed, **config_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)

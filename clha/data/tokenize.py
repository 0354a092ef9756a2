"""Turning (prompt, response) text into token ids exactly the same way in training and generation.

Rules (docs/method.md): the prompt is cut from the LEFT (the latest turns are kept) to
`block_size - 128` tokens; prompt + response is cut from the RIGHT to `block_size` tokens. The model
input is prompt + " " + response; the prompt and " " + response are tokenised separately so that the
prompt/response boundary is exact. Training appends the end-of-sequence token to each response (`eos_id`), so
that the policy learns to stop where the human reply stopped; a response cut to fit `block_size` keeps no EOS
(it did not end there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

RESPONSE_BUDGET = 128


def _bos_id(tokenizer) -> Optional[int]:
    """The BOS id if this tokenizer adds one by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def max_prompt_tokens(block_size: int) -> int:
    if block_size <= RESPONSE_BUDGET:
        raise ValueError(f"block_size ({block_size}) must exceed the response budget of {RESPONSE_BUDGET} tokens")
    return block_size - RESPONSE_BUDGET


def encode_prompt(tokenizer, prompt: str, block_size: int) -> List[int]:
    """Prompt ids (BOS first when the tokenizer uses one), cut from the left to block_size - 128 tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = _bos_id(tokenizer)
    budget = max_prompt_tokens(block_size) - (1 if bos is not None else 0)
    if len(ids) > budget:
        ids = ids[len(ids) - budget:]
    return ([bos] if bos is not None else []) + list(ids)


def encode_response(tokenizer, response: str) -> List[int]:
    """Ids of " " + response (the separator belongs to the response, as in the model input text)."""
    return list(tokenizer(" " + response, add_special_tokens=False)["input_ids"])


@dataclass
class EncodedPair:
    prompt_ids: List[int]
    response_ids: List[int]

    @property
    def input_ids(self) -> List[int]:
        return self.prompt_ids + self.response_ids


def encode_pair(tokenizer, prompt: str, response: str, block_size: int,
                prompt_ids: Optional[List[int]] = None, eos_id: Optional[int] = None) -> EncodedPair:
    """Encode prompt + response (+ `eos_id` when given), cutting the response so the total fits in block_size."""
    if prompt_ids is None:
        prompt_ids = encode_prompt(tokenizer, prompt, block_size)
    response_ids = encode_response(tokenizer, response) + ([eos_id] if eos_id is not None else [])
    room = block_size - len(prompt_ids)
    return EncodedPair(prompt_ids=prompt_ids, response_ids=response_ids[:room])

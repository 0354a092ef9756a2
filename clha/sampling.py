"""Seeded sampling of several responses per ranked-format prompt, on the engines of `clha.generation`.

    from clha.sampling import SamplingConfig, sample_responses
    samples = sample_responses(model, tokenizer, prompts, k=2, config=SamplingConfig(temperature=0.7, top_p=0.9,
                                                                                      seed=42))
    # samples[i][j]: the j-th `Generation` (response, stop) of prompt i

Everything but the choice of the next token is the greedy pipeline of `clha.generation`: the prompt is encoded as in
training (left cut to block_size - 128 tokens), at most `max_new_tokens` new tokens, the response is cut at the first
EOS and then at the first "Human:" / "Assistant:", stripped. The next token is drawn from
softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of most probable tokens whose
probability reaches `top_p`; the most probable token is always in it). Other logits settings of the model's
generation config (repetition penalty, top-k ...) are not applied.

Randomness and what is guaranteed: every (prompt, sample) row has its own random stream, a `torch.Generator`
seeded from sha256(seed, prompt key, sample number), and consumes exactly one uniform number per generated token
(inverse-CDF draw over the nucleus sorted by probability, in float64). The prompt key is the prompt's index in the
call unless `keys` are given (`clha.data.candidates` passes the row's index in the input file). So a row's sample
depends on the model, the settings, the seed, its key and its prompt only: not on the batch size, on the other
prompts of the call, on how prompts are split over calls, processes or shards, nor on the engine. Exactly so in
float32 up to floating-point rounding: padding and batch composition change the logits in their last bits (as for
greedy decoding), which moves a token only when the drawn number falls within that rounding of a boundary of the
cumulative distribution (in bf16 / fp16 the rounding is larger, so compare samples in float32).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from clha.generation import Generation, check_settings, encode_prompts, generate_from_ids


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn: softmax(logits / temperature) over the top-p nucleus, seeded per row."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling (greedy decoding is clha.generation), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def row_seed(seed: int, key, sample: int) -> int:
    """The 63-bit seed of the random stream of sample `sample` of the prompt with key `key`."""
    digest = hashlib.sha256(f"clha-sampling/{seed}/{key}/{sample}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class RowSampler:
    """The picker (`clha.fast_engine.Picker`) that draws each row's next token from its own random stream.

    `seeds[r]` seeds the stream of row `r`; `pick(logits, rows)` draws one uniform number per given row.
    """

    def __init__(self, config: SamplingConfig, seeds: Sequence[int]):
        self.config = config
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        probs = torch.softmax(logits.double() / self.config.temperature, dim=-1)
        # most probable first; a stable sort keeps ties in vocabulary order, so the order is reproducible
        probs, tokens = torch.sort(probs, dim=-1, descending=True, stable=True)
        cum = probs.cumsum(-1)
        if self.config.top_p < 1:
            # keep a token while the mass before it is below top_p (the first token is always kept)
            probs = torch.where(cum - probs < self.config.top_p, probs, torch.zeros_like(probs))
            cum = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=self.generators[r], dtype=torch.float64) for r in rows])
        threshold = (u * cum[:, -1]).to(cum.device)[:, None]
        # the first position whose cumulative mass exceeds u * total (clamped against rounding at the end)
        index = (cum <= threshold).sum(-1).clamp(max=probs.shape[-1] - 1)
        # never a token outside the nucleus, even where rounding lands past its last member
        index = torch.minimum(index, (probs > 0).sum(-1) - 1)
        return tokens.gather(-1, index[:, None]).squeeze(-1).to(logits.device)


def sample_with_details(model, tokenizer, prompts: Sequence[Sequence[str]], k: int, config: SamplingConfig,
                        keys: Optional[Sequence] = None, block_size: int = 512, max_new_tokens: int = 128,
                        batch_size: int = 8, progress: Optional[bool] = None,
                        engine: str = "auto") -> List[List[Generation]]:
    """`k` sampled `Generation`s per prompt (`result[i][j]`: sample j of prompt i), seeded per (key, j).

    `keys`: one hashable, printable key per prompt (default: the prompt's index); two prompts with the same key and
    text get the same samples. The model is put in eval mode and every module's training flag is restored after.
    """
    if k < 1:
        raise ValueError(f"k (samples per prompt) must be >= 1, got {k}")
    check_settings(engine, batch_size, max_new_tokens)
    prompts = list(prompts)
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    if not prompts:
        return []
    encoded = encode_prompts(tokenizer, prompts, block_size)
    rows = [ids for ids in encoded for _ in range(k)]                    # row i * k + j: sample j of prompt i
    sampler = RowSampler(config, [row_seed(config.seed, key, j) for key in keys for j in range(k)])
    gens = generate_from_ids(model, tokenizer, rows, max_new_tokens, batch_size, progress, engine, pick=sampler,
                             desc="sample")
    return [gens[i * k:(i + 1) * k] for i in range(len(prompts))]


def sample_responses(model, tokenizer, prompts: Sequence[Sequence[str]], k: int, config: SamplingConfig,
                     **kwargs) -> List[List[str]]:
    """`sample_with_details` without the stop reasons: `k` response strings per prompt."""
    return [[g.response for g in row] for row in sample_with_details(model, tokenizer, prompts, k, config, **kwargs)]


__all__ = ["SamplingConfig", "RowSampler", "row_seed", "sample_with_details", "sample_responses"]

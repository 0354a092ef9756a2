"""Greedy generation of responses for ranked-format prompts, as validation and evaluation need it (seeded
sampling, for extra training candidates, is `clha.sampling`, on the same engines).

    responses = generate_responses(model, tokenizer, [["<|prompter|>Hi", "<|assistant|>"]], max_new_tokens=128)

Rules (docs/method.md, Evaluation):
- a prompt (marker turns ending with the bare "<|assistant|>") is rendered with `render_prompt` and encoded with
  `clha.data.tokenize.encode_prompt`, exactly as in training (left cut to block_size - 128 tokens, BOS when the
  tokenizer uses one);
- pure greedy decoding: the arg-max token at each step (the sampling, beam, repetition-penalty and other logits
  settings of the model's generation config are not applied), at most `max_new_tokens` new tokens, KV cache;
- the response is decoded from the generated token ids only (the prompt ids are sliced off, never searched for in
  decoded text), cut at the first EOS, then at the first "Human:" / "Assistant:" in any case, and stripped.

Speed: prompts are sorted by token length (longest first, so memory problems show at once) and batched with left
padding. Two engines give the same tokens:
- "fast" (default where the model supports it: a decoder whose `DynamicCache` holds plain full-attention layers,
  e.g. Llama, Mistral without sliding window, Qwen2, GPT-NeoX; `clha.fast_engine`): a loop over the model's forward
  with continuous batching. Up to `batch_size` prompts decode together; prompts are prefilled in groups of similar
  length (little padding is computed); when a quarter of the rows have finished (EOS or a stop string), they are
  dropped and the next prompts are prefilled into their places, so the batch stays full until the prompts run out.
  The KV cache is preallocated and written in place instead of being concatenated at every step;
- "hf": `model.generate` with a stopping criterion that ends a row at a stop string (decoding only the last few
  generated tokens of each row); a batch stops when every row has finished. Used for any other model, and for a
  model whose parameters are ZeRO-3 placeholders (DeepSpeed partitions them and gathers them inside each forward;
  `model.generate` keeps the ranks' forwards in step), which the fast engine does not handle.
Both engines look for a stop string only in a row whose new token writes a ':' (`StopTokens`): every stop string
ends with one, so at any other step the decoded tail cannot hold a new one, and nothing is decoded.
Results come back in input order. In float32 they do not depend on the batch size or the engine (up to
floating-point ties). In bf16 / fp16 they can: padding and batch composition change how the logits are rounded,
so an arg-max between two near-tied tokens can flip and the rest of that response differ. Compare generations of
different batch sizes or engines in float32 only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from clha.data.format import render_prompt
from clha.data.tokenize import encode_prompt
from clha.fast_engine import (PREFILL_MAX_PADDING, PREFILL_MAX_POSITIONS, Picker,  # noqa: F401 (re-exported)
                              _preallocated_layer_class, _prefill_groups, fast_engine_supported, greedy_pick,
                              has_placeholder_parameters, left_pad)
from clha.fast_engine import fast_generate as _fast_generate

# Where a response ends: the model starts writing the next turn itself.
STOP_PATTERN = re.compile(r"(human|assistant):", re.IGNORECASE)
# Longest stop string in characters; a token holds at least one byte, so this many tokens always cover one.
_TAIL_TOKENS = len("assistant:") + 6
# `progress=None` shows a progress bar when a call needs more than this many batches.
PROGRESS_MIN_BATCHES = 4
ENGINES = ("auto", "fast", "hf")


def cut_response(text: str) -> str:
    """Cut a generated text at the first "Human:" / "Assistant:" (any case) and strip white space."""
    match = STOP_PATTERN.search(text)
    if match is not None:
        text = text[:match.start()]
    return text.strip()


def _eos_ids(model, tokenizer) -> List[int]:
    ids: List[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        value = getattr(gen_cfg, "eos_token_id", None)
        candidates.extend(value if isinstance(value, (list, tuple)) else [value])
    for value in candidates:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


class StopTokens:
    """Which tokens can complete a stop string: those whose own text holds a ':' (every stop string ends with one).

    A stop string is new in a row's decoded tail only once a token that writes its ':' has been appended: text
    before that ':' is final by then, and sliding the tail window only drops text on the left. (A ':' in decoded text
    comes from the one token whose own decoding holds it, with byte-level BPE, SentencePiece and WordPiece
    tokenizers alike.) So rows whose new tokens hold no ':' are not decoded at all. A token's text is decoded the
    first time it is seen (special tokens as nothing, as the stop check reads them).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._colon = {}      # token id -> whether its decoded text holds a ':'

    def could_complete(self, token: int) -> bool:
        hit = self._colon.get(token)
        if hit is None:
            try:
                hit = ":" in self.tokenizer.decode([token], skip_special_tokens=True)
            except Exception:   # noqa: BLE001 - an id the tokenizer cannot decode: leave it to the exact check
                hit = True
            self._colon[token] = hit
        return hit

    def stopped(self, ids: Sequence[int]) -> bool:
        """`_stopped(tokenizer, ids)` for ids that grow by one token per call (the fast engine's stop check)."""
        return bool(ids) and self.could_complete(ids[-1]) and _stopped(self.tokenizer, ids)


class StopOnStrings:
    """A stopping criterion: a row is finished once its generated part contains "Human:" / "Assistant:".

    Only the last `_TAIL_TOKENS` generated tokens of unfinished rows are decoded, and only at a step whose new tokens
    could complete a stop string (`StopTokens`; else the tail cannot hold a new one); a finished row stays finished
    (generate pads it from then on). Duck-types `transformers.StoppingCriteria`.
    """

    def __init__(self, tokenizer, prompt_width: int, batch_size: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        self._finished = [False] * batch_size     # `done` as a list (read at every step without tensor indexing)
        self._stop_tokens = StopTokens(tokenizer)
        self._checked = 0            # generated tokens per row already looked at
        self._done_on = None         # `done` on the device of the ids (copied again when a row finishes)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width:]
        if new.shape[1] > 0:
            start = self._checked if self._checked < new.shape[1] else 0
            fresh = new[:, start:].tolist()            # one token per row at a generate step
            self._checked = new.shape[1]
            could = self._stop_tokens.could_complete
            for row, ids in enumerate(fresh):
                if self._finished[row] or not any(map(could, ids)):
                    continue
                if STOP_PATTERN.search(self.tokenizer.decode(new[row, -_TAIL_TOKENS:].tolist(),
                                                             skip_special_tokens=True)):
                    self.done[row] = self._finished[row] = True
                    self._done_on = None
        if self._done_on is None or self._done_on.device != input_ids.device:
            self._done_on = self.done.to(input_ids.device)
        return self._done_on.clone()


def _stopping_criteria(tokenizer, prompt_width: int, batch_size: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Criterion(StopOnStrings, StoppingCriteria):
        pass

    return StoppingCriteriaList([_Criterion(tokenizer, prompt_width, batch_size)])


@dataclass
class Generation:
    """One generated response and why generation ended for it.

    `stop`: "eos" (the model produced EOS), "stop_string" (it started a new "Human:"/"Assistant:" turn) or
    "length" (it used all `max_new_tokens` without either).
    """

    response: str
    stop: str


def generate_responses(model, tokenizer, prompts: Sequence[Sequence[str]], block_size: int = 512,
                       max_new_tokens: int = 128, batch_size: int = 8,
                       progress: Optional[bool] = None) -> List[str]:
    """Greedy responses to ranked-format prompts (lists of marker turns), in input order.

    Works on a plain Hugging Face causal LM or an accelerate-unwrapped one, with or without a pad token (eos
    pads then). The model is put in eval mode and every module's training flag is restored afterwards.
    """
    return [g.response for g in generate_with_details(model, tokenizer, prompts, block_size=block_size,
                                                      max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                      progress=progress)]


def encode_prompts(tokenizer, prompts: Sequence[Sequence[str]], block_size: int) -> List[List[int]]:
    encoded = []
    for i, turns in enumerate(prompts):
        if isinstance(turns, (str, bytes)):
            raise TypeError(f"prompt {i} is a string; a prompt is a list of marker turns ending with '<|assistant|>'")
        ids = encode_prompt(tokenizer, render_prompt(list(turns)), block_size)
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        encoded.append(ids)
    return encoded


def _finish(tokenizer, new_ids: Sequence[int], eos_ids: Sequence[int]) -> Generation:
    ids = list(new_ids)
    hit_eos = False
    for i, token in enumerate(ids):
        if token in eos_ids:
            ids, hit_eos = ids[:i], True
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if STOP_PATTERN.search(text):
        stop = "stop_string"
    else:
        stop = "eos" if hit_eos else "length"
    return Generation(cut_response(text), stop)


def generate_with_details(model, tokenizer, prompts: Sequence[Sequence[str]], block_size: int = 512,
                          max_new_tokens: int = 128, batch_size: int = 8, progress: Optional[bool] = None,
                          engine: str = "auto") -> List[Generation]:
    """`generate_responses`, also telling for each prompt why its generation ended (see `Generation`).

    `engine`: "auto" (the fast loop where the model supports it, else "hf"), "fast" or "hf" (see the module doc).
    """
    check_settings(engine, batch_size, max_new_tokens)
    prompts = list(prompts)
    if not prompts:
        return []
    return generate_from_ids(model, tokenizer, encode_prompts(tokenizer, prompts, block_size), max_new_tokens,
                             batch_size, progress, engine)


def check_settings(engine: str, batch_size: int, max_new_tokens: int) -> None:
    """ValueError for an unknown engine or a batch size / token limit below 1."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def generate_from_ids(model, tokenizer, encoded: List[List[int]], max_new_tokens: int, batch_size: int,
                      progress: Optional[bool], engine: str, pick: Optional[Picker] = None,
                      desc: str = "generate") -> List[Generation]:
    """Generations for already encoded prompts (`encode_prompts`), in input order.

    `pick(logits, rows)` chooses the next token of each row from its logits; `rows` are indices into `encoded`.
    None is greedy decoding (the arg-max; `clha.sampling` passes a seeded sampler).
    """
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        if not eos_ids:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        pad_id = eos_ids[0]

    # Longest first (a memory problem shows in the first batch); ties keep input order.
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    show = progress if progress is not None else len(batches) > PROGRESS_MIN_BATCHES
    device = _model_device(model)
    results: List[Optional[Generation]] = [None] * len(encoded)
    if engine == "auto":
        engine = "fast" if fast_engine_supported(model) else "hf"
    elif engine == "fast" and not fast_engine_supported(model):
        why = (" with ZeRO-3 placeholder parameters" if has_placeholder_parameters(model) else "")
        raise ValueError(f"the fast engine does not support {type(model).__name__}{why}; use engine='hf'")

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        from tqdm.auto import tqdm

        with torch.inference_mode(), tqdm(total=len(encoded), disable=not show, desc=desc, unit="prompt",
                                          leave=False) as bar:
            if engine == "fast":
                # the engine's rows are `order`; the picker is told the input indices
                fast_pick = greedy_pick if pick is None else (
                    lambda logits, rows: pick(logits, [order[r] for r in rows]))
                gens = _fast_generate(model, [encoded[i] for i in order], pad_id, eos_ids, max_new_tokens, device,
                                      batch_size, stopped=StopTokens(tokenizer).stopped, pick=fast_pick,
                                      on_finish=lambda: bar.update(1))
                for i, (ids, stop) in zip(order, gens):
                    results[i] = Generation(cut_response(tokenizer.decode(ids, skip_special_tokens=True)), stop)
            else:
                for idx in batches:
                    gens = _hf_batch(model, tokenizer, [encoded[i] for i in idx], pad_id, eos_ids, max_new_tokens,
                                     device, None if pick is None else _forced_pick_processor(pick, idx))
                    for i, gen in zip(idx, gens):
                        results[i] = gen
                    bar.update(len(idx))
    finally:
        for module, training in modes:
            module.training = training
    return results  # type: ignore[return-value]


def _stopped(tokenizer, ids: List[int]) -> bool:
    """Whether the last generated tokens of a row hold a stop string (only the tail is decoded)."""
    return bool(STOP_PATTERN.search(tokenizer.decode(ids[-_TAIL_TOKENS:], skip_special_tokens=True)))


# ------------------------------------------------------------------------------------------------ hf engine
def _hf_batch(model, tokenizer, rows: List[List[int]], pad_id: int, eos_ids: List[int], max_new_tokens: int,
              device, logits_processor=None) -> List[Generation]:
    input_ids, attention_mask = left_pad(rows, pad_id)
    width = input_ids.shape[1]
    extra = {} if logits_processor is None else {"logits_processor": logits_processor}
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
        no_repeat_ngram_size=0, use_cache=True, pad_token_id=pad_id, eos_token_id=eos_ids or None,
        stopping_criteria=_stopping_criteria(tokenizer, width, len(rows)), **extra)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return [_finish(tokenizer, ids, eos_ids) for ids in sequences[:, width:].cpu().tolist()]


def _forced_pick_processor(pick: Picker, rows: List[int]):
    """A logits processor that lets `pick` choose each row's next token and leaves only that token possible, so
    `generate`'s greedy step takes it (how the hf engine samples with the same per-row rule as the fast one)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _ForcedPick(LogitsProcessor):
        def __call__(self, input_ids, scores):
            tokens = pick(scores, rows).to(scores.device)
            forced = torch.full_like(scores, float("-inf"))
            forced.scatter_(1, tokens[:, None], 0.0)
            return forced

    return LogitsProcessorList([_ForcedPick()])


__all__ = ["generate_responses", "generate_with_details", "generate_from_ids", "encode_prompts", "check_settings",
           "Generation", "cut_response", "StopOnStrings", "StopTokens", "STOP_PATTERN", "fast_engine_supported",
           "ENGINES"]

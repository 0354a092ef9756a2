"""Greedy generation of responses for ranked-format prompts, as validation and evaluation need it.

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
  e.g. Llama, Mistral without sliding window, Qwen2, GPT-NeoX): a greedy loop over the model's forward with
  continuous batching. Up to `batch_size` prompts decode together; prompts are prefilled in groups of similar
  length (little padding is computed); when a quarter of the rows have finished (EOS or a stop string), they are
  dropped and the next prompts are prefilled into their places, so the batch stays full until the prompts run out.
  The KV cache is preallocated and written in place instead of being concatenated at every step;
- "hf": `model.generate` with a stopping criterion that ends a row at a stop string (decoding only the last few
  generated tokens of each row); a batch stops when every row has finished. Used for any other model, and for a
  model whose parameters are ZeRO-3 placeholders (DeepSpeed partitions them and gathers them inside each forward;
  `model.generate` keeps the ranks' forwards in step), which the fast engine does not handle.
Results come back in input order. In float32 they do not depend on the batch size or the engine (up to
floating-point ties). In bf16 / fp16 they can: padding and batch composition change how the logits are rounded,
so an arg-max between two near-tied tokens can flip and the rest of that response differ. Compare generations of
different batch sizes or engines in float32 only.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from clha.data.format import render_prompt
from clha.data.tokenize import encode_prompt

# Where a response ends: the model starts writing the next turn itself.
STOP_PATTERN = re.compile(r"(human|assistant):", re.IGNORECASE)
# Longest stop string in characters; a token holds at least one byte, so this many tokens always cover one.
_TAIL_TOKENS = len("assistant:") + 6
# `progress=None` shows a progress bar when a call needs more than this many batches.
PROGRESS_MIN_BATCHES = 4
# Fast engine: prompts of a batch are prefilled together while the padding this adds stays under this fraction of
# the group's positions, and a group holds at most this many positions.
PREFILL_MAX_PADDING = 0.10
PREFILL_MAX_POSITIONS = 8192
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


class StopOnStrings:
    """A stopping criterion: a row is finished once its generated part contains "Human:" / "Assistant:".

    Only the last `_TAIL_TOKENS` generated tokens of unfinished rows are decoded at each step; a finished row
    stays finished (generate pads it from then on). Duck-types `transformers.StoppingCriteria`.
    """

    def __init__(self, tokenizer, prompt_width: int, batch_size: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.done = torch.zeros(batch_size, dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width:]
        if new.shape[1] > 0:
            tail = new[:, -_TAIL_TOKENS:].tolist()
            for row, ids in enumerate(tail):
                if not self.done[row] and STOP_PATTERN.search(self.tokenizer.decode(ids, skip_special_tokens=True)):
                    self.done[row] = True
        return self.done.to(input_ids.device).clone()


def _stopping_criteria(tokenizer, prompt_width: int, batch_size: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Criterion(StopOnStrings, StoppingCriteria):
        pass

    return StoppingCriteriaList([_Criterion(tokenizer, prompt_width, batch_size)])


def _left_pad(rows: List[List[int]], pad_id: int):
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


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


def _encode_prompts(tokenizer, prompts: Sequence[Sequence[str]], block_size: int) -> List[List[int]]:
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
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = list(prompts)
    if not prompts:
        return []
    encoded = _encode_prompts(tokenizer, prompts, block_size)

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

        with torch.inference_mode(), tqdm(total=len(encoded), disable=not show, desc="generate", unit="prompt",
                                          leave=False) as bar:
            if engine == "fast":
                gens = _fast_generate(model, tokenizer, [encoded[i] for i in order], pad_id, eos_ids, max_new_tokens,
                                      device, batch_size, on_finish=lambda: bar.update(1))
                for i, gen in zip(order, gens):
                    results[i] = gen
            else:
                for idx in batches:
                    gens = _hf_batch(model, tokenizer, [encoded[i] for i in idx], pad_id, eos_ids, max_new_tokens,
                                     device)
                    for i, gen in zip(idx, gens):
                        results[i] = gen
                    bar.update(len(idx))
    finally:
        for module, training in modes:
            module.training = training
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ hf engine
def _hf_batch(model, tokenizer, rows: List[List[int]], pad_id: int, eos_ids: List[int], max_new_tokens: int,
              device) -> List[Generation]:
    input_ids, attention_mask = _left_pad(rows, pad_id)
    width = input_ids.shape[1]
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
        no_repeat_ngram_size=0, use_cache=True, pad_token_id=pad_id, eos_token_id=eos_ids or None,
        stopping_criteria=_stopping_criteria(tokenizer, width, len(rows)))
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return [_finish(tokenizer, ids, eos_ids) for ids in sequences[:, width:].cpu().tolist()]


# ---------------------------------------------------------------------------------------------- fast engine
def _forward_names(model) -> Optional[Tuple[str, bool]]:
    """(name of the cache argument, whether `logits_to_keep` is accepted), or None if forward lacks what we need."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if not {"input_ids", "attention_mask", "position_ids", "use_cache"} <= set(params):
        return None
    cache_arg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if cache_arg is None:
        return None
    return cache_arg, "logits_to_keep" in params


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def has_placeholder_parameters(model) -> bool:
    """Whether some parameter is a ZeRO-3 placeholder (DeepSpeed's `ds_numel` attribute, or an empty tensor standing
    in for a partitioned weight): the model's weights are not all on this rank."""
    return any(hasattr(p, "ds_numel") or p.numel() == 0 for p in model.parameters())


def fast_engine_supported(model) -> bool:
    """A decoder-only model whose KV cache is a list of plain, full-attention `DynamicLayer`s, with all its weights
    on this rank (not ZeRO-3 placeholders: then `model.generate` is used)."""
    if getattr(model.config, "is_encoder_decoder", False) or _forward_names(model) is None:
        return False
    if has_placeholder_parameters(model):
        return False
    try:
        from transformers.cache_utils import DynamicLayer

        cache = _new_cache(model)
    except Exception:   # older transformers, or a model whose config the cache cannot read
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values live in a buffer with room for the whole generation.

        `DynamicLayer.update` appends a decode step with `torch.cat`, copying the layer's whole cache at every step;
        on a CPU that copy costs about as much as the step's matrix products. Here a step writes one column in place
        and `keys` / `values` are views of the filled part. Dropping finished rows copies the filled part once.
        """

        def __init__(self, keys_buffer: torch.Tensor, values_buffer: torch.Tensor, length: int):
            """A layer over [batch, heads, capacity, head_dim] buffers whose first `length` columns are filled."""
            super().__init__()
            self.device = keys_buffer.device
            self.length = length
            self._k, self._v = keys_buffer, values_buffer
            self.is_initialized = True
            self._views()

        @staticmethod
        def _buffer(filled: torch.Tensor, capacity: int) -> torch.Tensor:
            batch, heads, length, dim = filled.shape
            buf = filled.new_empty((batch, heads, capacity, dim))
            buf[:, :, :length] = filled
            return buf

        def _views(self) -> None:
            self.keys = self._k[:, :, :self.length]
            self.values = self._v[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            new = key_states.shape[-2]
            if self.length + new > self._k.shape[-2]:          # more than planned: grow (not hit by _fast_generate)
                capacity = 2 * (self.length + new)
                self._k, self._v = self._buffer(self.keys, capacity), self._buffer(self.values, capacity)
            self._k[:, :, self.length:self.length + new] = key_states
            self._v[:, :, self.length:self.length + new] = value_states
            self.length += new
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            capacity = self._k.shape[-2]
            self._k = self._buffer(self.keys[indices], capacity)
            self._v = self._buffer(self.values[indices], capacity)
            self._views()

        def crop(self, tokens_to_remove: int) -> None:   # pragma: no cover - generation never crops
            raise NotImplementedError("PreallocatedLayer is only used by clha.generation's decode loop")

    return PreallocatedLayer


def _prefill_groups(lengths: List[int]) -> List[Tuple[int, int]]:
    """Split rows (sorted longest first) into [start, end) groups prefilled together with little padding."""
    groups, start = [], 0
    while start < len(lengths):
        end, longest, total = start + 1, lengths[start], lengths[start]
        while end < len(lengths):
            positions = longest * (end + 1 - start)
            if positions > PREFILL_MAX_POSITIONS or positions - (total + lengths[end]) > PREFILL_MAX_PADDING * positions:
                break
            total += lengths[end]
            end += 1
        groups.append((start, end))
        start = end
    return groups


def _prefill(model, rows: List[List[int]], pad_id: int, device, cache_arg: str, extra: dict):
    """Prefill rows (sorted longest first) in groups of similar length.

    Returns the first generated token of every row and, per group, (first row, number of rows, group width, cache);
    a group's rows are left-padded to its width."""
    first_logits, parts, done = [], [], 0
    for start, end in _prefill_groups([len(r) for r in rows]):
        ids, mask = _left_pad(rows[start:end], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        group_cache = _new_cache(model)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True, **{cache_arg: group_cache}, **extra)
        first_logits.append(out.logits[:, -1])
        parts.append((done, end - start, ids.shape[1], group_cache))
        done += end - start
    return torch.cat(first_logits).argmax(-1), parts


def _rebuild_cache(model, old_cache, old_width: int, keep: torch.Tensor, parts, width: int, capacity: int):
    """A cache of the kept rows of `old_cache` followed by the prefilled new rows, all right-aligned at `width`
    columns (a row's tokens are its last columns; the columns left of them are zeros and masked), with room for
    `capacity` columns. Columns no remaining row uses are dropped, so the width follows the live rows."""
    layer_class = _preallocated_layer_class()
    n_keep = int(keep.numel())
    n_new = sum(n for _, n, _, _ in parts)
    cache = _new_cache(model)
    for i in range(len(cache.layers)):
        tensors = []
        for kind in ("keys", "values"):
            ref = getattr(old_cache.layers[i], kind) if n_keep else getattr(parts[0][3].layers[i], kind)
            buf = ref.new_zeros((n_keep + n_new, ref.shape[1], capacity, ref.shape[3]))
            if n_keep:
                span = min(width, old_width)
                buf[:n_keep, :, width - span:width] = getattr(old_cache.layers[i], kind)[keep, :, old_width - span:]
            for first, n, group_width, group_cache in parts:
                rows = slice(n_keep + first, n_keep + first + n)
                buf[rows, :, width - group_width:width] = getattr(group_cache.layers[i], kind)
            tensors.append(buf)
        cache.layers[i] = layer_class(tensors[0], tensors[1], width)
    return cache


def _fast_generate(model, tokenizer, rows: List[List[int]], pad_id: int, eos_ids: List[int], max_new_tokens: int,
                   device, batch_size: int, on_finish=None) -> List[Generation]:
    """Greedy generation with continuous batching over `rows` (prompt ids, sorted longest first).

    Up to `batch_size` rows decode together. A finished row stays in the batch (its slot computes on, ignored) until
    a quarter of the slots are free; then, in one copy of the cache, finished rows are dropped and the next prompts
    are prefilled into the free slots. The batch stays full until the prompts run out, which matters on a CPU, where a
    decode step streams every weight from memory whether it serves 5 rows or 50.
    """
    cache_arg, has_keep = _forward_names(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    refill_at = max(1, batch_size // 4)
    results: List[Optional[Generation]] = [None] * len(rows)
    generated: List[List[int]] = [[] for _ in rows]

    slot_row: List[int] = []          # input row held by each cache row
    slot_live: List[bool] = []
    cache, width, pending = None, 0, 0
    filled = positions = next_tokens = None   # per slot: cache columns used, next position id, token to consume

    def finish(slot: int, stop: str) -> None:
        row = slot_row[slot]
        slot_live[slot] = False
        results[row] = Generation(cut_response(tokenizer.decode(generated[row], skip_special_tokens=True)), stop)
        if on_finish is not None:
            on_finish()

    while True:
        live = sum(slot_live)
        refill = pending < len(rows) and batch_size - live >= min(refill_at, len(rows) - pending)
        # Once every prompt has started, finished slots are dropped when they are at least half the batch.
        compact = pending >= len(rows) and 0 < live <= len(slot_live) - live
        if refill or compact:
            # Drop finished slots and prefill the next prompts into the free ones, in one copy of the cache.
            keep = [j for j, alive in enumerate(slot_live) if alive]
            new = list(range(pending, min(len(rows), pending + batch_size - live)))
            pending += len(new)
            if new:
                first, parts = _prefill(model, [rows[r] for r in new], pad_id, device, cache_arg, extra)
            else:
                first, parts = next_tokens[:0], []
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            new_len = torch.tensor([len(rows[r]) for r in new], dtype=torch.long, device=device)
            kept_filled = filled[keep_t] if keep else new_len[:0]
            new_width = max(int(kept_filled.max()) if keep else 0, int(new_len.max()) if new else 0)
            cache = _rebuild_cache(model, cache, width, keep_t, parts, new_width, new_width + max_new_tokens)
            width = new_width
            filled = torch.cat([kept_filled, new_len])
            positions = torch.cat([positions[keep_t] if keep else new_len[:0], new_len])
            next_tokens = torch.cat([next_tokens[keep_t] if keep else first[:0], first])
            slot_row = [slot_row[j] for j in keep] + new
            slot_live = [True] * len(slot_row)

        # Consume the token each live slot has just produced.
        for j, token in enumerate(next_tokens.tolist()):
            if not slot_live[j]:
                continue
            row = slot_row[j]
            if token in eos_ids:
                finish(j, "eos")
                continue
            generated[row].append(token)
            if STOP_PATTERN.search(tokenizer.decode(generated[row][-_TAIL_TOKENS:], skip_special_tokens=True)):
                finish(j, "stop_string")
            elif len(generated[row]) >= max_new_tokens:
                finish(j, "length")
        if not any(slot_live):
            if pending >= len(rows):
                break
            continue

        # One decode step for every slot; finished slots keep their position and compute on, unused.
        live_t = torch.tensor(slot_live, device=device)
        mask = torch.arange(width + 1, device=device)[None, :] >= (width - filled)[:, None]
        out = model(input_ids=next_tokens[:, None], attention_mask=mask.long(), position_ids=positions[:, None],
                    use_cache=True, **{cache_arg: cache}, **extra)
        next_tokens = out.logits[:, -1].argmax(-1)
        width += 1
        filled = filled + 1
        positions = positions + live_t.long()
    return results  # type: ignore[return-value]


__all__ = ["generate_responses", "generate_with_details", "Generation", "cut_response", "StopOnStrings",
           "STOP_PATTERN", "fast_engine_supported", "ENGINES"]

"""The fast decode loop behind `clha.generation`: continuous batching over a preallocated KV cache.

The engine works on token ids only; `clha.generation` encodes the prompts, says when a row has written a stop
string, picks each next token from the logits (greedy arg-max, or a seeded sample, see `clha.sampling`) and turns
the ids into text. What it does (see also the module doc of `clha.generation`):
- up to `batch_size` rows decode together; prompts are prefilled in groups of similar length (little padding is
  computed);
- when a quarter of the rows have finished (EOS, a stop string or the token limit), they are dropped and the next
  prompts are prefilled into their places, so the batch stays full until the prompts run out;
- the KV cache is preallocated and written in place instead of being concatenated at every step;
- a decode step does little besides the model's forward: the attention mask of every step until the next refill is
  a slice of one tensor built at the refill, positions advance by a per-slot tensor kept on the device, and the new
  tokens are the one thing copied to the host (for EOS, the stop-string check and the results).

Supported models: a decoder whose `DynamicCache` holds plain full-attention layers (Llama, Mistral without sliding
window, Qwen2, GPT-NeoX, GPT-2 ...), with all its weights on this rank (`fast_engine_supported`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, List, Optional, Sequence, Tuple

import torch

# Prompts of a batch are prefilled together while the padding this adds stays under this fraction of the group's
# positions, and a group holds at most this many positions.
PREFILL_MAX_PADDING = 0.10
PREFILL_MAX_POSITIONS = 8192

# pick(logits [rows, vocab], row indices) -> next token ids [rows]: how the next token is chosen.
Picker = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def greedy_pick(logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The arg-max token of every row (the greedy rule)."""
    return logits.argmax(-1)


def left_pad(rows: List[List[int]], pad_id: int):
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask



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
            # narrow: a view like [:, :, :length] without parsing an index tuple (this runs per layer and step)
            self.keys = self._k.narrow(2, 0, self.length)
            self.values = self._v.narrow(2, 0, self.length)

        def update(self, key_states, value_states, *args, **kwargs):
            new = key_states.shape[-2]
            if self.length + new > self._k.shape[-2]:          # more than planned: grow (not hit by _fast_generate)
                capacity = 2 * (self.length + new)
                self._k, self._v = self._buffer(self.keys, capacity), self._buffer(self.values, capacity)
            self._k.narrow(2, self.length, new).copy_(key_states)
            self._v.narrow(2, self.length, new).copy_(value_states)
            self.length += new
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            capacity = self._k.shape[-2]
            self._k = self._buffer(self.keys[indices], capacity)
            self._v = self._buffer(self.values[indices], capacity)
            self._views()

        def crop(self, tokens_to_remove: int) -> None:   # pragma: no cover - generation never crops
            raise NotImplementedError("PreallocatedLayer is only used by clha.fast_engine's decode loop")

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


def _prefill(model, rows: List[List[int]], pad_id: int, device, cache_arg: str, extra: dict,
             pick: Picker = greedy_pick, row_ids: Optional[Sequence[int]] = None):
    """Prefill rows (sorted longest first) in groups of similar length.

    Returns the first generated token of every row (chosen by `pick`; `row_ids` are the rows' indices in the
    engine's row list) and, per group, (first row, number of rows, group width, cache); a group's rows are
    left-padded to its width."""
    first_logits, parts, done = [], [], 0
    for start, end in _prefill_groups([len(r) for r in rows]):
        ids, mask = left_pad(rows[start:end], pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        group_cache = _new_cache(model)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True, **{cache_arg: group_cache}, **extra)
        first_logits.append(out.logits[:, -1])
        parts.append((done, end - start, ids.shape[1], group_cache))
        done += end - start
    row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    return pick(torch.cat(first_logits), row_ids), parts


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


def fast_generate(model, rows: List[List[int]], pad_id: int, eos_ids: Sequence[int], max_new_tokens: int,
                  device, batch_size: int, stopped: Callable[[List[int]], bool], pick: Picker = greedy_pick,
                  on_finish=None) -> List[Tuple[List[int], str]]:
    """Generation with continuous batching over `rows` (prompt ids, sorted longest first).

    Returns, per row, its generated ids (without the EOS) and why it ended: "eos", "stop_string" (`stopped(ids)` said
    so after the last token) or "length" (`max_new_tokens` tokens). `pick(logits, row indices)` chooses each next
    token (default: greedy). Up to `batch_size` rows decode together. A finished row stays in the batch (its slot
    computes on, ignored) until a quarter of the slots are free; then, in one copy of the cache, finished rows are
    dropped and the next prompts are prefilled into the free slots. The batch stays full until the prompts run out,
    which matters on a CPU, where a decode step streams every weight from memory whether it serves 5 rows or 50.
    """
    cache_arg, has_keep = _forward_names(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    refill_at = max(1, batch_size // 4)
    results: List[Optional[Tuple[List[int], str]]] = [None] * len(rows)
    generated: List[List[int]] = [[] for _ in rows]

    slot_row: List[int] = []          # input row held by each cache row
    slot_live: List[bool] = []
    cache, width, pending = None, 0, 0
    filled: List[int] = []            # per slot: cache columns used at the last rebuild (+ `steps` since)
    steps = 0                         # decode steps since the last rebuild
    positions = next_tokens = None    # per slot (on the device): next position id, token to consume
    advance = mask = None             # per slot: 1 while live (added to its position), attention mask columns

    def finish(slot: int, stop: str) -> None:
        row = slot_row[slot]
        slot_live[slot] = False
        advance[slot] = 0             # its position stays; a write on the device, no copy from the host
        results[row] = (generated[row], stop)
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
                first, parts = _prefill(model, [rows[r] for r in new], pad_id, device, cache_arg, extra, pick, new)
            else:
                first, parts = next_tokens[:0], []
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            new_len = [len(rows[r]) for r in new]
            filled = [filled[j] + steps for j in keep] + new_len
            new_width = max(filled)
            capacity = new_width + max_new_tokens
            cache = _rebuild_cache(model, cache, width, keep_t, parts, new_width, capacity)
            width, steps = new_width, 0
            filled_t = torch.tensor(filled, dtype=torch.long, device=device)
            new_len_t = filled_t[len(keep):]
            positions = torch.cat([positions[keep_t] if keep else new_len_t[:0], new_len_t])
            next_tokens = torch.cat([next_tokens[keep_t] if keep else first[:0], first])
            slot_row = [slot_row[j] for j in keep] + new
            slot_live = [True] * len(slot_row)
            advance = torch.ones(len(slot_row), dtype=torch.long, device=device)
            # A slot's tokens are its last `filled` columns at `width`, and every later column (one per step, for
            # every slot, live or not) holds a token: the mask of each step until the next rebuild is a prefix.
            mask = (torch.arange(capacity + 1, device=device)[None, :] >= (width - filled_t)[:, None]).long()

        # Consume the token each live slot has just produced (the one copy to the host of a step).
        for j, token in enumerate(next_tokens.tolist()):
            if not slot_live[j]:
                continue
            row = slot_row[j]
            if token in eos_ids:
                finish(j, "eos")
                continue
            generated[row].append(token)
            if stopped(generated[row]):
                finish(j, "stop_string")
            elif len(generated[row]) >= max_new_tokens:
                finish(j, "length")
        if not any(slot_live):
            if pending >= len(rows):
                break
            continue

        # One decode step for every slot; finished slots keep their position and compute on, unused.
        if width + 1 > mask.shape[1]:       # more steps than planned (not hit: a row ends within max_new_tokens)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], width + 1 - mask.shape[1]))], dim=1)
        out = model(input_ids=next_tokens[:, None], attention_mask=mask[:, :width + 1],
                    position_ids=positions[:, None], use_cache=True, **{cache_arg: cache}, **extra)
        next_tokens = pick(out.logits[:, -1], slot_row)
        width += 1
        steps += 1
        positions = positions + advance
    return results  # type: ignore[return-value]


__all__ = ["fast_generate", "fast_engine_supported", "has_placeholder_parameters", "greedy_pick", "left_pad",
           "Picker", "PREFILL_MAX_PADDING", "PREFILL_MAX_POSITIONS"]

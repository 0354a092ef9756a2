"""Score all B x n candidates of a batch in ONE forward pass of the policy.

``score_candidates(model, batch)`` takes a batch of ``clha.collate.RankedCollator`` and returns the summed and
mean log-probabilities of every candidate's response tokens (prompt and padding never count).

What makes it cheap (see ``bench/train_step.py`` for the measured gains):

- one call ``model(...)`` for all candidates (works unchanged when ``model`` is wrapped by accelerate's DDP or a
  DeepSpeed engine: the wrapper's own forward is called, never a submodule);
- layout ``shared_prompt``: each prompt is run once for its n responses (explicit ``position_ids`` from the
  collator; the attention pattern is built here from the collator's per-token segment tensors, see below);
- ``logits_to_keep=<positions>``: the model's output projection runs only at the positions that predict a response
  token (a fifth of a small model's FLOPs, and the largest activation);
- the token log-probabilities ``logit[target] - logsumexp(logits)`` come from a small autograd function that
  never materialises a ``log_softmax`` tensor: besides the logits themselves it keeps one float per position
  (the logsumexp, computed in row chunks), and its backward writes ``onehot - softmax`` straight into a single
  gradient buffer. (Measured: no speed difference from log_softmax + gather at SmolLM2-135M size; it saves the
  transient full-vocabulary tensors of log_softmax's backward.)
- ``logprob_head="chunked"`` (the training option ``--logprob_head chunked``) moves the output layer itself into
  such a function (``head_token_logprobs``): the model's forward returns its final hidden states (its output
  embeddings are swapped for a pass-through during that one call) and the logits exist one chunk of rows at a
  time, in forward and again, recomputed, in backward: no [M, V] logits and no [M, V] gradient, for one more
  output-layer matmul per step (see ``check_chunked_head`` for the models it refuses).

Packed attention. The shared-prompt pattern (each response token sees its own prompt and the earlier tokens of
its own response; examples never see each other) travels as three [rows, T] integer tensors and is built on the
model's device, once per batch, in the form the attention implementation takes (``packed_attention_mask``):

- ``flex_attention`` (CUDA; ``resolve_attn_implementation("auto")`` picks it there): a FlexAttention
  ``BlockMask`` whose ``mask_mod`` reads the segment tensors; fully masked 128 x 128 tiles are skipped and no
  T x T tensor exists at any point. Memory per row at T = 2k / 8k tokens: the two int64 segment tensors its
  mask_mod reads, 32 / 128 KiB, plus int32 block tables of (T / 128)^2 entries, 4.3 / 65 KiB.
- ``sdpa`` / ``eager`` (the fallback, and the CPU path): one additive [rows, 1, T, T] float mask in the dtype of
  the scores (bf16 under autocast), shared by all layers: 8 MiB / 128 MiB per row at T = 2k / 8k in bf16. The
  boolean 4D mask the collator used to build on the CPU (4 / 64 MiB per row, moved to the device every step) was
  converted by sdpa into such a float bias in EVERY layer and each copy kept for backward: 32 layers x 8 MiB =
  256 MiB at T = 2k, 4 GiB at T = 8k, per row. ``eager`` attention materialises the scores of every layer anyway.

torch has no FlexAttention backward on the CPU: a flex model scores under ``torch.no_grad()`` there, and
training on the CPU uses sdpa.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from clha.collate import shared_prompt_allowed, to_padded_batch

__all__ = ["CandidateScores", "score_candidates", "token_logprobs", "head_token_logprobs", "check_chunked_head",
           "head_chunk_rows", "LOGPROB_HEADS", "supports_shared_prompt", "choose_layout",
           "check_shared_prompt", "packed_attention_mask", "shared_prompt_block_mask", "additive_shared_prompt_mask",
           "resolve_attn_implementation", "set_attn_implementation", "attn_implementation_as", "unwrap_model",
           "SHARED_PROMPT_MODEL_TYPES", "ATTN_IMPLEMENTATIONS"]

# Model types whose forward honours a user 4D mask (FlexAttention: a BlockMask) and explicit position_ids exactly
# (checked by tests/test_modeling.py against separate per-candidate passes; flex_attention needs a class with
# transformers' ``_supports_flex_attn``: Llama and GPT-NeoX, not GPT-2).
SHARED_PROMPT_MODEL_TYPES = {"llama", "gpt2", "gpt_neox"}
# Attention implementations that can run the shared-prompt layout: a 4D mask (sdpa, eager) or a FlexAttention
# BlockMask (flex_attention). Flash-attention kernels take neither.
SHARED_PROMPT_ATTENTION = ("sdpa", "eager", "flex_attention")
# Choices of the training option --attn_implementation ("auto": see resolve_attn_implementation).
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention")
FLEX_BLOCK_SIZE = 128            # torch's default sparse block size of a BlockMask
MASK_ALIGN = 16                  # elements; the row stride of an additive mask the CUDA sdpa kernels take as is
MASK_CHUNK_BYTES = 1 << 24       # boolean temporaries of one query chunk while a mask is built
MASK_CACHE_KEY = "_packed_attention_mask"
LSE_CHUNK_ROWS = 256
# Choices of the training option --logprob_head (see score_candidates).
LOGPROB_HEADS = ("logits", "chunked")
HEAD_CHUNK_BYTES = 1 << 24                 # float32 logits per chunk of head_token_logprobs on the CPU
HEAD_CHUNK_BYTES_ACCELERATOR = 1 << 28     # ... and on a GPU
# Config fields by which a model's forward changes the logits after its output layer, with their neutral values
# (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, ...):
# the chunked head refuses such a model.
LOGIT_TRANSFORM_FIELDS = {"final_logit_softcapping": (None,), "logit_scale": (None, 1, 1.0),
                          "logits_scaling": (None, 1, 1.0), "output_multiplier": (None, 1, 1.0),
                          "lm_head_multiplier": (None, 1, 1.0), "unpadded_vocab_size": (None,)}
PRE_HEAD_LOGITS_SCALING = {"minicpm3"}     # its logits_scaling divides the hidden states before the output layer


@dataclass
class CandidateScores:
    sum_logps: Tensor      # [B, n] summed log-probs of the response tokens
    mean_logps: Tensor     # [B, n] sum / token_counts (0 for a candidate without a scored token)
    token_counts: Tensor   # [B, n] number of response tokens scored


def unwrap_model(model):
    """The Hugging Face model inside DDP / DeepSpeed / torch.compile wrappers (for inspection only)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    return model


def _attention_implementation(model) -> str:
    config = getattr(unwrap_model(model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def supports_shared_prompt(model, strict: bool = True) -> bool:
    """Whether ``model`` can run the shared-prompt layout: an attention implementation that takes a 4D mask or a
    FlexAttention block mask and (strict) a model type known to honour it and position_ids."""
    if _attention_implementation(model) not in SHARED_PROMPT_ATTENTION:
        return False
    if not strict:
        return True
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    return model_type in SHARED_PROMPT_MODEL_TYPES


def choose_layout(model) -> str:
    return "shared_prompt" if supports_shared_prompt(model) else "padded"


def check_shared_prompt(model) -> None:
    """Raise when ``model``'s attention cannot run the shared-prompt layout at all; warn when its model type is
    not one verified to honour the mask and position_ids."""
    impl = _attention_implementation(model)
    if impl not in SHARED_PROMPT_ATTENTION:
        raise ValueError(f"the shared_prompt layout needs sdpa, eager or flex_attention attention (the model uses "
                         f"{impl!r}); use layout 'padded' or 'auto'")
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if model_type not in SHARED_PROMPT_MODEL_TYPES:
        warnings.warn(f"shared_prompt layout on model type {model_type!r}, which is not verified to honour a 4D "
                      f"attention mask and position_ids (verified: {sorted(SHARED_PROMPT_MODEL_TYPES)})",
                      stacklevel=3)


def resolve_attn_implementation(requested: str, model=None) -> str:
    """The attention implementation to load a policy with. "auto": flex_attention on CUDA when torch has
    FlexAttention and the model class supports it (``model``, when given, is checked), else sdpa."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    if not (torch.cuda.is_available() and _flex_available()):
        return "sdpa"
    if model is not None and not getattr(unwrap_model(model), "_supports_flex_attn", False):
        return "sdpa"
    return "flex_attention"


def set_attn_implementation(model, requested: str = "auto") -> str:
    """Switch a loaded Hugging Face model to ``requested`` ("auto", "sdpa", "eager", "flex_attention"; see
    ``resolve_attn_implementation``) and return the implementation in use. An explicit choice the model cannot
    take raises ``clha.errors.InputError`` naming the ``attn_implementation`` field."""
    from clha.errors import InputError

    inner = unwrap_model(model)
    try:
        impl = resolve_attn_implementation(requested, inner)
    except ValueError as err:
        raise InputError(str(err), field="attn_implementation") from None
    if _attention_implementation(inner) != impl:
        try:
            inner.set_attn_implementation(impl)
        except (ValueError, ImportError, AttributeError) as err:
            if requested != "auto":
                raise InputError(f"the model cannot use {impl!r} attention: {err}", field="attn_implementation") \
                    from None
    return _attention_implementation(inner)


@contextlib.contextmanager
def attn_implementation_as(model, impl: str):
    """Run a block with ``model`` switched to attention implementation ``impl`` (e.g. sdpa for KV-cache generation
    by a model that trains with flex_attention), switched back afterwards."""
    inner = unwrap_model(model)
    before = _attention_implementation(inner)
    if before != impl:
        inner.set_attn_implementation(impl)
    try:
        yield model
    finally:
        if before != impl:
            inner.set_attn_implementation(before)


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _accepts_logits_to_keep(model) -> bool:
    inner = unwrap_model(model)
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _model_dtype(model) -> torch.dtype:
    for p in unwrap_model(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _compute_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype attention scores have inside the model's forward: the autocast dtype when autocast is on (a
    ``torch.autocast`` around the call, or accelerate's mixed-precision wrapper of the forward), else the weights'.
    A mask in any other dtype is cast by autocast / sdpa in EVERY layer, and each copy is kept for backward."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    if getattr(unwrap_model(model), "_original_forward", None) is not None:   # accelerate's autocast wrapper
        try:
            from accelerate.state import AcceleratorState
            precision = AcceleratorState().mixed_precision
        except Exception:   # noqa: BLE001 - no accelerate state: no autocast either
            precision = None
        if precision in ("bf16", "fp16"):
            return torch.bfloat16 if precision == "bf16" else torch.float16
    return _model_dtype(model)


def _resolve_layout(model, batch: Dict[str, Any]) -> Dict[str, Any]:
    if batch["layout"] != "shared_prompt" or supports_shared_prompt(model):
        return batch
    if batch.get("layout_requested", "shared_prompt") == "auto":
        warnings.warn("layout 'auto' resolved per batch: this batch is copied to the CPU and re-collated in the "
                      "padded layout; build RankedCollator(..., model=model) to choose the layout once",
                      stacklevel=3)
        return to_padded_batch(batch)
    check_shared_prompt(model)
    return batch


# ----------------------------------------------------------------------------------------------- packed attention

def _allowed_rows(sequence_ids: Tensor, branch_ids: Tensor, start: int, stop: int, length: int) -> Tensor:
    """``shared_prompt_allowed`` for queries start..stop-1 against every key: bool [rows, stop - start, keys].
    Positions >= ``length`` (block padding) neither attend nor are attended."""
    idx = torch.arange(sequence_ids.shape[1], device=sequence_ids.device)
    q = idx[start:stop]
    allowed = shared_prompt_allowed(sequence_ids[:, start:stop, None], sequence_ids[:, None, :],
                                    branch_ids[:, start:stop, None], branch_ids[:, None, :], q[:, None], idx[None, :])
    if stop > length or sequence_ids.shape[1] > length:
        allowed &= (q < length)[:, None] & (idx < length)[None, :]
    return allowed


def _query_chunk(rows: int, keys: int, multiple: int = 1) -> int:
    """Query rows per chunk so that a chunk's boolean [rows, chunk, keys] block stays near MASK_CHUNK_BYTES."""
    chunk = max(1, MASK_CHUNK_BYTES // max(1, rows * keys))
    return max(multiple, chunk // multiple * multiple)


def additive_shared_prompt_mask(sequence_ids: Tensor, branch_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The shared-prompt pattern as the additive float mask sdpa and eager attention add to the scores: [rows, 1, T,
    T] in ``dtype``, 0 where a query may attend, ``finfo(dtype).min`` elsewhere, built on the segment tensors'
    device in query chunks (no T x T boolean temporaries). Its storage rows are padded to a multiple of
    MASK_ALIGN elements: CUDA's memory-efficient kernel would otherwise pad (copy) the mask in every layer."""
    R, T = sequence_ids.shape
    width = -(-T // MASK_ALIGN) * MASK_ALIGN
    storage = torch.full((R, 1, T, width), torch.finfo(dtype).min, dtype=dtype, device=sequence_ids.device)
    mask = storage[..., :T]
    chunk = _query_chunk(R, T)
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        mask[:, 0, start:stop].masked_fill_(_allowed_rows(sequence_ids, branch_ids, start, stop, T), 0.0)
    return mask


def shared_prompt_block_mask(sequence_ids: Tensor, branch_ids: Tensor, block_size: int = FLEX_BLOCK_SIZE):
    """The shared-prompt pattern as a FlexAttention ``BlockMask`` (B = rows, one head-broadcast mask, Q = KV = T),
    built on the segment tensors' device without compiling and without a T x T tensor: the block tables are
    reduced from query chunks of ``block_size`` multiples; the ``mask_mod`` reads the segment tensors (padded with
    -1 to whole blocks, so no kernel index leaves them). Memory: the segment tensors (rows x T) plus four int32
    block tables of rows x (T / block_size)^2 entries."""
    from torch.nn.attention.flex_attention import BlockMask

    R, T = sequence_ids.shape
    blocks = -(-T // block_size)
    padded = blocks * block_size
    seq = torch.nn.functional.pad(sequence_ids, (0, padded - T), value=-1).contiguous()
    branch = torch.nn.functional.pad(branch_ids, (0, padded - T), value=-1).contiguous()
    partial = torch.zeros(R, blocks, blocks, dtype=torch.int32, device=seq.device)
    full = torch.zeros_like(partial)
    chunk = _query_chunk(R, padded, block_size)
    whole = block_size * block_size
    for start in range(0, padded, chunk):
        stop = min(padded, start + chunk)
        allowed = _allowed_rows(seq, branch, start, stop, T)
        count = allowed.view(R, (stop - start) // block_size, block_size, blocks, block_size).sum(dim=(2, 4))
        partial[:, start // block_size:stop // block_size] = ((count > 0) & (count < whole)).int()
        full[:, start // block_size:stop // block_size] = (count == whole).int()

    def ordered(dense: Tensor):
        # torch's own layout (flex_attention._dense_to_ordered): per query block, the number of kv blocks and
        # their indices first
        dense = dense[:, None]
        return (dense.sum(-1).to(torch.int32).contiguous(),
                torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32).contiguous())

    def mask_mod(b, h, q_idx, kv_idx):
        return shared_prompt_allowed(seq[b, q_idx], seq[b, kv_idx], branch[b, q_idx], branch[b, kv_idx], q_idx,
                                     kv_idx)

    kv_num, kv_indices = ordered(partial)
    full_num, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


def packed_attention_mask(model, batch: Dict[str, Any]):
    """The shared-prompt attention pattern of ``batch`` in the form ``model``'s attention implementation takes,
    built from the batch's segment tensors on THEIR device (move the batch first), once per batch: the result is
    cached in the batch (key ``"_packed_attention_mask"``) and reused while implementation, dtype and segment
    tensors are the same.

    flex_attention -> ``shared_prompt_block_mask`` (a BlockMask; transformers passes a 4D BlockMask through to
    its FlexAttention kernel untouched); sdpa, eager -> ``additive_shared_prompt_mask`` in the dtype the scores
    have inside the forward (``_compute_dtype``). A boolean mask would be converted to such a float bias inside
    every sdpa call, i.e. in every layer, and each copy kept for backward; the additive mask is one tensor that
    all layers share."""
    impl = _attention_implementation(model)
    seq, branch = batch["sequence_ids"], batch["branch_ids"]
    dtype = None if impl == "flex_attention" else _compute_dtype(model, seq.device)
    key = (impl, dtype, seq.device, id(seq), id(branch))
    cached = batch.get(MASK_CACHE_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    if impl == "flex_attention":
        mask = shared_prompt_block_mask(seq, branch)
    else:
        mask = additive_shared_prompt_mask(seq, branch, dtype)
    batch[MASK_CACHE_KEY] = (key, mask)
    return mask


def _logit_grad_chunk(logits: Tensor, lse: Tensor, row_weight: Tensor, rows: Tensor, ids: Tensor,
                      grad_out: Tensor, start: int, onehot: bool = True, overwrite: bool = False) -> Tensor:
    """The gradient of ``sum_i grad_out[i] * logprob_i`` w.r.t. the logits rows start..start + len(logits) - 1, in
    the accumulation dtype of ``lse`` (float32 at least): ``-row_weight[r] * softmax(logits[r])`` plus, with
    ``onehot``, ``grad_out[i]`` at (rows[i], ids[i]) for every target i of the chunk. ``lse`` and ``row_weight``
    (the summed upstream gradient of each row) are the chunk's slices; ``rows``, ``ids`` and ``grad_out`` are
    whole. No host synchronisation: targets outside the chunk go to its first row with weight 0. ``overwrite``:
    ``logits`` is a temporary that may hold the result (no second chunk-sized buffer)."""
    soft = logits.to(lse.dtype)
    soft = soft.sub_(lse[:, None]) if (overwrite or soft is not logits) else soft - lse[:, None]
    soft.exp_()                                                             # softmax rows of this chunk
    soft.mul_(-row_weight[:, None])
    if onehot:
        local = rows - start
        inside = (local >= 0) & (local < soft.shape[0])
        soft.index_put_((torch.where(inside, local, 0), ids), torch.where(inside, grad_out, 0.0), accumulate=True)
    return soft


class _TokenLogProb(torch.autograd.Function):
    """out[i] = logits[rows[i], ids[i]] - logsumexp(logits[rows[i], :]) without a [M, V] log_softmax tensor."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, ids: Tensor, chunk: int):
        M = logits.shape[0]
        acc = torch.promote_types(logits.dtype, torch.float32)      # float32, or float64 for a float64 model
        lse = torch.empty(M, dtype=acc, device=logits.device)
        for start in range(0, M, chunk):
            lse[start:start + chunk] = torch.logsumexp(logits[start:start + chunk].to(acc), dim=-1)
        out = logits[rows, ids].to(acc) - lse[rows]
        ctx.save_for_backward(logits, lse, rows, ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """grad[r, v] = sum_{i: rows[i] = r} grad_out[i] * (1[v = ids[i]] - softmax(logits[r])[v]).

        Every chunk of rows is formed in the accumulation dtype (float32 at least), one-hot term included, and
        only then rounded to the logits' dtype: in bfloat16, adding the one-hot after rounding would turn
        ``1 - p`` of a confident token into 0 (p = 0.99994) or into a 7% error (p = 0.985), and rows would no
        longer sum to zero. No host synchronisation: targets outside a chunk are sent to its first row with
        weight 0.
        """
        logits, lse, rows, ids = ctx.saved_tensors
        grad_out = grad_out.to(lse.dtype)
        row_weight = torch.zeros_like(lse).index_add_(0, rows, grad_out)      # sum of upstream grads per row
        grad = torch.empty_like(logits)
        exact = logits.dtype == lse.dtype          # float32/float64 logits: no rounding between the two terms
        for start in range(0, logits.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            grad[sl] = _logit_grad_chunk(logits[sl], lse[sl], row_weight[sl], rows, ids, grad_out, start,
                                         onehot=not exact)
        if exact:
            grad.index_put_((rows, ids), grad_out, accumulate=True)
        return grad, None, None, None


def token_logprobs(logits: Tensor, rows: Tensor, ids: Tensor, chunk_rows: int = LSE_CHUNK_ROWS) -> Tensor:
    """log softmax(logits[rows[i]])[ids[i]] for each i (float32 at least). ``logits`` is [M, V]."""
    return _TokenLogProb.apply(logits, rows, ids, chunk_rows)


class _HeadTokenLogProb(torch.autograd.Function):
    """out[i] = (hidden @ weight.T + bias)[rows[i], ids[i]] - logsumexp of that row, computed in row chunks: at no
    time does more than one chunk of logits exist. Forward keeps hidden, the per-row logsumexp, rows and ids (weight
    and bias by reference); backward recomputes each chunk's logits, forms their gradient as ``_TokenLogProb``
    does (``_logit_grad_chunk``) and multiplies it out into the gradients of hidden, weight and bias.

    ``dtype``: the dtype the head's matmul runs in (the autocast dtype under mixed precision, as ``nn.Linear``
    would run there); inputs are cast to it explicitly, in backward too (where autocast is not active)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias, rows: Tensor, ids: Tensor, chunk: int,
                dtype: torch.dtype):
        M = hidden.shape[0]
        acc = torch.promote_types(dtype, torch.float32)            # float32, or float64 for a float64 model
        lse = torch.empty(M, dtype=acc, device=hidden.device)
        target = torch.zeros(rows.shape[0], dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, M, chunk):
                logits = torch.nn.functional.linear(hidden[start:start + chunk].to(dtype), w, b)
                lse[start:start + chunk] = torch.logsumexp(logits.to(acc), dim=-1)
                local = rows - start                                   # this chunk's targets, without a host sync
                inside = (local >= 0) & (local < logits.shape[0])
                picked = logits[torch.where(inside, local, 0), ids].to(acc)
                target += torch.where(inside, picked, 0.0)
        ctx.save_for_backward(hidden, weight, bias, lse, rows, ids)
        ctx.chunk, ctx.dtype = chunk, dtype
        return target - lse[rows]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """Per chunk of rows: g = d out / d logits (float32 accumulation, one-hot added before any rounding, as in
        ``_TokenLogProb.backward``), rounded to the matmul dtype; grad_hidden[chunk] = g @ W, grad_W += g.T @ h,
        grad_bias += sum of g. The weight and bias gradients are summed over chunks in the accumulation dtype
        (float32 at least: one weight-sized buffer) and returned in the parameters' dtypes."""
        hidden, weight, bias, lse, rows, ids = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad_out = grad_out.to(acc)
        row_weight = torch.zeros_like(lse).index_add_(0, rows, grad_out)      # sum of upstream grads per row
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                sl = slice(start, start + chunk)
                h = hidden[sl].to(dtype)
                g = _logit_grad_chunk(torch.nn.functional.linear(h, w, b), lse[sl], row_weight[sl], rows, ids,
                                      grad_out, start, overwrite=True)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if need_h:
                    torch.mm(g, w, out=grad_h[sl])
                if need_w:
                    if dtype == acc:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += torch.mm(g.t(), h)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def head_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk of ``head_token_logprobs``: a float32 chunk of logits of HEAD_CHUNK_BYTES (16 MiB on the CPU;
    256 MiB on an accelerator, where the matmul needs some hundreds of rows to reuse each read of the weight)."""
    budget = HEAD_CHUNK_BYTES if device.type == "cpu" else HEAD_CHUNK_BYTES_ACCELERATOR
    return max(1, budget // (4 * max(1, vocab_size)))


def head_token_logprobs(hidden: Tensor, weight: Tensor, bias, rows: Tensor, ids: Tensor,
                        chunk_rows: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``token_logprobs(F.linear(hidden, weight, bias), rows, ids)`` without the [M, V] logits: the output layer is
    applied chunk by chunk (``chunk_rows`` rows; default ``head_chunk_rows``), in forward and again in backward.
    ``hidden`` [M, d], ``weight`` [V, d], ``bias`` [V] or None. ``dtype``: the matmul's dtype; default the
    autocast dtype when autocast is on (as ``nn.Linear`` would compute), else that of hidden and weight."""
    device_type = hidden.device.type
    if dtype is None:
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else torch.promote_types(hidden.dtype, weight.dtype))
    chunk = chunk_rows or head_chunk_rows(weight.shape[0], hidden.device)
    return _HeadTokenLogProb.apply(hidden, weight, bias, rows, ids, chunk, dtype)


class _PassThrough(torch.nn.Module):
    """Stands in for the output embeddings during a chunked-head forward: the model returns its final hidden
    states as ``logits``."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states


def _scaled_logits_settings(config) -> list:
    """The config fields by which the model's forward changes the logits after the output layer (soft-capping,
    scaling, slicing), with values that do change them."""
    found = []
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text) and text() is not config:
        configs.append(text())
    for cfg in configs:
        for name, neutral in LOGIT_TRANSFORM_FIELDS.items():
            if name == "logits_scaling" and getattr(cfg, "model_type", None) in PRE_HEAD_LOGITS_SCALING:
                continue
            value = getattr(cfg, name, None)
            if value not in neutral:
                found.append(f"{name}={value}")
    return found


def check_chunked_head(model) -> torch.nn.Linear:
    """The output layer (an ``nn.Linear``) that ``logprob_head="chunked"`` applies itself, or ValueError when
    ``model`` cannot be scored that way: no get/set_output_embeddings, an output layer that is not a plain linear
    layer (e.g. with LoRA adapters of its own), logits soft-capped / scaled / sliced by the forward after the output
    layer (the chunked head would skip that), or ZeRO-3 placeholder weights (the head's weight is gathered only
    inside its own forward, which the chunked head does not call)."""
    from clha.fast_engine import has_placeholder_parameters

    inner = unwrap_model(model)
    why = "logprob_head 'chunked' cannot score this model"
    get, put = getattr(inner, "get_output_embeddings", None), getattr(inner, "set_output_embeddings", None)
    head = get() if callable(get) and callable(put) else None
    if head is None:
        raise ValueError(f"{why}: it has no output embeddings to take over (get_output_embeddings / "
                         f"set_output_embeddings); use logprob_head 'logits'")
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(f"{why}: its output layer is a {type(head).__name__}, not a plain torch.nn.Linear "
                         f"(e.g. LoRA adapters on the output layer); use logprob_head 'logits'")
    scaled = _scaled_logits_settings(getattr(inner, "config", None))
    if scaled:
        raise ValueError(f"{why}: its forward transforms the logits after the output layer ({', '.join(scaled)}); "
                         f"use logprob_head 'logits'")
    if has_placeholder_parameters(inner):
        raise ValueError(f"{why}: its weights are ZeRO-3 placeholders (partitioned across processes); use "
                         f"logprob_head 'logits'")
    return head


@contextlib.contextmanager
def _output_layer_bypassed(model, head: torch.nn.Module):
    """For one forward call: the model's output embeddings (``head``, from ``check_chunked_head``) replaced by
    ``_PassThrough`` (the wrapper, DDP / DeepSpeed / accelerate, still runs its own forward), put back afterwards,
    also on an error."""
    inner = unwrap_model(model)
    inner.set_output_embeddings(_PassThrough())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


def score_candidates(model, batch: Dict[str, Any], logprob_head: str = "logits") -> CandidateScores:
    """Summed / mean log-probs of every candidate's response tokens, all candidates in one ``model(...)`` call.

    ``logprob_head``: "logits" (the model's forward computes the logits at the kept positions, then
    ``token_logprobs``) or "chunked" (the forward returns the final hidden states, its output layer swapped for a
    pass-through for that call, and ``head_token_logprobs`` applies the output layer chunk by chunk: the [M, V]
    logits and their gradient never exist; see ``check_chunked_head`` for the models it refuses)."""
    if logprob_head not in LOGPROB_HEADS:
        raise ValueError(f"logprob_head must be one of {LOGPROB_HEADS}, got {logprob_head!r}")
    head = check_chunked_head(model) if logprob_head == "chunked" else None
    batch = _resolve_layout(model, batch)
    inputs: Dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch["layout"] == "shared_prompt":
        _check_flex_device(model, batch["input_ids"].device)
        inputs["position_ids"] = batch["position_ids"]
        inputs["attention_mask"] = packed_attention_mask(model, batch)
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    keep = batch["logits_to_keep"]
    with (_output_layer_bypassed(model, head) if head is not None else contextlib.nullcontext()):
        if _accepts_logits_to_keep(model):
            inputs["logits_to_keep"] = keep
            logits = model(**inputs).logits                                   # [rows, U, V] ([rows, U, d] chunked)
        else:
            logits = model(**inputs).logits.index_select(1, keep)
    logits = logits.reshape(-1, logits.shape[-1])
    if head is None:
        token_logps = token_logprobs(logits, batch["target_rows"], batch["target_ids"])
    else:
        if logits.shape[-1] != head.in_features:
            raise ValueError(f"logprob_head 'chunked': the model returned {logits.shape[-1]} features per position "
                             f"with its output layer bypassed, not the {head.in_features} the layer takes (its "
                             f"forward does not go through get_output_embeddings()); use logprob_head 'logits'")
        token_logps = head_token_logprobs(logits, head.weight, head.bias, batch["target_rows"], batch["target_ids"],
                                          dtype=_compute_dtype(model, logits.device))
    counts = batch["token_counts"]
    B, n = counts.shape
    sums = token_logps.new_zeros(B * n).index_add(0, batch["target_candidate"], token_logps).view(B, n)
    means = sums / counts.clamp_min(1).to(sums.dtype)
    return CandidateScores(sum_logps=sums, mean_logps=means, token_counts=counts)


def _check_flex_device(model, device: torch.device) -> None:
    """torch has no FlexAttention backward on the CPU: say so plainly instead of failing inside the kernel."""
    if device.type != "cpu" or _attention_implementation(model) != "flex_attention" or not torch.is_grad_enabled():
        return
    if any(p.requires_grad for p in unwrap_model(model).parameters()):
        raise ValueError("flex_attention cannot train on the CPU (torch has no FlexAttention backward there): "
                         "use attn_implementation 'sdpa' (the 'auto' choice on the CPU) or a CUDA device; "
                         "scoring under torch.no_grad() works")

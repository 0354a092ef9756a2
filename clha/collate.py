"""Turn ranked examples into ONE model input holding all B x n candidates of a batch.

Two layouts (``RankedCollator(layout=...)``):

``"shared_prompt"`` (default)
    Each example's prompt appears once, followed by its n responses::

        row: [prompt_0 | resp_0,0 | resp_0,1 | prompt_1 | resp_1,0 | resp_1,1 ]   (pack=True: the whole batch
        pos:  0 .. P0-1  P0 ..     P0 ..      0 .. P1-1  P1 ..      P1 ..          in one row, no padding)

    ``position_ids`` restart for each response at the prompt length, so every response sees exactly the positions
    it would see alone. A token sees earlier tokens of its own example's prompt and earlier tokens of its own
    response, nothing else (block-diagonal across examples); padding sees only itself. The batch does not carry
    that pattern as a dense ``[rows, 1, T, T]`` mask: it carries compact per-token segment tensors ``[rows, T]``
    (``sequence_ids``: which prompt run the token belongs to, -1 for padding; ``branch_ids``: 0 for a prompt
    token, k + 1 for a token of response k, -1 for padding; ``candidate_ids``: ``b * n + k`` for a response token,
    -1 otherwise), from which ``clha.modeling.score_candidates`` builds, on the model's device and once per batch,
    the form the attention kernel wants (a FlexAttention ``BlockMask``, or an additive 4D mask for sdpa/eager; see
    ``clha.modeling.packed_attention_mask``). ``shared_prompt_mask`` gives the dense boolean pattern (tests,
    FLOP counts). The first token of every response is predicted by the LAST PROMPT TOKEN, whose logits are
    therefore computed once and shared by the n responses. Needs a model that honours a 4D mask / block mask and
    ``position_ids`` (Llama family, GPT-2, GPT-NeoX with sdpa/eager attention, Llama and GPT-NeoX with
    flex_attention; see ``clha.modeling.supports_shared_prompt``).

``"padded"``
    B*n rows ``prompt + response_k`` (row ``b*n + k``), right-padded once to the longest, 2D attention mask.
    Works with any causal LM.

``"auto"``
    Chosen ONCE when the collator is built with ``model=``: shared_prompt when the model can take it, else padded
    (``clha.modeling.choose_layout``); every batch is then built in its final layout. Without ``model=`` the
    collator builds shared-prompt batches and ``score_candidates`` converts each one to the padded layout when the
    model cannot take it (``to_padded_batch``: a copy to the CPU and a re-collation per batch, so pass ``model=``).

Common keys: ``rewards`` [B, n] float32, ``sft_index`` [B], ``token_counts`` [B, n] (response tokens scored),
``logits_to_keep`` [U] (positions whose logits are needed; the same positions in every row), and the targets as
flat lists over the N scored tokens: ``target_rows`` (row of the flattened ``[rows * U, V]`` logits),
``target_ids`` (the token), ``target_candidate`` (``b * n + k``). ``attention_tokens`` (int) counts the non-pad
tokens fed to the model, ``example_ids`` the ``meta`` identities when the examples carry them.

Token rules are those of ``clha.data.tokenize`` (prompt cut from the left to block_size - 128, response is
" " + response, prompt + response cut from the right to block_size), so every candidate is scored on exactly the
tokens it would have in a separate forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from clha.data.format import RankedExample, render_prompt
from clha.data.tokenize import encode_pair, encode_prompt

LAYOUTS = ("shared_prompt", "padded", "auto")


@dataclass
class EncodedExample:
    """Token ids of one example's first n candidates; candidates with the same prompt share it."""
    prompts: List[List[int]]          # distinct prompts (normally one)
    candidate_prompt: List[int]       # for each candidate, the index of its prompt in `prompts`
    responses: List[List[int]]        # n response id lists, already cut to fit block_size


def encode_example(tokenizer, example: RankedExample, block_size: int, n: int,
                   eos_id: Optional[int] = None) -> EncodedExample:
    prompts: List[List[int]] = []
    seen: Dict[tuple, int] = {}
    candidate_prompt, responses = [], []
    for k in range(n):
        key = tuple(example.prefix[k])
        if key not in seen:
            seen[key] = len(prompts)
            prompts.append(encode_prompt(tokenizer, render_prompt(example.prefix[k]), block_size))
        p = seen[key]
        candidate_prompt.append(p)
        responses.append(encode_pair(tokenizer, "", example.suffix[k], block_size, prompt_ids=prompts[p],
                                     eos_id=eos_id).response_ids)
    return EncodedExample(prompts, candidate_prompt, responses)


def _example_id(meta: Dict[str, Any]) -> Optional[Any]:
    if not meta:
        return None
    for key in ("example_id", "id", "index"):
        if key in meta:
            return meta[key]
    if "line_num" in meta:
        return f"{meta.get('source', '')}:{meta['line_num']}"
    return None


def _kept_positions(rows: List[List[int]]):
    """Given, per row, the predictor positions needed, return logits_to_keep (sorted union) and a lookup."""
    positions = sorted({p for row in rows for p in row})
    index = {p: i for i, p in enumerate(positions)}
    return positions, index


def assign_rows(sizes: Sequence[int], pack: bool, max_row_tokens: Optional[int]) -> List[int]:
    """Row of each example: one row each (pack=False), else first fit, in order, into rows of at most
    max_row_tokens tokens (None: no limit, one row). An example larger than the limit gets a row of its own."""
    if not pack:
        return list(range(len(sizes)))
    used: List[int] = []
    rows = []
    for size in sizes:
        for r, u in enumerate(used):
            if max_row_tokens is None or u + size <= max_row_tokens:
                used[r] += size
                rows.append(r)
                break
        else:
            used.append(size)
            rows.append(len(used) - 1)
    return rows


def build_shared_prompt(encoded: Sequence[EncodedExample], n: int, pad_id: int, pack: bool = True,
                        max_row_tokens: Optional[int] = None) -> Dict[str, Any]:
    """The shared-prompt tensors for already encoded examples (see the module docstring)."""
    sizes = [sum(map(len, ex.prompts)) + sum(map(len, ex.responses)) for ex in encoded]
    assignment = assign_rows(sizes, pack, max_row_tokens)
    R = max(assignment) + 1
    row_tokens: List[List[int]] = [[] for _ in range(R)]
    row_pos: List[List[int]] = [[] for _ in range(R)]
    row_seq: List[List[int]] = [[] for _ in range(R)]
    row_branch: List[List[int]] = [[] for _ in range(R)]
    row_candidate: List[List[int]] = [[] for _ in range(R)]
    # per scored token: (row, predictor position, target id, candidate)
    targets: List[tuple] = []
    counts = torch.zeros(len(encoded), n, dtype=torch.long)
    seq_id = 0
    for b, ex in enumerate(encoded):
        r = assignment[b]
        toks, pos, seq, branch, cand = row_tokens[r], row_pos[r], row_seq[r], row_branch[r], row_candidate[r]
        for p_idx, prompt in enumerate(ex.prompts):
            start = len(toks)
            P = len(prompt)
            toks += prompt
            pos += range(P)
            seq += [seq_id] * P
            branch += [0] * P
            cand += [-1] * P
            last_prompt = start + P - 1
            for k in range(n):
                if ex.candidate_prompt[k] != p_idx:
                    continue
                resp = ex.responses[k]
                r0 = len(toks)
                toks += resp
                pos += range(P, P + len(resp))
                seq += [seq_id] * len(resp)
                branch += [k + 1] * len(resp)
                cand += [b * n + k] * len(resp)
                for t, tok in enumerate(resp):
                    predictor = last_prompt if t == 0 else r0 + t - 1
                    if predictor < start:          # empty prompt: the first response token has no predictor
                        continue
                    targets.append((r, predictor, tok, b * n + k))
                    counts[b, k] += 1
            seq_id += 1
    T = max(len(t) for t in row_tokens)

    def pad(rows, value):
        return torch.tensor([row + [value] * (T - len(row)) for row in rows], dtype=torch.long)

    input_ids = pad(row_tokens, pad_id)
    position_ids = pad(row_pos, 0)
    sequence_ids = pad(row_seq, -1)
    branch_ids = pad(row_branch, -1)
    candidate_ids = pad(row_candidate, -1)
    # No dense [rows, 1, T, T] mask here: the segment tensors are all the attention pattern needs, and the model's
    # device builds from them the form its kernel wants (clha.modeling.packed_attention_mask).
    return dict(layout="shared_prompt", input_ids=input_ids, position_ids=position_ids, sequence_ids=sequence_ids,
                branch_ids=branch_ids, candidate_ids=candidate_ids,
                attention_tokens=sum(len(t) for t in row_tokens),
                **_targets(targets, R, counts))


def shared_prompt_allowed(q_seq, kv_seq, q_branch, kv_branch, q_idx, kv_idx):
    """The attention rule of the shared-prompt layout, elementwise (any broadcastable shapes, or the scalars of a
    FlexAttention ``mask_mod``): query token q may attend key token kv when both are in the same prompt run, kv <= q,
    and kv is a prompt token or belongs to q's own response. Padding (sequence -1) attends to itself only, so no
    softmax row is empty (an empty row would give NaN in sdpa and poison the gradients)."""
    same = (q_seq == kv_seq) & (q_seq >= 0) & (kv_idx <= q_idx) & ((kv_branch == 0) | (kv_branch == q_branch))
    return same | ((q_seq < 0) & (q_idx == kv_idx))


def shared_prompt_mask(sequence_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """The dense boolean [rows, 1, T, T] mask of the shared-prompt layout (True = may attend), built on the
    segment tensors' device (``shared_prompt_allowed`` at every (q, kv) pair). O(T^2) memory: the model path
    builds it only for sdpa/eager, on the device, once per batch (``clha.modeling.packed_attention_mask``)."""
    idx = torch.arange(sequence_ids.shape[1], device=sequence_ids.device)
    allowed = shared_prompt_allowed(sequence_ids[:, :, None], sequence_ids[:, None, :], branch_ids[:, :, None],
                                    branch_ids[:, None, :], idx[:, None], idx[None, :])
    return allowed[:, None, :, :]


def build_padded(encoded: Sequence[EncodedExample], n: int, pad_id: int) -> Dict[str, Any]:
    """B*n rows prompt + response (row b*n + k), right-padded to the longest row."""
    rows: List[List[int]] = []
    predictors: List[List[int]] = []
    raw_targets: List[tuple] = []
    counts = torch.zeros(len(encoded), n, dtype=torch.long)
    for b, ex in enumerate(encoded):
        for k in range(n):
            prompt, resp = ex.prompts[ex.candidate_prompt[k]], ex.responses[k]
            r = len(rows)
            rows.append(prompt + resp)
            preds = []
            for t, tok in enumerate(resp):
                j = len(prompt) + t
                if j == 0:
                    continue
                preds.append(j - 1)
                raw_targets.append((r, j - 1, tok, b * n + k))
                counts[b, k] += 1
            predictors.append(preds)
    T = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], dtype=torch.long)
    return dict(layout="padded", input_ids=input_ids, attention_mask=attention_mask,
                attention_tokens=sum(len(r) for r in rows), **_targets(raw_targets, len(rows), counts))


def _targets(raw: List[tuple], num_rows: int, counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    per_row: List[List[int]] = [[] for _ in range(num_rows)]
    for r, p, _, _ in raw:
        per_row[r].append(p)
    positions, index = _kept_positions(per_row)
    U = len(positions)
    return dict(
        logits_to_keep=torch.tensor(positions, dtype=torch.long),
        target_rows=torch.tensor([r * U + index[p] for r, p, _, _ in raw], dtype=torch.long),
        target_ids=torch.tensor([tok for _, _, tok, _ in raw], dtype=torch.long),
        target_candidate=torch.tensor([c for _, _, _, c in raw], dtype=torch.long),
        token_counts=counts,
    )


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class RankedCollator:
    """Collate ``RankedExample``s into one batch for ``clha.modeling.score_candidates``.

    Args:
        tokenizer: any Hugging Face tokenizer (prompt/response rules of ``clha.data.tokenize``).
        block_size: maximum tokens of prompt + response.
        n: ranking length (``training_stage_num``): only the first n candidates of each example are used.
        layout: "shared_prompt", "padded" or "auto" (see the module docstring).
        pack: shared-prompt layout only: pack several examples into one row (no padding between them; the mask is
            block-diagonal) instead of one row per example, right-padded. Attention is computed over the whole
            row, so rows are capped at ``max_row_tokens`` (default ``n * block_size``, the size of the largest
            possible example): with the default per-device batch of 2 the whole batch is one row. ``0``: no cap,
            the whole batch in one row with no padding at all (worth it with flex attention, which skips the
            tiles between examples; a dense mask grows with the square of the row).
        model: the model the batches are for (only inspected here, not kept). With it the layout is settled now:
            "auto" becomes "shared_prompt" or "padded" (``clha.modeling.choose_layout``), and "shared_prompt" on a
            model whose attention cannot take it fails here rather than at the first step. ``self.layout`` is the
            layout every batch will have.
        append_eos: end each response with the tokenizer's EOS token (scored like any response token), as the
            trainer does by default (``--append_eos``); a response cut to fit ``block_size`` gets none.
    """

    def __init__(self, tokenizer, block_size: int, n: int, layout: str = "shared_prompt", pack: bool = True,
                 max_row_tokens: Optional[int] = None, model=None, append_eos: bool = False):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if n < 1:
            raise ValueError("n must be at least 1")
        self.requested_layout = layout
        if model is not None:
            from clha.modeling import check_shared_prompt, choose_layout     # clha.modeling imports this module
            if layout == "auto":
                layout = choose_layout(model)
            elif layout == "shared_prompt":
                check_shared_prompt(model)
        self.tokenizer, self.block_size, self.n, self.layout, self.pack = tokenizer, block_size, n, layout, pack
        if max_row_tokens is not None and max_row_tokens < 0:
            raise ValueError(f"max_row_tokens must be >= 0 (0: no cap), got {max_row_tokens}")
        # None: the default cap; 0: no cap (assign_rows takes None for that)
        self.max_row_tokens = (n * block_size if max_row_tokens is None else max_row_tokens) or None
        self.pad_id = _pad_id(tokenizer)
        self.eos_id = None
        if append_eos:
            self.eos_id = getattr(tokenizer, "eos_token_id", None)
            if self.eos_id is None:
                raise ValueError("append_eos: the tokenizer has no eos_token_id (pass append_eos=False, "
                                 "--no-append_eos in training)")

    def encode(self, examples: Sequence[RankedExample]) -> List[EncodedExample]:
        for i, ex in enumerate(examples):
            if ex.n < self.n:
                raise ValueError(f"example {i} has {ex.n} candidates, the collator needs {self.n}")
            if not 0 <= ex.sft_index < self.n:
                raise ValueError(f"example {i}: sft_index {ex.sft_index} is not among the first {self.n} candidates")
        return [encode_example(self.tokenizer, ex, self.block_size, self.n, self.eos_id) for ex in examples]

    def __call__(self, examples: Sequence[RankedExample]) -> Dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        encoded = self.encode(examples)
        if self.layout == "padded":
            batch = build_padded(encoded, self.n, self.pad_id)
        else:
            batch = build_shared_prompt(encoded, self.n, self.pad_id, pack=self.pack,
                                        max_row_tokens=self.max_row_tokens)
            batch["layout_requested"] = self.layout
            batch["pad_id"] = self.pad_id
        batch["rewards"] = torch.tensor([ex.reward[:self.n] for ex in examples], dtype=torch.float32)
        batch["sft_index"] = torch.tensor([ex.sft_index for ex in examples], dtype=torch.long)
        ids = [_example_id(ex.meta) for ex in examples]
        if any(i is not None for i in ids):
            batch["example_ids"] = ids
        return batch


def encoded_from_shared(batch: Dict[str, Any], n: int) -> List[EncodedExample]:
    """Recover the token lists of a shared-prompt batch (used to fall back to the padded layout)."""
    input_ids = batch["input_ids"].cpu()
    seq, branch, cand = batch["sequence_ids"].cpu(), batch["branch_ids"].cpu(), batch["candidate_ids"].cpu()
    B = batch["token_counts"].shape[0]
    prompts_of_seq: Dict[int, List[int]] = {}
    for s in torch.unique(seq).tolist():
        if s >= 0:
            prompts_of_seq[s] = input_ids[(seq == s) & (branch == 0)].tolist()
    out = []
    for b in range(B):
        prompts, candidate_prompt, responses, local = [], [], [], {}
        for k in range(n):
            where = cand == b * n + k
            if not bool(where.any()):
                raise ValueError(f"candidate {k} of example {b} has no response token; cannot rebuild its row")
            s = int(seq[where][0])
            if s not in local:
                local[s] = len(prompts)
                prompts.append(prompts_of_seq[s])
            candidate_prompt.append(local[s])
            responses.append(input_ids[where].tolist())
        out.append(EncodedExample(prompts, candidate_prompt, responses))
    return out


def to_padded_batch(batch: Dict[str, Any], n: Optional[int] = None) -> Dict[str, Any]:
    """Rebuild a shared-prompt batch in the padded layout (same tokens, same targets, same order)."""
    if batch["layout"] == "padded":
        return batch
    n = n or batch["token_counts"].shape[1]
    device = batch["input_ids"].device
    padded = build_padded(encoded_from_shared(batch, n), n, int(batch.get("pad_id", 0)))
    padded = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in padded.items()}
    for key in ("rewards", "sft_index", "example_ids"):
        if key in batch:
            padded[key] = batch[key]
    return padded

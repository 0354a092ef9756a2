"""Packed attention of the shared-prompt layout: the compact segment tensors of the collator, the FlexAttention
block mask and the additive sdpa/eager mask built from them, and the scores each gives.

On the CPU torch has no FlexAttention backward, and its compiled forward takes about a minute to build here, so
the flex scoring tests run FlexAttention's uncompiled reference path (``flex_eager``: same BlockMask, same
mask_mod, forward only); ``CLHA_TEST_FLEX_COMPILE=1`` adds the compiled CPU forward, and the ``*_cuda`` tests run
the real kernels, backward included, where a GPU is present.
"""

import os

import pytest
import torch

from clha.collate import RankedCollator, shared_prompt_allowed, shared_prompt_mask
from clha.data.format import ASSISTANT, PROMPTER, RankedExample
from clha.modeling import (additive_shared_prompt_mask, packed_attention_mask, resolve_attn_implementation,
                           score_candidates, set_attn_implementation, shared_prompt_block_mask)

flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")
BLOCK = 160
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tok():
    from clha.testing.tiny import build_tokenizer
    return build_tokenizer()


@pytest.fixture
def flex_eager(monkeypatch):
    """Run transformers' flex_attention through torch's uncompiled reference implementation (forward only)."""
    import transformers.integrations.flex_attention as hf_flex

    monkeypatch.setattr(flex_attention_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kw: flex_attention_module.flex_attention(q, k, v, **kw))


def _examples(n, count=3):
    prompts = [[PROMPTER + "Capital of France?", ASSISTANT],
               [PROMPTER + "Tell me a long story about a cat, a mat and the rain. " * 12, ASSISTANT],
               [PROMPTER + "Hi", ASSISTANT + "Hello, how can I help?", PROMPTER + "Bread?", ASSISTANT]]
    replies = ["Paris is the capital of France.", "No.", "Mix flour, water, yeast and salt, knead, rise, bake.",
               "Sure, what subject is it?", "The quick brown fox.", "I can't help with that, sorry."]
    return [RankedExample([list(prompts[i % 3])] * n, [replies[(i + k) % len(replies)] for k in range(n)],
                          [float(n - k) for k in range(n)], 0) for i in range(count)]


def _model(tok, family, attn="sdpa", layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "llama":
        from clha.testing.tiny import build_causal_lm
        model = build_causal_lm(tok, seed=0, hidden_size=64, layers=layers, heads=4)
    elif family == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers,
                                                 num_attention_heads=4, intermediate_size=128,
                                                 max_position_embeddings=512, hidden_dropout=0.0,
                                                 attention_dropout=0.0))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=layers, n_head=4,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.set_attn_implementation(attn)
    return model.to(dtype).train()


def _random_segments(rows, T, seed):
    """Segment tensors of random prompt runs (1-3 responses each) with right padding, as the collator lays out."""
    g = torch.Generator().manual_seed(seed)
    seq, branch = torch.full((rows, T), -1), torch.full((rows, T), -1)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (), generator=g))

    for r in range(rows):
        used, run, end = 0, 0, T - draw(0, 40)
        while used < end:
            P = draw(1, 150)
            seq[r, used:used + P], branch[r, used:used + P] = run, 0
            used += P
            for k in range(draw(1, 4)):
                L = draw(1, 120)
                seq[r, used:used + L], branch[r, used:used + L] = run, k + 1
                used += L
            run += 1
        seq[r, end:], branch[r, end:] = -1, -1
    return seq, branch


def _segment_cases(tok):
    cases = [("random 1x300", *_random_segments(1, 300, 0)), ("random 3x517", *_random_segments(3, 517, 1)),
             ("random 2x1024", *_random_segments(2, 1024, 2))]
    for name, kwargs in (("packed", {}), ("rows", dict(pack=False)), ("capped", dict(max_row_tokens=60))):
        batch = RankedCollator(tok, BLOCK, 3, **kwargs)(_examples(3))
        cases.append((name, batch["sequence_ids"], batch["branch_ids"]))
    return cases


def test_block_mask_and_additive_mask_equal_the_dense_mask(tok):
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    for name, seq, branch in _segment_cases(tok):
        R, T = seq.shape
        dense = shared_prompt_mask(seq, branch)
        # the rule itself, spot-checked against the layout's definition
        assert dense[:, 0].diagonal(dim1=-2, dim2=-1).all(), name          # every token sees itself
        assert not torch.triu(dense[:, 0], diagonal=1).any(), name         # never a later token
        block = shared_prompt_block_mask(seq, branch)
        assert tuple(block.shape) == (R, 1, T, T), name
        # the mask_mod over every (q, kv) pair is the dense mask
        assert torch.equal(create_mask(block.mask_mod, R, 1, T, T, device="cpu"), dense), name
        # the block tables are those torch's own (T x T) builder gives
        def mask_mod(b, h, q, kv):
            return shared_prompt_allowed(seq[b, q], seq[b, kv], branch[b, q], branch[b, kv], q, kv)
        ref = create_block_mask(mask_mod, R, None, T, T, device="cpu", _compile=False)
        for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                      "q_indices"):
            assert torch.equal(getattr(block, field), getattr(ref, field)), (name, field)
        # and they cover the dense mask: full tiles entirely allowed, every allowed pair in a computed tile
        tiles = block.to_dense().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :T, :T].bool()
        assert not (dense & ~tiles).any(), name
        full_only = flex_attention_module.BlockMask.from_kv_blocks(block.full_kv_num_blocks, block.full_kv_indices,
                                                                   seq_lengths=(T, T))
        full_tiles = full_only.to_dense().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :T, :T].bool()
        assert dense[full_tiles].all(), name
        # the additive form: 0 where allowed, the dtype's minimum elsewhere, rows aligned for CUDA's kernels
        for dtype in (torch.float32, torch.bfloat16):
            additive = additive_shared_prompt_mask(seq, branch, dtype)
            assert additive.dtype == dtype and tuple(additive.shape) == (R, 1, T, T)
            assert torch.equal(additive == 0, dense), name
            assert (additive[~dense] == torch.finfo(dtype).min).all(), name
            assert additive.stride(-2) % 16 == 0 and additive.stride(-1) == 1


def test_block_mask_memory_is_far_below_a_dense_mask():
    # A BlockMask holds the two [rows, T] segment tensors its mask_mod reads (linear in T) and eight int32 block
    # tables: 4 x rows x (T/128) counts and 4 x rows x (T/128)^2 indices (4.3 KiB at T = 2k, 65 KiB at 8k).
    for T in (2048, 4096):
        seq, branch = _random_segments(1, T, T)
        block = shared_prompt_block_mask(seq, branch)
        tables = [block.kv_num_blocks, block.kv_indices, block.full_kv_num_blocks, block.full_kv_indices,
                  block.q_num_blocks, block.q_indices, block.full_q_num_blocks, block.full_q_indices]
        nb = T // 128
        assert sum(t.numel() * t.element_size() for t in tables) == 4 * 4 * (nb + nb * nb)
        # long packed rows of short prompt runs are mostly tiles FlexAttention skips
        assert block.kv_num_blocks.sum() + block.full_kv_num_blocks.sum() < 0.5 * nb * nb


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("n,pack", [(2, True), (3, True), (3, False)])
def test_flex_scores_equal_the_padded_layout(tok, flex_eager, family, n, pack):
    model = _model(tok, family, "sdpa")
    examples = _examples(n)
    with torch.no_grad():
        padded = score_candidates(model, RankedCollator(tok, BLOCK, n, layout="padded")(examples))
        model.set_attn_implementation("flex_attention")
        collator = RankedCollator(tok, BLOCK, n, layout="auto", pack=pack, model=model)
        assert collator.layout == "shared_prompt"
        batch = collator(examples)
        flex = score_candidates(model, batch)
    assert isinstance(batch["_packed_attention_mask"][1], flex_attention_module.BlockMask)
    assert torch.equal(flex.token_counts, padded.token_counts)
    assert torch.allclose(flex.mean_logps, padded.mean_logps, atol=1e-5, rtol=0)
    assert torch.allclose(flex.sum_logps, padded.sum_logps, atol=1e-5 * padded.token_counts.max().item(), rtol=0)


@pytest.mark.skipif(os.environ.get("CLHA_TEST_FLEX_COMPILE") != "1",
                    reason="compiling FlexAttention for the CPU takes about a minute; set CLHA_TEST_FLEX_COMPILE=1")
def test_flex_compiled_cpu_forward_equals_the_padded_layout(tok):
    model = _model(tok, "llama", "sdpa").eval()
    examples = _examples(2)
    with torch.no_grad():
        padded = score_candidates(model, RankedCollator(tok, BLOCK, 2, layout="padded")(examples))
        model.set_attn_implementation("flex_attention")
        flex = score_candidates(model, RankedCollator(tok, BLOCK, 2, model=model)(examples))
    assert torch.allclose(flex.mean_logps, padded.mean_logps, atol=1e-5, rtol=0)


def test_flex_training_on_the_cpu_is_refused_with_a_clear_error(tok):
    model = _model(tok, "llama", "flex_attention")
    batch = RankedCollator(tok, BLOCK, 2, model=model)(_examples(2))
    with pytest.raises(ValueError, match="flex_attention cannot train on the CPU"):
        score_candidates(model, batch)


def test_attention_choice(tok, monkeypatch):
    from clha.errors import InputError

    llama, gpt2 = _model(tok, "llama"), _model(tok, "gpt2")
    assert resolve_attn_implementation("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation"):
        resolve_attn_implementation("flash")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto", llama) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_attn_implementation("auto", llama) == "flex_attention"
    assert resolve_attn_implementation("auto", gpt2) == "sdpa"      # GPT-2 has no flex_attention in transformers
    assert set_attn_implementation(gpt2, "auto") == "sdpa"
    with pytest.raises(InputError, match="attn_implementation"):
        set_attn_implementation(gpt2, "flex_attention")
    assert set_attn_implementation(llama, "auto") == "flex_attention"
    assert llama.config._attn_implementation == "flex_attention"
    assert set_attn_implementation(llama, "eager") == "eager"


def _saved_masks(model, batch, T, autocast_dtype=None):
    """Distinct storages of [.., T, T] tensors autograd keeps for backward during one scoring pass."""
    seen = {}

    def pack(t):
        if t.dim() >= 2 and tuple(t.shape[-2:]) == (T, T) and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.dtype
        return t

    context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scores = score_candidates(model, batch)
    scores.sum_logps.sum().backward()
    return seen


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_sdpa_keeps_one_mask_for_all_layers(tok, autocast_dtype):
    # A boolean (or wrong-dtype) mask is converted to a float bias inside every sdpa call and each copy is saved
    # for backward: one per layer. The additive mask in the scores' dtype is one tensor all layers share.
    layers = 4
    model = _model(tok, "llama", "sdpa", layers=layers)
    batch = RankedCollator(tok, BLOCK, 3, model=model)(_examples(3))
    T = batch["input_ids"].shape[1]
    saved = _saved_masks(model, batch, T, autocast_dtype)
    assert len(saved) == 1, saved
    assert list(saved.values()) == [autocast_dtype or torch.float32]


def test_mask_is_built_once_per_batch_in_the_form_of_the_kernel(tok, monkeypatch):
    import clha.modeling

    built = []
    original = clha.modeling.additive_shared_prompt_mask
    monkeypatch.setattr(clha.modeling, "additive_shared_prompt_mask",
                        lambda *a, **k: built.append(a[2]) or original(*a, **k))
    model = _model(tok, "llama", "eager")
    batch = RankedCollator(tok, BLOCK, 2, model=model)(_examples(2))
    first = score_candidates(model, batch)
    second = score_candidates(model, batch)
    assert built == [torch.float32]                       # second pass reused the cached mask
    assert torch.equal(first.sum_logps, second.sum_logps)
    mask = packed_attention_mask(model, batch)
    assert mask.dtype == torch.float32 and mask.device == batch["input_ids"].device
    model64 = _model(tok, "llama", "eager", dtype=torch.float64)
    assert packed_attention_mask(model64, batch).dtype == torch.float64   # another dtype: rebuilt
    assert built == [torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------------- CUDA

def _to(batch, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@cuda
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_flex_attention_cuda_scores_and_gradients_equal_the_padded_layout(tok, family):
    examples = _examples(3)
    results = {}
    for attn, layout in (("sdpa", "padded"), ("flex_attention", "shared_prompt")):
        model = _model(tok, family, attn).cuda()
        batch = _to(RankedCollator(tok, BLOCK, 3, layout=layout, model=model)(examples), "cuda")
        scores = score_candidates(model, batch)
        scores.mean_logps.sum().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        results[attn] = scores, grads, batch
    (pad, pad_grads, _), (flex, flex_grads, flex_batch) = results["sdpa"], results["flex_attention"]
    block = flex_batch["_packed_attention_mask"][1]
    assert isinstance(block, flex_attention_module.BlockMask) and block.kv_num_blocks.device.type == "cuda"
    assert torch.allclose(flex.mean_logps, pad.mean_logps, atol=1e-4, rtol=0)
    for name, g in pad_grads.items():
        assert torch.allclose(flex_grads[name], g, atol=1e-4 * (g.abs().max().item() + 1e-6) + 1e-6), name


@cuda
def test_sdpa_mask_cuda_is_built_on_the_device_once_under_bf16_autocast(tok):
    model = _model(tok, "llama", "sdpa", layers=4).cuda()
    batch = _to(RankedCollator(tok, BLOCK, 3, model=model)(_examples(3)), "cuda")
    T = batch["input_ids"].shape[1]
    seen = {}

    def pack(t):
        if t.dim() >= 2 and tuple(t.shape[-2:]) == (T, T):
            seen[t.untyped_storage().data_ptr()] = t.dtype
        return t

    with torch.autocast("cuda", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scores = score_candidates(model, batch)
    scores.sum_logps.sum().backward()
    assert len(seen) <= 1 and set(seen.values()) <= {torch.bfloat16}, seen
    mask = batch["_packed_attention_mask"][1]
    assert mask.device.type == "cuda" and mask.dtype == torch.bfloat16

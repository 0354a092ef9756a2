"""One-pass candidate scoring (both layouts) against a straightforward per-candidate computation."""

import pytest
import torch
import torch.nn.functional as F

from clha.collate import RankedCollator, shared_prompt_mask, to_padded_batch
from clha.data.format import ASSISTANT, PROMPTER, RankedExample, render_prompt
from clha.data.tokenize import encode_pair
from clha.modeling import CandidateScores, choose_layout, score_candidates, supports_shared_prompt, token_logprobs

BLOCK = 160          # prompt budget 32 tokens: the long prompt below is cut from the left


@pytest.fixture(scope="module")
def tok():
    from clha.testing.tiny import build_tokenizer
    return build_tokenizer()


def _llama(tok, attn="sdpa", dtype=torch.float32, kv_heads=2):
    from clha.testing.tiny import build_causal_lm
    model = build_causal_lm(tok, seed=0, hidden_size=64, layers=2, heads=4)
    if kv_heads != 4:        # grouped-query attention, as in SmolLM2 (9 heads, 3 kv heads)
        from transformers import AutoModelForCausalLM
        cfg = model.config
        cfg.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    model.set_attn_implementation(attn)
    return model.to(dtype).train()      # dropout is 0 in these configs; train() mirrors the trainer


def _gpt2(tok, attn="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation(attn)
    return model


def _examples(n):
    long_prompt = [PROMPTER + "Tell me a long story about a cat, a mat and the rain. " * 12, ASSISTANT]
    two_turns = [PROMPTER + "Hi", ASSISTANT + "Hello, how can I help?", PROMPTER + "Bread?", ASSISTANT]
    short = [PROMPTER + "Capital of France?", ASSISTANT]
    replies = ["Paris is the capital of France.", "No.", "Mix flour, water, yeast and salt, knead, rise, bake.",
               "Sure, what subject is it?", "The quick brown fox.", "I can't help with that, sorry."]
    rows = []
    for i, turns in enumerate([short, long_prompt, two_turns]):
        suffix = [replies[(i + k) % len(replies)] for k in range(n)]
        rows.append(RankedExample([list(turns)] * n, suffix, [float(2 - k) * (i + 1) for k in range(n)], 0,
                                  {"source": "t", "line_num": i + 1}))
    return rows


def _reference_scores(model, tok, examples, n):
    """A separate forward per candidate, full log_softmax, gather: the reference code's computation."""
    sums, counts = [], []
    for ex in examples:
        for k in range(n):
            pair = encode_pair(tok, render_prompt(ex.prefix[k]), ex.suffix[k], BLOCK)
            ids = torch.tensor([pair.input_ids])
            logits = model(ids).logits[0]
            logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            P = len(pair.prompt_ids)
            token_logps = logp[P - 1:-1].gather(1, ids[0, P:, None])[:, 0]
            sums.append(token_logps.sum())
            counts.append(token_logps.numel())
    sums = torch.stack(sums).view(len(examples), n)
    counts = torch.tensor(counts).view(len(examples), n)
    return CandidateScores(sums, sums / counts, counts)


LAYOUTS = [("shared_prompt", True), ("shared_prompt", False), ("padded", True)]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("layout,pack", LAYOUTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_scores_match_per_candidate_passes(tok, n, layout, pack, attn):
    model = _llama(tok, attn)
    examples = _examples(n)
    batch = RankedCollator(tok, BLOCK, n, layout=layout, pack=pack)(examples)
    assert batch["layout"] == layout
    got = score_candidates(model, batch)
    want = _reference_scores(model, tok, examples, n)
    assert torch.equal(got.token_counts, want.token_counts)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-5, rtol=0)
    assert torch.allclose(got.sum_logps, want.sum_logps, atol=1e-5 * want.token_counts.max().item(), rtol=0)
    # the long prompt was cut from the left: its budget is BLOCK - 128 tokens
    assert batch["rewards"].shape == (3, n) and batch["sft_index"].tolist() == [0, 0, 0]
    assert batch["example_ids"] == ["t:1", "t:2", "t:3"]


@pytest.mark.parametrize("layout,pack", LAYOUTS)
def test_float64_scores_are_exact(tok, layout, pack):
    # sdpa: HF's eager attention runs its softmax in float32 whatever the model dtype, so only sdpa is float64
    # end to end; in float64 the one-pass scores equal the per-candidate ones to rounding
    model = _llama(tok, "sdpa", torch.float64)
    examples = _examples(3)
    got = score_candidates(model, RankedCollator(tok, BLOCK, 3, layout=layout, pack=pack)(examples))
    want = _reference_scores(model, tok, examples, 3)
    assert got.sum_logps.dtype == torch.float64
    assert torch.allclose(got.sum_logps, want.sum_logps, atol=1e-10, rtol=0)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout,pack", LAYOUTS)
def test_gradients_match_per_candidate_passes(tok, layout, pack):
    n = 3
    examples = _examples(n)
    weights = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.7, -1.0], [-0.2, 0.4, 0.9]])

    def grads(fn):
        model = _llama(tok, "sdpa")
        scores = fn(model)
        ((scores.mean_logps * weights).sum() + 0.01 * scores.sum_logps[:, 0].sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    collator = RankedCollator(tok, BLOCK, n, layout=layout, pack=pack)
    got = grads(lambda m: score_candidates(m, collator(examples)))
    want = grads(lambda m: _reference_scores(m, tok, examples, n))
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item() + 1e-8
        assert (got[name] - want[name]).abs().max().item() <= 1e-4 * scale + 1e-6, name


def test_truncation_rules(tok):
    examples = _examples(2)
    batch = RankedCollator(tok, BLOCK, 2, layout="padded")(examples)
    # row 2*1 + 0 holds the long prompt: prompt cut to BLOCK-128 = 32 tokens, total <= BLOCK
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max().item() <= BLOCK
    long_row = batch["attention_mask"][2].sum().item()
    assert long_row == 32 + batch["token_counts"][1, 0].item()
    # a response longer than the room left is cut from the right to fill block_size exactly
    huge = RankedExample([[PROMPTER + "hi", ASSISTANT]] * 2, ["word " * 400, "ok"], [1.0, 0.0])
    b2 = RankedCollator(tok, BLOCK, 2, layout="shared_prompt")([huge])
    prompt_len = (b2["branch_ids"] == 0).sum().item()
    assert prompt_len + b2["token_counts"][0, 0].item() == BLOCK


def test_only_first_n_candidates_are_used(tok):
    ex = _examples(3)
    batch = RankedCollator(tok, BLOCK, 2)(ex)
    assert batch["rewards"].shape == (3, 2) and batch["token_counts"].shape == (3, 2)
    with pytest.raises(ValueError, match="candidates"):
        RankedCollator(tok, BLOCK, 4)(ex)


def test_one_forward_and_logits_only_where_needed(tok):
    model = _llama(tok, "sdpa")
    calls, head_rows = [], []
    model.register_forward_hook(lambda m, a, k, o: calls.append(1), with_kwargs=True)
    model.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    batch = RankedCollator(tok, BLOCK, 3, layout="shared_prompt")(_examples(3))
    score_candidates(model, batch)
    assert len(calls) == 1
    # one logit row per response token, except that each response's first token is predicted by the last
    # prompt token, shared by the n responses of an example: sum(counts) - B*n + B rows
    counts = batch["token_counts"]
    assert head_rows == [counts.sum().item() - counts.numel() + counts.shape[0]]
    assert batch["input_ids"].shape[0] == 1 and batch["attention_tokens"] == batch["input_ids"].numel()


def test_shared_prompt_mask_is_block_diagonal_and_branch_causal(tok):
    batch = RankedCollator(tok, BLOCK, 2)(_examples(2)[:1] + _examples(2)[2:])
    assert "attention_mask" not in batch        # the pattern travels as [rows, T] segment tensors
    mask = shared_prompt_mask(batch["sequence_ids"], batch["branch_ids"])[0, 0]
    seq, br = batch["sequence_ids"][0], batch["branch_ids"][0]
    r0 = (br == 1).nonzero()[:, 0]
    r1 = (br == 2).nonzero()[:, 0]
    assert not mask[r1][:, r0].any() and not mask[r0][:, r1].any()       # responses never see each other
    r1_ex0 = ((br == 2) & (seq == 0)).nonzero()[:, 0]
    assert mask[r1_ex0][:, (br == 0) & (seq == 0)].all()                  # ... but see their whole prompt
    assert not mask[seq == 1][:, seq == 0].any()                          # examples never see each other
    pos = batch["position_ids"][0]
    assert pos[r1[0]].item() == pos[r0[0]].item() == ((br == 0) & (seq == 0)).sum().item()


def test_auto_layout_falls_back_to_padded(tok, monkeypatch):
    import clha.modeling
    model = _llama(tok, "sdpa")
    examples = _examples(2)
    batch = RankedCollator(tok, BLOCK, 2, layout="auto")(examples)
    shared = score_candidates(model, batch)
    padded = score_candidates(model, to_padded_batch(batch))
    direct = score_candidates(model, RankedCollator(tok, BLOCK, 2, layout="padded")(examples))
    assert torch.allclose(padded.sum_logps, direct.sum_logps, atol=1e-6)
    assert torch.allclose(shared.mean_logps, padded.mean_logps, atol=1e-5)
    monkeypatch.setattr(clha.modeling, "SHARED_PROMPT_MODEL_TYPES", set())
    assert choose_layout(model) == "padded" and not supports_shared_prompt(model)
    # without model= the collator cannot know: score_candidates converts each batch, and says what it costs
    with pytest.warns(UserWarning, match="re-collated"):
        fallback = score_candidates(model, batch)
    assert torch.allclose(fallback.sum_logps, direct.sum_logps, atol=1e-6)
    batch_explicit = RankedCollator(tok, BLOCK, 2, layout="shared_prompt")(examples)
    with pytest.warns(UserWarning, match="not verified"):
        score_candidates(model, batch_explicit)


def test_auto_layout_is_chosen_once_when_the_collator_knows_the_model(tok, monkeypatch):
    import clha.modeling

    def no_recollation(*args, **kwargs):
        raise AssertionError("a batch was re-collated at scoring time")

    monkeypatch.setattr(clha.modeling, "to_padded_batch", no_recollation)
    model = _llama(tok, "sdpa")
    examples = _examples(2)
    direct = score_candidates(model, RankedCollator(tok, BLOCK, 2, layout="padded")(examples))
    able = RankedCollator(tok, BLOCK, 2, layout="auto", model=model)
    assert able.layout == "shared_prompt" and able(examples)["layout"] == "shared_prompt"
    monkeypatch.setattr(clha.modeling, "SHARED_PROMPT_MODEL_TYPES", set())     # a model that cannot take it
    unable = RankedCollator(tok, BLOCK, 2, layout="auto", model=model)
    assert unable.layout == "padded" and unable.requested_layout == "auto"
    batch = unable(examples)
    assert batch["layout"] == "padded"
    got = score_candidates(model, batch)           # to_padded_batch would raise
    assert torch.allclose(got.sum_logps, direct.sum_logps, atol=1e-6)


def test_flash_style_attention_cannot_take_shared_prompt(tok):
    model = _llama(tok, "sdpa")
    model.config._attn_implementation = "flash_attention_2"     # only inspected, never run
    assert choose_layout(model) == "padded"
    with pytest.raises(ValueError, match="sdpa, eager or flex_attention"):
        from clha.modeling import _resolve_layout
        _resolve_layout(model, RankedCollator(tok, BLOCK, 2, layout="shared_prompt")(_examples(2)))
    # with the model known, the collator refuses at construction instead of at the first step
    with pytest.raises(ValueError, match="sdpa, eager or flex_attention"):
        RankedCollator(tok, BLOCK, 2, layout="shared_prompt", model=model)
    assert RankedCollator(tok, BLOCK, 2, layout="auto", model=model).layout == "padded"


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_gpt2(tok, layout):
    model = _gpt2(tok)
    examples = _examples(2)
    got = score_candidates(model, RankedCollator(tok, BLOCK, 2, layout=layout)(examples))
    want = _reference_scores(model, tok, examples, 2)
    assert torch.equal(got.token_counts, want.token_counts)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-5, rtol=0)


def test_gpt_neox_shared_prompt(tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                                             hidden_dropout=0.0, attention_dropout=0.0))
    model.set_attn_implementation("sdpa")
    examples = _examples(2)
    got = score_candidates(model, RankedCollator(tok, BLOCK, 2, layout="shared_prompt")(examples))
    want = _reference_scores(model, tok, examples, 2)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-5, rtol=0)


def test_token_logprobs_gradient_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 2, 2, 5, 6, 6, 6])
    ids = torch.tensor([3, 1, 10, 0, 4, 4, 9])
    g = torch.randn(7, dtype=torch.float64)
    (token_logprobs(logits, rows, ids, chunk_rows=3) * g).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    (F.log_softmax(logits, -1)[rows, ids] * g).sum().backward()
    assert torch.allclose(got, logits.grad, atol=1e-6)
    assert got[1].abs().sum() == 0          # a row no target uses gets no gradient


def test_rows_are_capped_and_still_exact(tok):
    from clha.collate import assign_rows
    assert assign_rows([5, 5, 5], pack=True, max_row_tokens=None) == [0, 0, 0]
    assert assign_rows([5, 5, 5], pack=True, max_row_tokens=10) == [0, 0, 1]
    assert assign_rows([12, 3, 8], pack=True, max_row_tokens=10) == [0, 1, 2]
    assert assign_rows([4, 4, 4], pack=False, max_row_tokens=None) == [0, 1, 2]
    model = _llama(tok, "sdpa")
    examples = _examples(2)
    batch = RankedCollator(tok, BLOCK, 2, max_row_tokens=60)(examples)
    assert batch["input_ids"].shape[0] > 1
    got = score_candidates(model, batch)
    want = _reference_scores(model, tok, examples, 2)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-5, rtol=0)


def test_max_row_tokens_zero_packs_the_whole_batch_in_one_unpadded_row(tok):
    model = _llama(tok, "sdpa")
    examples = _examples(3)
    capped = RankedCollator(tok, BLOCK, 2, max_row_tokens=60)(examples)
    one = RankedCollator(tok, BLOCK, 2, max_row_tokens=0)(examples)
    assert capped["input_ids"].shape[0] > 1 and one["input_ids"].shape[0] == 1
    # one row holds every token once: no padding at all
    assert one["input_ids"].shape[1] == int((one["sequence_ids"] >= 0).sum()) == int(capped["attention_tokens"])
    got = score_candidates(model, one)
    want = _reference_scores(model, tok, examples, 2)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_row_tokens"):
        RankedCollator(tok, BLOCK, 2, max_row_tokens=-1)


def _reference_scores_with_eos(model, tok, examples, n):
    """Per-candidate passes over prompt + " " + response + EOS, the response cut to fit BLOCK (no EOS then)."""
    sums, counts = [], []
    for ex in examples:
        for k in range(n):
            pair = encode_pair(tok, render_prompt(ex.prefix[k]), ex.suffix[k], BLOCK)
            ids = pair.input_ids + ([tok.eos_token_id] if len(pair.input_ids) < BLOCK else [])
            logits = model(torch.tensor([ids])).logits[0]
            logp = F.log_softmax(logits.float(), dim=-1)
            P = len(pair.prompt_ids)
            token_logps = logp[P - 1:-1].gather(1, torch.tensor(ids[P:])[:, None])[:, 0]
            sums.append(token_logps.sum())
            counts.append(token_logps.numel())
    sums = torch.stack(sums).view(len(examples), n)
    counts = torch.tensor(counts).view(len(examples), n)
    return CandidateScores(sums, sums / counts, counts)


@pytest.mark.parametrize("layout,pack", LAYOUTS)
def test_append_eos_scores_the_eos_token_after_each_response(tok, layout, pack):
    model = _llama(tok, "sdpa")
    examples = _examples(2)
    plain = RankedCollator(tok, BLOCK, 2, layout=layout, pack=pack)(examples)
    batch = RankedCollator(tok, BLOCK, 2, layout=layout, pack=pack, append_eos=True)(examples)
    got = score_candidates(model, batch)
    want = _reference_scores_with_eos(model, tok, examples, 2)
    # one more scored token per response, and it is the EOS token
    assert torch.equal(got.token_counts, score_candidates(model, plain).token_counts + 1)
    assert torch.equal(got.token_counts, want.token_counts)
    assert torch.allclose(got.sum_logps, want.sum_logps, atol=1e-4, rtol=0)
    assert torch.allclose(got.mean_logps, want.mean_logps, atol=1e-5, rtol=0)


def test_append_eos_is_dropped_from_a_response_cut_to_fit(tok):
    from clha.collate import encode_example
    long_reply = "word " * 400          # far longer than BLOCK: cut, so it did not end here
    ex = RankedExample([[PROMPTER + "Hi", ASSISTANT]] * 2, [long_reply, "Short."], [1.0, 0.0], 0, {})
    enc = encode_example(tok, ex, BLOCK, 2, eos_id=tok.eos_token_id)
    assert len(enc.prompts[0]) + len(enc.responses[0]) == BLOCK
    assert enc.responses[0][-1] != tok.eos_token_id
    assert enc.responses[1][-1] == tok.eos_token_id
    assert enc.responses[1][:-1] == encode_example(tok, ex, BLOCK, 2).responses[1]


def test_append_eos_needs_an_eos_token(tok):
    class NoEos:
        eos_token_id = None
        pad_token_id = 0
    with pytest.raises(ValueError, match="no eos_token_id"):
        RankedCollator(NoEos(), BLOCK, 2, append_eos=True)

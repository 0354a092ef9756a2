"""Greedy generation (clha/generation.py) on tiny Llama models built from a config."""

import pytest
import torch

from clha.data.format import ASSISTANT, PROMPTER, render_prompt
from clha.data.tokenize import encode_pair, encode_prompt
from clha.generation import STOP_PATTERN, cut_response, generate_responses, generate_with_details


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models are far faster on one thread, and the machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from clha.testing.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny Llama whose weights are large enough that different prompts give different greedy outputs."""
    from clha.testing.tiny import build_causal_lm

    return _spread_weights(build_causal_lm(tokenizer, seed=0), seed=1)


def _spread_weights(lm, seed: int):
    """Redraw every matrix with std 0.15, so that different prompts give different greedy outputs; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lm.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    return lm.eval()


def _prompts():
    words = "the cat sat on a mat and we like to talk about bread rain chess music trees".split()
    prompts = []
    for i in range(7):
        turns = [PROMPTER + " ".join(words[: 2 + (i * 5) % 13])]
        if i % 3 == 1:
            turns += [ASSISTANT + " ".join(words[i: i + 4]), PROMPTER + "and " + words[i]]
        prompts.append(turns + [ASSISTANT])
    return prompts


# ---------------------------------------------------------------------------------------------- cut rules
@pytest.mark.parametrize("text, expected", [
    ("  Sure, here it is.  ", "Sure, here it is."),
    ("Paris.\n\nHuman: and Rome?", "Paris."),
    ("Paris. human: and Rome?", "Paris."),
    ("Paris. HUMAN: and Rome?", "Paris."),
    ("Fine.\n\nAssistant: again", "Fine."),
    ("Fine. ASSISTANT:", "Fine."),
    ("a Assistant: b Human: c", "a"),
    ("a Human: b Assistant: c", "a"),
    ("Human: straight away", ""),
    ("The human body: a guide", "The human body: a guide"),   # a colon not right after the word
    ("Humans: plural is not a tag", "Humans: plural is not a tag"),
    ("Human - no colon", "Human - no colon"),
    ("", ""),
    ("line one\n\nline two\n", "line one\n\nline two"),   # blank lines inside a reply are kept
])
def test_cut_response(text, expected):
    assert cut_response(text) == expected


def test_stop_pattern_is_case_insensitive():
    for tag in ("Human:", "human:", "hUmAn:", "Assistant:", "assistant:", "ASSISTANT:"):
        assert STOP_PATTERN.search("x " + tag)


# ------------------------------------------------------------------------------------------- generation
def test_input_order_and_batching_do_not_change_outputs(model, tokenizer):
    prompts = _prompts()
    lengths = [len(encode_prompt(tokenizer, render_prompt(p), 512)) for p in prompts]
    assert len(set(lengths)) > 3, "the prompts must have mixed lengths"
    one_at_a_time = [generate_responses(model, tokenizer, [p], max_new_tokens=24)[0] for p in prompts]
    assert len(set(one_at_a_time)) > 3, "the tiny model should answer different prompts differently"
    for batch_size in (3, 8):
        assert generate_responses(model, tokenizer, prompts, max_new_tokens=24, batch_size=batch_size) == one_at_a_time
    reversed_out = generate_responses(model, tokenizer, prompts[::-1], max_new_tokens=24, batch_size=3)
    assert reversed_out == one_at_a_time[::-1]


def test_deterministic(model, tokenizer):
    prompts = _prompts()[:4]
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=16) == \
        generate_responses(model, tokenizer, prompts, max_new_tokens=16)


class ForwardSpy:
    """Records the (unpadded) rows of every prefill forward and counts one-token decode forwards."""

    def __init__(self, model):
        self.prefill_rows, self.decode_steps, self.left_padded = [], 0, True
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] == 1:
            self.decode_steps += 1
            return
        mask = mask[:, -ids.shape[1]:]
        self.left_padded &= bool((mask[:, -1] == 1).all())
        self.prefill_rows += [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_prompt_ids_match_training_encoding_with_left_truncation(model, tokenizer, engine):
    block_size = 160   # prompts are cut from the left to 32 tokens
    long_prompt = [PROMPTER + "first question about bread " * 10, ASSISTANT + "an answer about rain " * 6,
                   PROMPTER + "the latest question about chess?", ASSISTANT]
    short_prompt = [PROMPTER + "hi", ASSISTANT]
    spy = ForwardSpy(model)
    try:
        generate_with_details(model, tokenizer, [short_prompt, long_prompt], block_size=block_size, max_new_tokens=4,
                              batch_size=2, engine=engine)
    finally:
        spy.close()
    rows = spy.prefill_rows
    assert spy.left_padded, "padding must be on the left"
    # Sorted longest first.
    assert rows[0] == encode_prompt(tokenizer, render_prompt(long_prompt), block_size)
    assert rows[1] == encode_prompt(tokenizer, render_prompt(short_prompt), block_size)
    assert len(rows[0]) == block_size - 128
    # The same ids the training collator puts before a response.
    assert rows[0] == encode_pair(tokenizer, render_prompt(long_prompt), "x", block_size).prompt_ids
    assert tokenizer.decode(rows[0]).endswith("the latest question about chess?\n\nAssistant:")


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_max_new_tokens_is_respected(model, tokenizer, engine):
    spy = ForwardSpy(model)
    try:
        gens = generate_with_details(model, tokenizer, _prompts()[:3], max_new_tokens=5, engine=engine)
    finally:
        spy.close()
    assert {g.stop for g in gens} == {"length"}
    assert spy.decode_steps == 4      # the prefill gives the first token, 4 steps the other 4


def test_no_pad_token_uses_eos(model, tokenizer):
    from clha.testing.tiny import build_tokenizer

    no_pad = build_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    prompts = _prompts()
    expected = generate_responses(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert generate_responses(model, no_pad, prompts, max_new_tokens=12, batch_size=4) == expected
    assert no_pad.pad_token_id is None, "the caller's tokenizer must not be changed"


def test_training_mode_restored(model, tokenizer):
    model.train()
    model.model.layers[0].eval()      # a sub-module deliberately in eval mode stays so
    try:
        generate_responses(model, tokenizer, _prompts()[:2], max_new_tokens=3)
        assert model.training and model.model.layers[1].training
        assert not model.model.layers[0].training
    finally:
        model.eval()
    generate_responses(model, tokenizer, _prompts()[:2], max_new_tokens=3)
    assert not model.training


def test_empty_and_bad_prompts(model, tokenizer):
    assert generate_responses(model, tokenizer, [], max_new_tokens=3) == []
    with pytest.raises(TypeError):
        generate_responses(model, tokenizer, ["\n\nHuman: hi\n\nAssistant:"], max_new_tokens=3)
    with pytest.raises(ValueError):
        generate_responses(model, tokenizer, [["no marker", ASSISTANT]], max_new_tokens=3)
    with pytest.raises(ValueError):
        generate_responses(model, tokenizer, _prompts()[:1], batch_size=0)


def test_stops_early_at_stop_string(tokenizer):
    """A tiny model over-fitted to one dialogue writes 'ok sure Human: ...': the response is cut and the batch
    stops a few tokens after the stop string instead of running to max_new_tokens."""
    from clha.testing.tiny import build_causal_lm

    lm = build_causal_lm(tokenizer, seed=0)
    turns = [PROMPTER + "hi", ASSISTANT]
    target = "ok sure Human: more more more more more more more more"
    ids = torch.tensor([encode_pair(tokenizer, render_prompt(turns), target, 256).input_ids])
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lm.eval()
    calls = []
    hook = lm.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = generate_responses(lm, tokenizer, [turns, list(turns)], max_new_tokens=100)
    finally:
        hook.remove()
    assert out == ["ok sure", "ok sure"]
    assert len(calls) < 40, f"generation ran {len(calls)} steps; the stop string should end it early"
    assert [g.stop for g in generate_with_details(lm, tokenizer, [turns], max_new_tokens=100)] == ["stop_string"]


def test_stop_reasons(model, tokenizer):
    """The random tiny model never writes EOS: every response runs to the limit. With EOS declared to be the
    token it writes first, generation ends at once with an empty response."""
    prompts = _prompts()[:3]
    assert {g.stop for g in generate_with_details(model, tokenizer, prompts, max_new_tokens=6)} == {"length"}
    first = model.generate(input_ids=torch.tensor([encode_prompt(tokenizer, render_prompt(prompts[0]), 512)]),
                           max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, -1].item()
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first]
    try:
        gens = generate_with_details(model, tokenizer, prompts[:1], max_new_tokens=6)
    finally:
        model.generation_config.eos_token_id = saved
    assert gens[0].stop == "eos" and gens[0].response == ""


def test_fast_engine_matches_transformers_generate(model, tokenizer):
    from clha.generation import fast_engine_supported

    assert fast_engine_supported(model)
    prompts = _prompts() * 2
    for batch_size in (1, 5, 14):
        fast = generate_with_details(model, tokenizer, prompts, max_new_tokens=20, batch_size=batch_size,
                                     engine="fast")
        hf = generate_with_details(model, tokenizer, prompts, max_new_tokens=20, batch_size=batch_size, engine="hf")
        assert fast == hf


def test_prefill_groups_cover_rows_with_little_padding():
    from clha.generation import PREFILL_MAX_PADDING, _prefill_groups

    lengths = [384, 380, 301, 300, 299, 120, 119, 118, 40, 3, 2, 1]
    groups = _prefill_groups(lengths)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    for start, end in groups:
        positions = lengths[start] * (end - start)
        assert end - start == 1 or positions - sum(lengths[start:end]) <= PREFILL_MAX_PADDING * positions


@pytest.mark.parametrize("batch_size", [14, 4, 3])
def test_rows_leaving_the_batch_keep_their_cache_aligned(model, tokenizer, batch_size):
    """With EOS declared to be a token the model writes mid-response, rows finish at different steps; with a
    batch smaller than the prompt list, new prompts are prefilled into the freed slots while other rows are
    mid-response. Every row must still decode exactly what it decodes alone (cache rows, masks and positions
    moved together, new rows right-aligned with the running ones, the preallocated cache written in place)."""
    prompts = _prompts() * 2
    alone_ids = []
    for turns in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, render_prompt(turns), 512)])
        out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone_ids.append(out[0, ids.shape[1]:].tolist())
    # the token row 0 writes 5th becomes EOS: rows stop where they first write it, at different steps
    eos = alone_ids[0][4]
    ends = {eos, tokenizer.eos_token_id}             # the tokenizer's EOS still ends a row too
    stops_at = [next((i for i, t in enumerate(ids) if t in ends), None) for ids in alone_ids]
    assert len(set(stops_at)) >= 3, f"want rows finishing at different steps, got {stops_at}"
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos]
    try:
        batched = generate_with_details(model, tokenizer, prompts, max_new_tokens=16, batch_size=batch_size,
                                        engine="fast")
        alone = [generate_with_details(model, tokenizer, [p], max_new_tokens=16, engine="hf")[0] for p in prompts]
    finally:
        model.generation_config.eos_token_id = saved
    assert batched == alone
    assert [g.stop == "eos" for g in batched] == [s is not None for s in stops_at]


def test_preallocated_layer_appends_in_place_and_selects_rows():
    from clha.generation import _preallocated_layer_class

    layer_class = _preallocated_layer_class()
    keys, values = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    keys_buffer, values_buffer = torch.zeros(3, 2, 6, 5), torch.zeros(3, 2, 6, 5)   # room for 6 positions
    keys_buffer[:, :, :4], values_buffer[:, :, :4] = keys, values
    layer = layer_class(keys_buffer, values_buffer, length=4)
    buffer = layer._k
    step_k, step_v = torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)
    k, v = layer.update(step_k, step_v)
    assert layer._k is buffer                       # written in place, no new allocation
    assert torch.equal(k, torch.cat([keys, step_k], dim=2)) and torch.equal(v, torch.cat([values, step_v], dim=2))
    assert layer.get_seq_length() == 5
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, torch.cat([keys, step_k], dim=2)[[2, 0]])
    k, v = layer.update(step_k[:2], step_v[:2])     # fills the capacity exactly
    k, v = layer.update(step_k[:2], step_v[:2])     # one more than planned: the buffer grows
    expected = torch.cat([keys[[2, 0]], step_k[[2, 0]], step_k[:2], step_k[:2]], dim=2)
    assert torch.equal(k, expected) and layer.get_seq_length() == 7


def _tiny_other_arch(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    if arch == "gpt2":   # learned absolute positions, fused qkv, no GQA
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                        bos_token_id=None, eos_token_id=None))
    else:                # rotary positions, grouped-query attention with biases
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    return _spread_weights(lm, seed=0)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_continuous_batching_matches_generate_on_other_architectures(tokenizer, arch):
    """The fast engine on GPT-2 and Qwen2: with rows finishing at different steps and a batch of 3 over 7 prompts
    (refills mid-response), every response and stop reason equals transformers' generate on the prompt alone."""
    from clha.generation import fast_engine_supported

    lm = _tiny_other_arch(arch, len(tokenizer))
    assert fast_engine_supported(lm)
    prompts = _prompts()
    first = generate_with_details(lm, tokenizer, prompts[:1], max_new_tokens=16, engine="hf")[0]
    ids = tokenizer(first.response, add_special_tokens=False)["input_ids"]
    lm.generation_config.eos_token_id = [ids[min(4, len(ids) - 1)]]   # a token the model writes mid-response
    alone = [generate_with_details(lm, tokenizer, [p], max_new_tokens=16, engine="hf")[0] for p in prompts]
    assert len({g.stop for g in alone}) >= 2, "want rows that stop at EOS and rows that run to the limit"
    assert generate_with_details(lm, tokenizer, prompts, max_new_tokens=16, batch_size=3, engine="fast") == alone


def test_zero3_placeholder_parameters_fall_back_to_generate(model, tokenizer, monkeypatch):
    """Under DeepSpeed ZeRO-3 a rank holds placeholders (parameters with `ds_numel`, or empty tensors) instead of
    the weights: the fast engine is not used and `model.generate` gives the responses."""
    import copy

    from clha import generation

    prompts = _prompts()[:3]
    expected = [g.response for g in generate_with_details(model, tokenizer, prompts, max_new_tokens=12,
                                                           engine="hf")]
    zero3 = copy.deepcopy(model)
    weight = zero3.get_input_embeddings().weight
    weight.ds_numel = weight.numel()        # what DeepSpeed sets on a partitioned parameter (its data gathered here)
    assert generation.has_placeholder_parameters(zero3) and not generation.fast_engine_supported(zero3)
    assert generation.fast_engine_supported(model)

    def no_fast_engine(*args, **kwargs):
        raise AssertionError("the fast engine ran on a model with ZeRO-3 placeholders")

    calls = []
    real_generate = zero3.generate
    monkeypatch.setattr(generation, "_fast_generate", no_fast_engine)
    monkeypatch.setattr(zero3, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    assert generate_responses(zero3, tokenizer, prompts, max_new_tokens=12) == expected
    assert calls
    with pytest.raises(ValueError, match="ZeRO-3 placeholder parameters"):
        generate_with_details(zero3, tokenizer, prompts, max_new_tokens=12, engine="fast")
    # an empty tensor standing in for a partitioned weight counts too
    empty = copy.deepcopy(model)
    empty.register_parameter("partitioned", torch.nn.Parameter(torch.empty(0)))
    assert generation.has_placeholder_parameters(empty) and not generation.fast_engine_supported(empty)


# ------------------------------------------------------------------------------ stop strings, checked cheaply
def _stopped_every_step(tokenizer, ids):
    """The plain rule: decode the generated tail after every token (what the engines did before the prefilter)."""
    from clha.generation import _TAIL_TOKENS

    return bool(STOP_PATTERN.search(tokenizer.decode(ids[-_TAIL_TOKENS:], skip_special_tokens=True)))


def _stop_pieces(tokenizer):
    """Token runs that build stop strings in pieces (split inside words, any case, a special token between the word
    and its ':'), near misses, multi-byte characters and filler, for random token streams."""
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pieces = [enc(t) for t in ("Hu", "man", "hu", "MAN", "Human", " Human", "Assist", "ant", "assistant", "ASSIST",
                               "ANT", ":", " :", "Humans", "note: x", "é", "日本", "🙂", "ok", " sure", "\n\n",
                               "Human:", " Assistant:")]
    pieces += [[tokenizer.eos_token_id], [tokenizer.pad_token_id], [2], [3]]     # special / marker tokens
    return pieces


def test_stop_token_prefilter_agrees_with_decoding_every_step(tokenizer):
    """Random token streams from the tiny tokenizer (stop strings split across tokens, a special token between the
    word and its ':', EOS in the middle, a ':' as the very last token, random ids): the first step at which the
    prefiltered check says "stopped" is the first step at which decoding the tail after every token finds a stop
    string, and it decodes far less."""
    import random

    from clha.generation import StopTokens

    rng = random.Random(0)
    pieces = _stop_pieces(tokenizer)
    stops, split = 0, 0
    for trial in range(400):
        ids = []
        while len(ids) < 48:
            ids += rng.choice(pieces) if rng.random() < 0.6 else [rng.randrange(len(tokenizer))]
        ids = ids[:48]
        expected = next((n for n in range(1, len(ids) + 1) if _stopped_every_step(tokenizer, ids[:n])), None)
        check = StopTokens(tokenizer)
        got = next((n for n in range(1, len(ids) + 1) if check.stopped(ids[:n])), None)
        assert got == expected, (trial, ids, tokenizer.decode(ids))
        if expected is not None:
            stops += 1
            word = tokenizer.decode(ids[expected - 1:expected], skip_special_tokens=True)
            split += word.strip() == ":"          # the ':' came as its own token, the word before it
    # the streams exercise the rule: many stop, many of those with the stop string split across tokens
    assert 100 < stops < 380 and split > 50, (stops, split)
    # decoding only at ':' tokens: what the check decodes on a long stream with two colons and no stop string
    decoded = []
    real_decode = tokenizer.decode
    counting = StopTokens(type("Spy", (), {"decode": lambda self, *a, **k: decoded.append(a[0]) or
                                           real_decode(*a, **k)})())
    text = "the cat sat on a mat: we like to talk about bread rain chess music trees " * 2
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not any(counting.stopped(plain[:n]) for n in range(1, len(plain) + 1))
    tails = [ids for ids in decoded if len(ids) > 1]
    assert len(tails) == 2, "only the two steps that wrote a ':' decode the tail"
    assert len(decoded) - len(tails) == len(set(plain)), "each distinct token is decoded alone once"


def test_stop_on_strings_marks_rows_when_decoding_every_step_would(tokenizer):
    """The hf engine's criterion, called after every generate step on a batch of random streams (left-padded
    prompts before them), marks each row done at the step where decoding the tail every step first finds a stop
    string, and keeps it done."""
    import random

    from clha.generation import StopOnStrings

    rng = random.Random(1)
    pieces = _stop_pieces(tokenizer)
    rows, length, width = 24, 40, 5
    streams = []
    for _ in range(rows):
        ids = []
        while len(ids) < length:
            ids += rng.choice(pieces) if rng.random() < 0.6 else [rng.randrange(len(tokenizer))]
        streams.append(ids[:length])
    prompt = torch.full((rows, width), tokenizer.pad_token_id)
    ids = torch.cat([prompt, torch.tensor(streams)], dim=1)
    first = [next((n for n in range(1, length + 1) if _stopped_every_step(tokenizer, s[:n])), None) for s in streams]
    assert len({f for f in first if f}) > 3 and None in first, first
    criterion = StopOnStrings(tokenizer, width, rows)
    for n in range(1, length + 1):
        done = criterion(ids[:, :width + n])
        assert done.tolist() == [f is not None and f <= n for f in first], n
    # called after several new tokens at once, it decodes the tail of every row that got a ':' among them, as
    # decoding every row's tail at that call would
    late = StopOnStrings(tokenizer, width, rows)
    assert late(ids[:, :width + 1]).tolist() == [f == 1 for f in first]
    tails = [_stopped_every_step(tokenizer, s) for s in streams]
    assert late(ids).tolist() == [f == 1 or t for f, t in zip(first, tails)]
    assert any(t != (f is not None) for f, t in zip(first, tails))     # some stop strings left the tail since


class ScriptedPicker:
    """A picker (`clha.fast_engine.Picker`) that writes a fixed token script per prompt, whatever the logits."""

    def __init__(self, scripts):
        self.scripts, self.count = scripts, [0] * len(scripts)

    def __call__(self, logits, rows):
        out = []
        for r in rows:
            script = self.scripts[r]
            out.append(script[min(self.count[r], len(script) - 1)])
            self.count[r] += 1
        return torch.tensor(out, device=logits.device)


@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize("batch_size", [2, 7])
def test_engines_stop_where_decoding_every_step_stops(model, tokenizer, engine, batch_size):
    """Both engines on scripted token streams: a stop string split across tokens, one with EOS right before its
    ':', one whose ':' is the last allowed token and one whose ':' comes one token too late, one with a special
    token between the word and its ':', colons that start nothing, multi-byte characters. Responses and stop
    reasons are those of decoding the tail after every token."""
    from clha.data.tokenize import encode_prompt as enc_prompt
    from clha.generation import cut_response, generate_from_ids

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos, limit = tokenizer.eos_token_id, 12
    word = enc("assistant")
    filler = (enc("ok sure, rain") + enc(" ") * limit)[:limit - 1 - len(word)]     # then the word, ':' last
    scripts = [
        enc("ok ") + enc("Hu") + enc("man") + enc(":") + enc(" more text here"),            # split stop string
        enc("fine ") + enc("Assist") + enc("ant") + [eos] + enc(":") + enc(" x"),           # EOS before its ':'
        filler + word + enc(":") + enc(" x"),                                               # ':' at the limit
        filler + enc(" ") + word + enc(":") + enc(" x"),                                    # ':' one too late
        enc("yes HUMAN") + [tokenizer.pad_token_id] + enc(":") + enc(" zz"),                # special token between
        enc("note: a: b: c:") + enc(" " * 20),                                              # colons, no stop
        enc("é🙂") + enc("Human") + enc(":") + enc("!"),                                     # multi-byte, then stop
    ]
    assert len(scripts[2][:limit]) == limit and tokenizer.decode(scripts[2][:limit]).endswith("assistant:")
    assert tokenizer.decode(scripts[3][:limit]).endswith("assistant")

    expected = []
    for script in scripts:
        ids, stop = [], "length"
        for token in script[:limit]:
            if token == eos:
                stop = "eos"
                break
            ids.append(token)
            if _stopped_every_step(tokenizer, ids):
                stop = "stop_string"
                break
        expected.append((cut_response(tokenizer.decode(ids, skip_special_tokens=True)), stop))
    assert [s for _, s in expected] == ["stop_string", "eos", "stop_string", "length", "stop_string", "length",
                                        "stop_string"]

    prompts = [enc_prompt(tokenizer, render_prompt(p), 512) for p in _prompts()]
    gens = generate_from_ids(model, tokenizer, prompts, limit, batch_size, False, engine,
                             pick=ScriptedPicker(scripts))
    assert [(g.response, g.stop) for g in gens] == expected

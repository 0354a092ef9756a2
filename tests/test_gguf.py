"""Loading a policy / reward backbone from a GGUF file.

A module-scoped fixture builds a tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, untied
output head) and a byte-level BPE tokenizer (`clha.testing.tiny.build_tokenizer`, 300 tokens), then writes both into ONE
GGUF file with the `gguf` package's `GGUFWriter`, the way llama.cpp's `convert_hf_to_gguf.py` does: llama.*
hyper-parameters, a "gpt2" (byte-level BPE) tokenizer with tokens / token types / merges / eos / pad ids, f32
tensors under the GGUF names (token_embd, blk.N.attn_q ..., output_norm, output) and the q/k projections permuted
as llama.cpp permutes them (transformers un-permutes on load). The folder holds nothing but that file, so every
model, config and tokenizer below comes from the GGUF metadata and tensors.

Covered:
* `clha.loading.gguf_load_kwargs` / `drop_gguf_quantizer`: the kwargs ask transformers to de-quantize, and the
  drop turns a model still carrying the GGUF quantizer (plain `gguf_file=` load) into one `save_pretrained` takes.
* `clha.loading.load_policy`: tokenizer ids and logits equal the source model's, no quantizer, saves and reloads
  as an ordinary checkpoint with the same logits.
* `clha.eval.inputs.load_policy` (config from the CLI parser): same logits, eval mode, no quantizer.
* `clha.rm.model.load_backbone` -> `save_reward_model` -> `clha.rm.scoring.load_reward_model`: the backbone
  holds the GGUF weights, and scores are finite and identical before and after the save.
* a GGUF file name that is not in the folder: `InputError` naming it, from all three loaders.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

gguf = pytest.importorskip("gguf")

torch.set_num_threads(1)

GGUF_NAME = "tiny-llama.f32.gguf"
TEXTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt.",
    "The quick brown fox jumps over the lazy dog <|endoftext|>",
]
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 256


def _llama_cpp_permute(weights, n_head: int, n_head_kv: int):
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rotary halves -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tokenizer_metadata(tokenizer):
    """(tokens by id, token types, merges "a b") of a byte-level BPE `PreTrainedTokenizerFast`."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [None] * len(tokenizer)
    for token, index in spec["model"]["vocab"].items():
        tokens[index] = token
    special = set()
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        if added["special"]:
            special.add(added["id"])
    assert None not in tokens, "the vocabulary has holes"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [int(gguf.TokenType.CONTROL) if i in special else int(gguf.TokenType.NORMAL) for i in range(len(tokens))]
    return tokens, types, merges


def _write_gguf(path, model, tokenizer) -> None:
    import numpy as np

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))

    tokens, types, merges = _tokenizer_metadata(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    sd = {k: v.detach().to(torch.float32).numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        writer.add_tensor(blk + "attn_q.weight", _llama_cpp_permute(
            sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads, cfg.num_attention_heads))
        writer.add_tensor(blk + "attn_k.weight", _llama_cpp_permute(
            sd[hf + "self_attn.k_proj.weight"], cfg.num_attention_heads, cfg.num_key_value_heads))
        writer.add_tensor(blk + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(blk + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(blk + "ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(blk + "ffn_up.weight", sd[hf + "mlp.up_proj.weight"])
        writer.add_tensor(blk + "ffn_down.weight", sd[hf + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    """(folder holding only the GGUF file, the HF model it was written from, the tokenizer, fixed input ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clha.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=300)
    # initializer_range 0.1 (not 0.02): logits of a few units, so a weight in the wrong place shows plainly
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=CONTEXT, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf_model")
    _write_gguf(folder / GGUF_NAME, model, tokenizer)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    return {"dir": str(folder), "model": model, "tokenizer": tokenizer, "ids": ids}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _reference_logits(src, dtype):
    """Logits of the source HF model run in `dtype` (the loaders cast the f32 GGUF tensors the same way)."""
    model = src["model"] if dtype == torch.float32 else copy.deepcopy(src["model"]).to(dtype)
    return _logits(model, src["ids"])


def _assert_plain_model(model):
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)


# ------------------------------------------------------------------------------------------------ helpers

def test_gguf_load_kwargs_ask_for_a_dequantized_model():
    from transformers import GgufConfig

    from clha.loading import gguf_load_kwargs

    assert gguf_load_kwargs(None) == {}
    assert gguf_load_kwargs("") == {}
    kwargs = gguf_load_kwargs(GGUF_NAME)
    assert kwargs["gguf_file"] == GGUF_NAME
    qc = kwargs["quantization_config"]
    assert isinstance(qc, GgufConfig) and qc.dequantize is True and qc.gguf_file == GGUF_NAME


def test_drop_gguf_quantizer_makes_a_plain_gguf_load_serializable(gguf_source, tmp_path):
    """A bare `gguf_file=` load keeps transformers' GGUF quantizer, which refuses to save; the drop removes it."""
    from transformers import AutoModelForCausalLM

    from clha.loading import drop_gguf_quantizer as _drop_gguf_quantizer

    model = AutoModelForCausalLM.from_pretrained(gguf_source["dir"], gguf_file=GGUF_NAME, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is not None, "transformers no longer keeps the GGUF quantizer"
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    _drop_gguf_quantizer(model)
    _assert_plain_model(model)
    model.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in saved_config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, gguf_source["ids"]), _reference_logits(gguf_source, torch.float32),
                               atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ policy: trainer

def test_trainer_load_policy_from_gguf_matches_source_and_saves(gguf_source, tmp_path):
    from transformers import AutoModelForCausalLM

    from clha.loading import load_policy, resolve_dtype

    model, tokenizer = load_policy(gguf_source["dir"], gguf_file=GGUF_NAME, dtype_name="auto")
    dtype = resolve_dtype("auto")   # float32 on a CPU-only machine
    assert model.dtype == dtype
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (HIDDEN, LAYERS, HEADS, KV_HEADS, FFN,
                                                       len(gguf_source["tokenizer"]))
    _assert_plain_model(model)

    # the tokenizer rebuilt from the GGUF metadata encodes like the one it was written from
    source_tok = gguf_source["tokenizer"]
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == source_tok(text)["input_ids"]
    assert tokenizer.eos_token == source_tok.eos_token and tokenizer.pad_token_id == source_tok.pad_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id

    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    assert torch.equal(ids, gguf_source["ids"])
    logits = _logits(model, ids)
    atol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits, _reference_logits(gguf_source, dtype), atol=atol, rtol=0)

    out = tmp_path / "policy"
    model.save_pretrained(out)   # refused by transformers if the GGUF quantizer were still attached
    tokenizer.save_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype)
    _assert_plain_model(reloaded)
    torch.testing.assert_close(_logits(reloaded, ids), logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ policy: evaluation

def test_evaluation_load_policy_from_gguf(gguf_source, tmp_path):
    from clha.eval.config import parse_config
    from clha.eval.inputs import load_policy

    stage, cfg = parse_config(["generate", "--model_path", gguf_source["dir"], "--out_dir", str(tmp_path / "eval"),
                               "--gguf_file", GGUF_NAME])
    assert stage == "generate" and cfg.gguf_file == GGUF_NAME
    model, tokenizer = load_policy(cfg, torch.device("cpu"))
    assert not model.training
    assert model.dtype == torch.float32   # dtype auto on the CPU
    _assert_plain_model(model)
    assert tokenizer(TEXTS[0])["input_ids"] == gguf_source["ids"][0].tolist()
    torch.testing.assert_close(_logits(model, gguf_source["ids"]), _reference_logits(gguf_source, torch.float32),
                               atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path / "saved")   # a dense model: serializable


# ------------------------------------------------------------------------------------------------ reward backbone

def test_reward_backbone_from_gguf_saves_and_scores_the_same(gguf_source, tmp_path):
    from clha.data.format import ASSISTANT, PROMPTER
    from clha.rm.scoring import HFRewardScorer, load_reward_model
    from clha.rm.config import CONFIG_FILE
    from clha.rm.model import load_backbone, make_scorer, save_reward_model

    model, tokenizer = load_backbone(gguf_source["dir"], GGUF_NAME)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.dtype == torch.float32
    _assert_plain_model(model)

    # the transformer body holds the GGUF weights: hidden states equal the source model's
    with torch.no_grad():
        got = model.model(input_ids=gguf_source["ids"]).last_hidden_state
        want = gguf_source["model"].model(input_ids=gguf_source["ids"]).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    prompts = [[PROMPTER + "How do I bake bread?", ASSISTANT],
               [PROMPTER + "Tell me a joke.", ASSISTANT + "Why?", PROMPTER + "Go on.", ASSISTANT]]
    responses = ["Mix flour, water, yeast and salt.", "To get to the other side."]
    scorer = make_scorer(model, tokenizer, name="gguf-rm", max_length=128)
    assert isinstance(scorer, HFRewardScorer)
    before = scorer.score(prompts, responses)
    assert len(before) == 2 and all(torch.isfinite(torch.tensor(before)))

    out = save_reward_model(model, tokenizer, tmp_path / "rm", {"source": "gguf"}, max_length=128)
    assert (out / "config.json").is_file() and (out / CONFIG_FILE).is_file()
    saved_config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert saved_config["architectures"] == ["LlamaForSequenceClassification"]

    loaded = load_reward_model(out, device="cpu", dtype="float32", max_length=128)
    assert isinstance(loaded, HFRewardScorer)
    assert loaded.encode(prompts, responses) == scorer.encode(prompts, responses)
    after = loaded.score(prompts, responses)
    assert all(torch.isfinite(torch.tensor(after)))
    assert after == pytest.approx(before, abs=1e-5)


# ------------------------------------------------------------------------------------------------ missing file

def _trainer_load(folder, name):
    from clha.loading import load_policy

    return load_policy(folder, gguf_file=name, dtype_name="float32")


def _evaluation_load(folder, name):
    from clha.eval.config import EvalConfig
    from clha.eval.inputs import load_policy

    return load_policy(EvalConfig(model_path=folder, out_dir=folder, gguf_file=name), torch.device("cpu"))


def _backbone_load(folder, name):
    from clha.rm.model import load_backbone

    return load_backbone(folder, name)


@pytest.mark.parametrize("loader", [_trainer_load, _evaluation_load, _backbone_load],
                         ids=["trainer", "evaluation", "reward_backbone"])
def test_missing_gguf_file_is_an_input_error_naming_it(gguf_source, loader):
    from clha.errors import InputError

    with pytest.raises(InputError) as info:
        loader(gguf_source["dir"], "missing.Q4_0.gguf")
    assert "missing.Q4_0.gguf" in str(info.value)
    assert info.value.field == "gguf_file"
    assert info.value.path is not None and gguf_source["dir"].rstrip("/") in info.value.path

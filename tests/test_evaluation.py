"""HH-RLHF evaluation (clha/eval/, eval_hh/): BLEU, sharding/merging/resume, reports, bad inputs.

One end-to-end run of eval_hh/run_infer_main_dist.sh with 2 CPU processes (tiny policy, tiny reward models, a few
examples per subset); the resume, force and bad-input checks then run the stages in this process, standing in for
rank 0 and rank 1 of 2.
"""

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from clha.data.format import write_ranked
from clha.errors import InputError
from clha.eval.bleu import char_bleu, sentence_bleu, sigmoid, word_bleu, word_tokens
from clha.eval.compare import compare_main, compare_runs
from clha.eval.config import SUBSETS, EvalConfig
from clha.eval.inputs import check_reward_models, same_reward_model
from clha.eval.report import METRICS, render_markdown
from clha.eval.shards import ShardError, merge_shards, shard_path
from clha.eval.stages import main, run_generate, run_reward, run_score
from tests.conftest import REPO, make_ranked_rows

SIZES = {"harmless_base": 5, "helpful_base": 4, "helpful_online": 3, "helpful_rejection": 5}
MAX_NEW_TOKENS = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)      # as each launched process (OMP_NUM_THREADS=1); the machine is shared
    yield
    torch.set_num_threads(before)


class LocalProcess:
    """Stands in for accelerate's Accelerator as process `rank` of `world` (no process group)."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny policy whose greedy outputs vary by prompt, two different tiny reward models, four test files."""
    from clha.testing.tiny import build_causal_lm, build_tokenizer
    from clha.testing.tiny_reward import save_tiny_seqcls_reward_model

    root = tmp_path_factory.mktemp("eval_assets")
    tokenizer = build_tokenizer()
    lm = build_causal_lm(tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in lm.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    lm.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    save_tiny_seqcls_reward_model(root / "rm_eval", seed=1)
    save_tiny_seqcls_reward_model(root / "rm_train", seed=2)
    (root / "policy" / "clha_config.json").write_text(json.dumps({"reward_model": str(root / "rm_train")}))
    test_dir = root / "hh_test"
    test_dir.mkdir()
    for k, (subset, n) in enumerate(SIZES.items()):
        write_ranked(test_dir / f"{subset}.json", make_ranked_rows(n, seed=10 + k))
    return {"root": root, "policy": str(root / "policy"), "rm_eval": str(root / "rm_eval"),
            "rm_train": str(root / "rm_train"), "test_dir": str(test_dir)}


def _cfg(assets, out_dir, **kw) -> EvalConfig:
    values = dict(model_path=assets["policy"], test_dir=assets["test_dir"], out_dir=str(out_dir),
                  eval_reward_model=assets["rm_eval"], max_new_tokens=MAX_NEW_TOKENS, gen_batch_size=4,
                  reward_batch_size=4, name="t_2")
    values.update(kw)
    cfg = EvalConfig(**values)
    cfg.validate()
    return cfg


def _run_stages_locally(cfg, world=2, stages=("generate", "reward", "score")):
    """All ranks of each stage in turn (rank 0, the merging one, last)."""
    funcs = {"generate": run_generate, "reward": run_reward, "score": run_score}
    for stage in stages:
        for rank in reversed(range(world)):
            funcs[stage](cfg, LocalProcess(rank, world))


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """The shell entry point, 2 CPU processes, all three stages."""
    out = tmp_path_factory.mktemp("eval_run") / "t_2"
    env = dict(os.environ, MODEL_PATH=assets["policy"], TEST_DIR=assets["test_dir"],
               EVAL_REWARD_MODEL=assets["rm_eval"], NUM_PROCESSES="2", MAX_NEW_TOKENS=str(MAX_NEW_TOKENS),
               GEN_BATCH_SIZE="4", REWARD_BATCH_SIZE="4", OUT_DIR=str(out), MAIN_PROCESS_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not shutil.which("accelerate", path=env["PATH"]):
        pytest.skip("accelerate launcher not installed")
    proc = subprocess.run(["bash", str(REPO / "eval_hh" / "run_infer_main_dist.sh"), "t", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _copy_run(run_dir, tmp_path):
    dest = tmp_path / "t_2"
    shutil.copytree(run_dir, dest)
    return dest


# ================================================================================================ BLEU
def test_bleu_equals_nltk_sentence_bleu():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(0)
    words = "the cat sat on a mat and we like to talk about bread rain chess music trees , . !".split()
    pairs = [("The cat sat on the mat.", "The cat is on the mat."), ("", "anything"), ("x", ""),
             ("Sure! Here you go.", "Sure! Here you go."), ("ab", "abc"), ("no overlap", "qqq zzz")]
    for _ in range(150):
        pairs.append((" ".join(rng.choices(words, k=rng.randint(0, 30))),
                      " ".join(rng.choices(words, k=rng.randint(0, 30)))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # nltk warns about zero n-gram counts
        for hyp, ref in pairs:
            for tok in (list, word_tokens, str.split):
                assert sentence_bleu(tok(ref), tok(hyp)) == nltk_bleu.sentence_bleu([tok(ref)], tok(hyp)), (hyp, ref)
            # The reference code passed the strings themselves: nltk then works over characters.
            assert char_bleu(hyp, ref) == nltk_bleu.sentence_bleu([ref.strip()], hyp.strip())


def test_bleu_edge_values():
    assert char_bleu("same text here", "same text here") == 1.0
    assert word_bleu("", "a reference") == 0.0
    assert word_bleu("zzz", "a reference") == 0.0
    assert 0 < word_bleu("a b c", "a b c d e f") < 1e-70     # no 4-gram: ~0, as nltk without smoothing
    assert word_tokens("Hi, you!") == ["Hi", ",", "you", "!"]


# ===================================================================================== end to end
def test_every_example_scored_exactly_once(full_run):
    out, _ = full_run
    rows = _read_jsonl(out / "examples.jsonl")
    keys = [(r["subset"], r["index"]) for r in rows]
    assert keys == [(s, i) for s in SUBSETS for i in range(SIZES[s])]
    for stage in ("generate", "reward", "score"):
        for subset, n in SIZES.items():
            seen = []
            for rank in range(2):
                data = json.loads(shard_path(out, stage, subset, rank, 2).read_text())
                seen += [row["index"] for row in data["rows"]]
                assert [row["index"] for row in data["rows"]] == list(range(rank, n, 2))
            assert sorted(seen) == list(range(n))


def test_reports_agree_with_examples(full_run, assets):
    out, stdout = full_run
    rows = _read_jsonl(out / "examples.jsonl")
    report = json.loads((out / "report.json").read_text())
    for subset in SUBSETS:
        mine = [r for r in rows if r["subset"] == subset]     # plain means, not the module's summarise
        assert report["subsets"][subset]["n"] == len(mine) == SIZES[subset]
        for key, _, _ in METRICS:
            assert report["subsets"][subset][key] == pytest.approx(sum(r[key] for r in mine) / len(mine), abs=1e-9)
    for key, _, _ in METRICS:
        assert report["overall"][key] == pytest.approx(sum(r[key] for r in rows) / len(rows), abs=1e-9)
    markdown = (out / "report.md").read_text()
    assert markdown == render_markdown(report)
    assert render_markdown(report) in stdout
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in markdown.splitlines() if line.startswith("| ") and "---" not in line}
    for name, metrics in list(report["subsets"].items()) + [("**overall**", report["overall"])]:
        assert table[name] == [str(metrics["n"])] + [f"{metrics[k]:.2f}" for k, _, _ in METRICS]
    assert report["train_reward_model"] == assets["rm_train"] and report["same_reward_model"] is False
    assert (out / "reward_by_subset.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        # a plain logistic, not the module's own sigmoid (its values are checked by hand in test_reward_is_sigmoid_x100)
        assert r["reward"] == pytest.approx(100 / (1 + math.exp(-r["reward_logit"])))
        assert r["chosen_reward"] == pytest.approx(100 / (1 + math.exp(-r["chosen_reward_logit"])))
        assert r["bleu"] == pytest.approx(100 * char_bleu(r["response"], r["chosen"]))
        assert r["win"] == (100.0 if r["reward_logit"] > r["chosen_reward_logit"] else
                            50.0 if r["reward_logit"] == r["chosen_reward_logit"] else 0.0)
    assert any(r["bleu"] > 0 for r in rows) and len({r["response"] for r in rows}) > 5


def test_sharded_results_match_a_single_process(full_run, assets):
    """Generation and reward numbers of the 2-process run equal plain single-process calls."""
    from clha.data.format import read_ranked
    from clha.eval.inputs import load_policy
    from clha.generation import generate_responses
    from clha.rm.scoring import load_reward_model

    out, _ = full_run
    rows = [r for r in _read_jsonl(out / "examples.jsonl") if r["subset"] == "harmless_base"]
    prompts = [ex.prefix[0] for ex in read_ranked(Path(assets["test_dir"]) / "harmless_base.json")]
    model, tokenizer = load_policy(_cfg(assets, out), torch.device("cpu"))
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    assert [r["response"] for r in rows] == responses
    scores = load_reward_model(assets["rm_eval"], device="cpu", max_length=1024).score(prompts, responses)
    assert [r["reward_logit"] for r in rows] == pytest.approx(scores, abs=1e-4)


def test_lost_shard_is_redone_and_report_is_unchanged(full_run, assets, tmp_path):
    out = _copy_run(full_run[0], tmp_path)
    before = {name: (out / name).read_bytes() for name in ("report.md", "report.json", "examples.jsonl")}
    lost = shard_path(out, "generate", "helpful_base", 1, 2)
    lost.unlink()
    for name in before:
        (out / name).unlink()
    shards = sorted(p for p in (out / "shards").rglob("*.json") if p != lost)
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    _run_stages_locally(_cfg(assets, out))
    assert lost.exists()
    # Only the lost shard was redone (same content, so the later stages kept theirs too).
    assert {p: p.stat().st_mtime_ns for p in shards} == mtimes
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name


def test_stale_and_forced_shards_are_redone(full_run, assets, tmp_path):
    out = _copy_run(full_run[0], tmp_path)
    gen_shard = shard_path(out, "generate", "helpful_online", 0, 2)
    reward_shard = shard_path(out, "reward", "helpful_online", 0, 2)
    # A shard cut short by a crash (here: one row gone) is not complete: it is redone.
    data = json.loads(gen_shard.read_text())
    data["rows"] = data["rows"][:-1]
    gen_shard.write_text(json.dumps(data))
    reward_mtime = reward_shard.stat().st_mtime_ns
    run_generate(_cfg(assets, out), LocalProcess(0, 2))
    assert len(json.loads(gen_shard.read_text())["rows"]) == 2
    run_reward(_cfg(assets, out), LocalProcess(0, 2))
    assert reward_shard.stat().st_mtime_ns == reward_mtime
    # --force redoes a complete shard.
    run_reward(_cfg(assets, out, force=True), LocalProcess(0, 2))
    assert reward_shard.stat().st_mtime_ns != reward_mtime
    # Other settings (more new tokens) make every generation shard stale; merging refuses them.
    with pytest.raises(ShardError, match="stale"):
        run_reward(_cfg(assets, out, max_new_tokens=MAX_NEW_TOKENS + 1), LocalProcess(0, 2))


def test_resolved_dtype_and_device_are_recorded_and_never_mixed(full_run, assets, tmp_path, monkeypatch):
    """Fingerprints and reports hold the dtype a stage really ran in, not "auto": on the CPU "auto" is float32, so
    float32 shards are reused; a bfloat16 run regenerates them, and so would "auto" on a bf16-capable GPU."""
    from clha.eval.inputs import load_subset, resolved_precision
    from clha.eval.stages import generation_fingerprint

    out = _copy_run(full_run[0], tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["dtype"], report["settings"]["device"]) == ("float32", "cpu")
    assert report["settings"]["dtype_requested"] == "auto"
    assert "float32 on cpu" in (out / "report.md").read_text()
    shard = shard_path(out, "generate", "harmless_base", 0, 2)
    mtime = shard.stat().st_mtime_ns
    run_generate(_cfg(assets, out, dtype="float32"), LocalProcess(0, 2))      # the same precision: reused
    assert shard.stat().st_mtime_ns == mtime
    run_generate(_cfg(assets, out, dtype="bfloat16"), LocalProcess(0, 2))     # another precision: regenerated
    assert shard.stat().st_mtime_ns != mtime
    with pytest.raises(ShardError, match="stale"):                           # never merged with float32 shards
        run_reward(_cfg(assets, out, dtype="float32"), LocalProcess(0, 2))
    # "auto" resolves per device: bf16 on a CUDA device that supports it, so a GPU resume would not reuse
    # CPU shards (checked without a GPU: only the fingerprint is computed).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    examples = load_subset(assets["test_dir"], "harmless_base")
    auto = _cfg(assets, out)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolved_precision(auto, cuda) == {"dtype": "bfloat16", "device": "cuda"}
    assert generation_fingerprint(auto, "harmless_base", examples, cuda) != \
        generation_fingerprint(auto, "harmless_base", examples, cpu)
    assert generation_fingerprint(auto, "harmless_base", examples, cuda) == \
        generation_fingerprint(_cfg(assets, out, dtype="bfloat16"), "harmless_base", examples, cuda)
    assert generation_fingerprint(auto, "harmless_base", examples, cpu) == \
        generation_fingerprint(_cfg(assets, out, dtype="float32"), "harmless_base", examples, cpu)


def test_merge_fails_loudly_on_missing_or_duplicate_examples(full_run, assets, tmp_path):
    from clha.eval.inputs import load_subset
    from clha.eval.stages import generation_fingerprint

    out = _copy_run(full_run[0], tmp_path)
    examples = load_subset(assets["test_dir"], "harmless_base")
    fp = generation_fingerprint(_cfg(assets, out), "harmless_base", examples, torch.device("cpu"))
    assert [r["index"] for r in merge_shards(out, "generate", "harmless_base", 5, fp)] == [0, 1, 2, 3, 4]
    s0, s1 = (shard_path(out, "generate", "harmless_base", r, 2) for r in (0, 1))
    d0, d1 = json.loads(s0.read_text()), json.loads(s1.read_text())
    s1.write_text(json.dumps(dict(d1, rows=d1["rows"] + d0["rows"][:1])))
    with pytest.raises(ShardError, match="present twice: 0"):
        merge_shards(out, "generate", "harmless_base", 5, fp)
    s1.write_text(json.dumps(dict(d1, rows=d1["rows"][:1])))
    with pytest.raises(ShardError, match="missing: 3"):
        merge_shards(out, "generate", "harmless_base", 5, fp)
    s1.unlink()
    with pytest.raises(ShardError, match=r"ranks \[1\]"):
        merge_shards(out, "generate", "harmless_base", 5, fp)
    with pytest.raises(ShardError, match="stale"):
        merge_shards(out, "generate", "helpful_base", 4, fp)


def test_compare_runs(full_run, tmp_path, capsys):
    out = full_run[0]
    other = _copy_run(out, tmp_path / "b")
    text = compare_runs([str(out), str(other)], tmp_path / "cmp")
    assert text.count("| t_2 (") == 4      # same run name twice: told apart by folder
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert compare_main([str(tmp_path / "nowhere")]) == 2
    assert "report.json" in capsys.readouterr().err


# ===================================================================================== bad inputs
def _argv(assets, out, **kw):
    values = {"model_path": assets["policy"], "test_dir": assets["test_dir"], "out_dir": str(out),
              "eval_reward_model": assets["rm_eval"]}
    values.update(kw)
    return ["generate"] + [x for k, v in values.items() for x in (f"--{k}", str(v))]


def _error_of(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_test_file(assets, tmp_path, capsys):
    test_dir = tmp_path / "hh_test"
    shutil.copytree(assets["test_dir"], test_dir)
    (test_dir / "helpful_rejection.json").unlink()
    err = _error_of(_argv(assets, tmp_path / "out", test_dir=test_dir), capsys)
    assert str(test_dir / "helpful_rejection.json") in err
    assert not (tmp_path / "out").exists(), "nothing may be written before the inputs are checked"
    err = _error_of(_argv(assets, tmp_path / "out", test_dir=tmp_path / "nowhere"), capsys)
    assert str(tmp_path / "nowhere") in err


def test_empty_test_file(assets, tmp_path, capsys):
    test_dir = tmp_path / "hh_test"
    shutil.copytree(assets["test_dir"], test_dir)
    (test_dir / "helpful_online.json").write_text("")
    err = _error_of(_argv(assets, tmp_path / "out", test_dir=test_dir), capsys)
    assert str(test_dir / "helpful_online.json") in err and "no examples" in err


def test_checkpoint_without_tokenizer(assets, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors", "clha_config.json"):
        shutil.copy(Path(assets["policy"]) / name, ckpt / name)
    err = _error_of(_argv(assets, tmp_path / "out", model_path=ckpt), capsys)
    assert str(ckpt) in err and "tokenizer" in err
    err = _error_of(_argv(assets, tmp_path / "out", model_path=tmp_path / "no_such_ckpt"), capsys)
    assert str(tmp_path / "no_such_ckpt") in err and "does not exist" in err
    err = _error_of(_argv(assets, tmp_path / "out", eval_reward_model=tmp_path / "no_rm"), capsys)
    assert str(tmp_path / "no_rm") in err


def test_same_reward_model_is_refused_unless_allowed(assets, tmp_path, capsys):
    err = _error_of(_argv(assets, tmp_path / "out", eval_reward_model=assets["rm_train"]), capsys)
    assert "training reward model" in err and "--allow_same_reward_model" in err
    cfg = _cfg(assets, tmp_path / "out", eval_reward_model=assets["rm_train"], allow_same_reward_model=True)
    models = check_reward_models(cfg)
    assert models.same and models.train == assets["rm_train"]
    from clha.eval.report import build_report

    rows = [{"subset": "harmless_base", **{k: 1.0 for k, _, _ in METRICS}}]
    report = build_report(_cfg(assets, tmp_path, subsets=["harmless_base"], eval_reward_model=assets["rm_train"],
                               allow_same_reward_model=True), models, rows, 1, torch.device("cpu"))
    assert report["same_reward_model"] is True
    assert "evaluation reward model is the training reward model" in render_markdown(report)
    # Declared on the command line for a checkpoint without clha_config.json.
    cfg = _cfg(assets, tmp_path, train_reward_model=assets["rm_eval"] + "/")
    with pytest.raises(InputError, match="training reward model"):
        check_reward_models(cfg)


def test_same_reward_model_identity(tmp_path, assets):
    link = tmp_path / "link"
    link.symlink_to(assets["rm_eval"])
    copy = tmp_path / "oasst-rm-2-pythia-6.9b-epoch-1"
    shutil.copytree(assets["rm_eval"], copy)
    assert same_reward_model(assets["rm_eval"], str(link))
    assert same_reward_model(assets["rm_eval"], assets["rm_eval"] + "/")
    assert same_reward_model(assets["rm_eval"], str(copy))                 # a copy of the same files
    assert same_reward_model("OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1", str(copy))   # hub id vs local copy
    assert not same_reward_model(assets["rm_eval"], assets["rm_train"])
    assert not same_reward_model("OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1",
                                 "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5")


def test_plain_model_without_training_config(assets, tmp_path):
    """A base model folder (no clha_config.json): evaluated, training RM reported as unknown."""
    base = tmp_path / "base"
    shutil.copytree(assets["policy"], base)
    (base / "clha_config.json").unlink()
    cfg = _cfg(assets, tmp_path / "out", model_path=str(base), subsets=["helpful_online"], limit=2)
    _run_stages_locally(cfg, world=1)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train_reward_model"] is None and report["subsets"]["helpful_online"]["n"] == 2
    assert "training reward model: `unknown`" in (tmp_path / "out" / "report.md").read_text()


def test_script_usage_error():
    proc = subprocess.run(["bash", str(REPO / "eval_hh" / "run_infer_main_dist.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(), reason="needs a bf16 GPU")
def test_gpu_auto_runs_in_bf16_and_does_not_reuse_cpu_shards(assets, tmp_path):
    """On a GPU "auto" is bfloat16: shards written on the CPU (float32) are regenerated, the report says bfloat16 on
    cuda, and the reward logits are float32 (a float32 head on the bf16 reward model)."""
    out = tmp_path / "t_1"
    cfg = _cfg(assets, out, subsets=["harmless_base"])
    cpu, gpu = LocalProcess(0, 1), LocalProcess(0, 1)
    gpu.device = torch.device("cuda")
    run_generate(cfg, cpu)
    shard = shard_path(out, "generate", "harmless_base", 0, 1)
    cpu_fp = json.loads(shard.read_text())["fingerprint"]
    run_generate(cfg, gpu)
    assert json.loads(shard.read_text())["fingerprint"] != cpu_fp
    run_reward(cfg, gpu)
    report = run_score(cfg, gpu)
    assert (report["settings"]["dtype"], report["settings"]["device"]) == ("bfloat16", "cuda")
    logits = [r["reward_logit"] for r in _read_jsonl(out / "examples.jsonl")]
    assert any(x != float(torch.tensor(x).bfloat16().float()) for x in logits)


def test_single_process_launch_needs_no_process_group(tmp_path):
    """`run_infer_main_dist.sh` with NUM_PROCESSES=1 (its default on a machine without a GPU) launches one process:
    the evaluation's accelerator must not ask for a process group there (it used to die with 'Default process
    group has not been initialized' at the first collective)."""
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate launcher not installed")
    script = tmp_path / "one.py"
    script.write_text("import torch\nfrom clha.loading import make_accelerator\nacc = make_accelerator()\n"
                      "acc.wait_for_everyone()\n"
                      "print('gathered', acc.gather(torch.tensor([2.0])).tolist(), acc.num_processes)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([str(launcher), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gathered [2.0] 1" in proc.stdout


# ================================================================================================ reward values
def test_reward_is_sigmoid_x100_against_hand_values():
    """Reward = 100 * sigmoid(eval RM logit), for negative logits too; values to 40 digits from
    1 / (1 + e^-x) in decimal arithmetic, written out here."""
    from clha.data.format import ASSISTANT, PROMPTER
    from clha.eval.inputs import Example
    from clha.eval.stages import example_row

    hand = {0.0: 0.5, 2.0: 0.8807970779778824, -2.0: 0.11920292202211756, -1.0: 0.2689414213699951,
            0.5: 0.6224593312018546, -0.5: 0.37754066879814546, -30.0: 9.357622968839299e-14}
    for x, value in hand.items():
        assert sigmoid(x) == pytest.approx(value, rel=1e-12, abs=0), x
    assert sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0      # no overflow at either end
    ex = Example(index=3, line_num=4, prompt=[PROMPTER + "hi", ASSISTANT], chosen="hello")
    row = example_row("helpful_base", ex, {"response": "hey", "stop": "eos"},
                      {"reward_logit": -2.0, "chosen_reward_logit": -0.5},
                      {"bleu": 0.0, "bleu_words": 0.0, "response_words": 1})
    assert row["reward"] == pytest.approx(11.920292202211756, rel=1e-12)
    assert row["chosen_reward"] == pytest.approx(37.754066879814546, rel=1e-12)
    assert row["win"] == 0.0 and row["at_limit"] == 0.0


# ================================================================================================ stale shards
def test_complete_shard_with_an_old_fingerprint_is_not_current(tmp_path):
    from clha.eval.shards import shard_is_current, write_shard

    path = tmp_path / "helpful_base.rank0-of-2.json"
    rows = [{"index": i, "response": "r"} for i in (0, 2, 4)]
    write_shard(path, "generate", "helpful_base", 0, 2, "old-fingerprint", rows)
    assert shard_is_current(path, "old-fingerprint", [0, 2, 4])
    assert not shard_is_current(path, "new-fingerprint", [0, 2, 4])      # complete body, other fingerprint
    assert not shard_is_current(path, "old-fingerprint", [0, 2])         # other share


def test_shards_are_regenerated_after_the_checkpoint_changes(assets, tmp_path):
    """A checkpoint overwritten in place (same path, new weights) or a shard whose fingerprint is old: the next run
    regenerates the shard even though its body is complete."""
    policy = tmp_path / "policy"
    shutil.copytree(assets["policy"], policy)
    out = tmp_path / "run"
    cfg = _cfg(assets, out, model_path=str(policy), subsets=["helpful_online"])
    shard = shard_path(out, "generate", "helpful_online", 0, 2)
    run_generate(cfg, LocalProcess(0, 2))
    first = json.loads(shard.read_text())
    assert [r["index"] for r in first["rows"]] == [0, 2]
    # the same inputs: skipped
    mtime = shard.stat().st_mtime_ns
    run_generate(cfg, LocalProcess(0, 2))
    assert shard.stat().st_mtime_ns == mtime
    # an old fingerprint on a complete body: regenerated, with the current fingerprint
    shard.write_text(json.dumps(dict(first, fingerprint="0" * 20)))
    run_generate(cfg, LocalProcess(0, 2))
    assert json.loads(shard.read_text()) == first
    # the checkpoint retrained in place: new fingerprint, new responses
    from safetensors.torch import load_file, save_file

    weights = load_file(str(policy / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.2 if v.dim() == 2 else v for k, v in weights.items()},
              str(policy / "model.safetensors"), metadata={"format": "pt"})
    run_generate(cfg, LocalProcess(0, 2))
    second = json.loads(shard.read_text())
    assert second["fingerprint"] != first["fingerprint"]
    assert [r["response"] for r in second["rows"]] != [r["response"] for r in first["rows"]]

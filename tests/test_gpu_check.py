"""bench/gpu_check.py: the one-shot GPU check runs every section on the CPU with tiny shapes, guards each section,
and selects the CUDA tests of the suite."""

import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_check

# Checks that need no GPU and must pass on the CPU smoke run (bf16 on the CPU stands in for the GPU).
CPU_CHECK_PREFIXES = ("CPU bf16 autocast", "CPU bf16 weights", "fp32-master run", "fused log-prob backward",
                      "fp32 accumulation buffer", "bf16 buffer error")


def test_tiny_cpu_run_reports_every_section(repo_root, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OUT="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])))
    # --cpu-compile eager: the compiled step-time row traces with dynamo only (the default aot_eager also traces the
    # backward: about 12 s more CPU time)
    proc = subprocess.run([sys.executable, str(repo_root / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--cpu-compile", "eager", "--out", str(out)], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["finished"] and result["device"] == "cpu" and result["tiny"]
    sections = result["sections"]
    assert set(sections) == set(gpu_check.SECTIONS)
    assert all(sec["status"] for sec in sections.values())
    assert sections["cuda_tests"]["status"] == "skipped: no CUDA"
    for name in ("environment", "loss_parity", "grad_accumulation", "step_time", "generation"):
        assert sections[name]["status"] == "ok", (name, sections[name])
        assert not sections[name].get("errors"), sections[name]
    checks = result["checks"]
    for prefix in CPU_CHECK_PREFIXES:
        mine = [c for c in checks if c["name"].startswith(prefix)]
        assert mine and all(c["passed"] is True for c in mine), (prefix, mine)
    # GPU goals are recorded but not judged on the CPU
    goals = [c for c in checks if "(goal)" in c["name"]]
    assert goals and all(c["passed"] is None for c in goals)
    names = [f["name"] for f in result["figures"]]
    assert "trainer, FlexAttention" in names              # recorded as skipped, not silently left out
    step = sections["step_time"]["data"]
    ref, sdpa = step["reference (one forward per candidate, full log_softmax)"], step["trainer, SDPA + 4D mask"]
    assert ref["seconds_per_step"] > 0 and sdpa["seconds_per_step"] > 0
    assert all(x == x for x in ref["losses"] + sdpa["losses"])         # finite, no NaN
    # one more step of each under the profiler (CPU activity only here: no GPU time, no trace)
    for row in (ref, sdpa):
        prof = row["profile"]
        assert prof["wall_ms"] > 0 and prof["gpu_busy_ms"] == 0 and prof["top_self_cuda"] == []
        assert 0 < len(prof["top_self_cpu"]) <= gpu_check.PROFILE_TOP
        assert set(prof["gpu_ms_by_kind"]) == {k for k, _ in gpu_check.STEP_KERNEL_KINDS} | {"other"}
        names = {e["name"] for e in prof["top_self_cpu"]}
        assert names & {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear"}, names   # the model ran in it
    assert not list(out.glob("step_profile_*.json.gz"))
    # the compiled row: on the CPU the SDPA step under torch.compile, one graph for both batch lengths
    compiled = step["trainer, SDPA + 4D mask, torch.compile (eager; CPU stand-in)"]
    assert compiled["seconds_per_step"] > 0 and compiled["compile_seconds"] >= 0
    assert len(compiled["warmup_step_times"]) == gpu_check.TINY_WORK["step"]["compile_warmup"]
    assert all(x == x for x in compiled["losses"])
    assert compiled["dynamo"]["unique_graphs"] >= 1 and compiled["dynamo"]["recompiles"] == 0
    assert any(c["name"].startswith("trainer, SDPA + 4D mask, torch.compile") and "(goal)" in c["name"]
               for c in checks)
    gen_data = sections["generation"]["data"]
    gen = gen_data["results"]
    assert gen["stops"]["fast"]["length"] == gen["stops"]["hf"]["length"] == gpu_check.TINY_WORK["gen"]["prompts"]
    for label in (gpu_check.GEN_FAST, gpu_check.GEN_HF, gpu_check.GEN_PLAIN, gpu_check.GEN_PLAIN_SORTED_STOP):
        assert gen[label]["new_tokens_per_s"] > 0, label
    # the profile of one batch per variant (CPU activity only here): every model forward counted, decode steps
    # = new tokens - 1 (the first new token comes from the prefill)
    profile = gen_data["profile"]
    assert set(profile["variants"]) == {"fast_engine", "hf_engine", "plain_generate", "plain_generate_sorted_stop"}
    new_tokens = gpu_check.TINY_WORK["gen"]["profile_new_tokens"]
    for part, res in profile["variants"].items():
        assert res["decode_steps"] == new_tokens - 1 and res["forwards"]["prefill"] >= 1, (part, res["forwards"])
        assert res["wall_s"] > 0 and set(gpu_check.PROFILE_WATCH) < set(res["calls"])
        assert 0 < len(res["top_self_cpu"]) <= gpu_check.PROFILE_TOP and res["top_self_cuda"] == []
        assert res["per_decode_step"]["wall_ms"] > 0
    assert profile["variants"]["plain_generate"]["calls"]["aten::item"] >= new_tokens - 1   # generate's stop check
    table = (out / "gpu_check.md").read_text()
    assert "| section | figure | value |" in table and "PASS loss_parity: CPU bf16 autocast" in table
    assert (out / "gpu_check.log").read_text().count("== ") >= 2 * len(gpu_check.SECTIONS) - 1


def test_a_failing_or_slow_section_does_not_stop_the_others(tmp_path, monkeypatch):
    ctx = gpu_check.Context(tmp_path, "cpu", True, budget=60, argv=[])
    calls = []

    def boom(ctx):
        calls.append("boom")
        raise RuntimeError("broken on purpose")

    def slow(ctx):
        calls.append("slow")
        time.sleep(30)

    def fine(ctx):
        calls.append("fine")
        with ctx.part("inner"):
            raise ValueError("a failing part")
        ctx.check("a figure", 1.0, "<", 2.0)

    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "environment", boom)
    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "cuda_tests", slow)
    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "loss_parity", fine)
    monkeypatch.setitem(gpu_check.SECTION_LIMITS, "cuda_tests", 0.5)
    start = time.monotonic()
    for name in ("environment", "cuda_tests", "loss_parity"):
        gpu_check.run_section(ctx, name)
    assert time.monotonic() - start < 10
    assert calls == ["boom", "slow", "fine"]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["environment"]["status"] == "failed" and "broken on purpose" in sections["environment"]["error"]
    assert sections["cuda_tests"]["status"] == "timeout"
    assert sections["loss_parity"]["status"] == "partial" and "inner" in sections["loss_parity"]["errors"]
    assert "PASS loss_parity: a figure" in (tmp_path / "gpu_check.md").read_text()


def test_a_part_time_limit_fails_that_part_and_keeps_the_section_limit(tmp_path, monkeypatch):
    ctx = gpu_check.Context(tmp_path, "cpu", True, budget=60, argv=[])
    after = []

    def section(ctx):
        with ctx.part("compiled"):
            with gpu_check.part_time_limit(0.3, margin=0.1):
                time.sleep(10)
        after.append(time.monotonic())
        ctx.check("checked after the part", 1.0, "<", 2.0)
        time.sleep(10)                                  # the section's own limit (2 s) still stops this

    monkeypatch.setitem(gpu_check.SECTION_FUNCS, "step_time", section)
    monkeypatch.setitem(gpu_check.SECTION_LIMITS, "step_time", 2.0)
    start = time.monotonic()
    gpu_check.run_section(ctx, "step_time")
    assert after and after[0] - start < 1.5               # the part stopped at its own limit
    assert time.monotonic() - start < 5
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["step_time"]
    assert sec["status"] == "timeout" and sec["errors"]["compiled"].startswith("PartTimeout")
    assert "PASS step_time: checked after the part" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("nodeid, markers, reasons, wanted", [
    ("tests/test_x.py::test_scores_on_cuda", set(), [], True),
    ("tests/test_x.py::test_loss_bf16_matches_fp32", set(), [], True),
    ("tests/test_x.py::test_mixed_precision_default", set(), [], True),
    ("tests/test_x.py::test_anything", {"gpu"}, [], True),
    ("tests/test_x.py::test_anything", {"skipif"}, ["needs CUDA True"], True),
    ("tests/test_x.py::test_anything", {"skipif"}, ["needs the SmolLM2 package"], False),
    ("tests/test_x.py::test_collate", set(), [], False),
    ("tests/test_x.py::test_long_run_on_cuda", {"slow"}, [], False),
])
def test_cuda_test_selection(nodeid, markers, reasons, wanted):
    assert gpu_check.wants_test(nodeid, markers, reasons) is wanted


def test_pytest_verbose_lines_are_counted_even_when_cut_short():
    log = ("tests/test_a.py::test_one[llama] PASSED [ 25%]\n"
           "tests/test_a.py::test_two FAILED [ 50%]\n"
           "tests/test_b.py::test_gpu SKIPPED (needs CUDA) [ 75%]\n"
           "tests/test_b.py::test_cuda_mask ")
    outcomes = gpu_check.parse_pytest_verbose(log)
    assert outcomes == {"passed": ["tests/test_a.py::test_one[llama]"], "failed": ["tests/test_a.py::test_two"],
                        "skipped": ["tests/test_b.py::test_gpu"]}

"""bench/generate.py: timing float32 and bfloat16 in one run (`--dtypes`) and the ratios it reports."""

import json

import pytest

from bench import generate as bench_gen


def test_dtypes_parse_auto_from_the_cpu_flags_and_refuse_unknown_or_repeated_names(monkeypatch):
    assert bench_gen.parse_dtypes("float32,bfloat16") == ["float32", "bfloat16"]
    assert bench_gen.parse_dtypes(" bfloat16 ") == ["bfloat16"]
    monkeypatch.setattr(bench_gen, "cpu_has_bf16", lambda: True)
    assert bench_gen.parse_dtypes("auto") == ["float32", "bfloat16"]
    monkeypatch.setattr(bench_gen, "cpu_has_bf16", lambda: False)
    assert bench_gen.parse_dtypes("auto") == ["float32"]
    for bad in ("float32,int8", "float32,float32", ","):
        with pytest.raises(ValueError, match="--dtypes"):
            bench_gen.parse_dtypes(bad)


def test_dtype_ratios_put_our_bf16_against_the_fp32_reference_and_our_fp32():
    def side(tps, responses=None):
        return {"new_tokens_per_s": tps, "responses": responses}

    by = {"float32": {"reference": side(30.0), "ours": side(60.0, ["a", "b", "c", "d"])},
          "bfloat16": {"reference": side(50.0), "ours": side(105.0, ["a", "x", "c", "y"])}}
    r = bench_gen.dtype_ratios(by)
    assert (r["base"], r["fast"]) == ("float32", "bfloat16")
    assert r["ours_vs_reference_new_tokens"] == pytest.approx(105.0 / 30.0)      # 3.5x
    assert r["ours_vs_ours_new_tokens"] == pytest.approx(105.0 / 60.0)           # 1.75x
    assert r["ours_identical"] == 2


def test_both_dtypes_run_in_one_report_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "generate.json"
    assert bench_gen.main(["--num_prompts", "4", "--max_new_tokens", "6", "--dtypes", "float32,bfloat16",
                           "--skip_reward", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dtypes"] == ["float32", "bfloat16"] and set(report["generation_by_dtype"]) == set(report["dtypes"])
    fp32, bf16 = report["generation_by_dtype"]["float32"], report["generation_by_dtype"]["bfloat16"]
    assert report["generation"] == fp32
    assert fp32["identical_responses"] == 4                 # float32: our responses equal the reference's
    for g in (fp32, bf16):
        assert g["ours"]["positions"] < g["reference"]["positions"] and len(g["ours"]["responses"]) == 4
    ratios = report["dtype_ratios"]
    assert ratios["ours_vs_reference_new_tokens"] == pytest.approx(
        bf16["ours"]["new_tokens_per_s"] / fp32["reference"]["new_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "| bfloat16 | ours |" in printed and "ours in bfloat16 vs the reference in float32" in printed


def test_dtype_and_dtypes_together_are_refused(capsys):
    for argv in (["--dtype", "bfloat16", "--dtypes", "auto"], ["--compare_dtypes", "--dtypes", "float32"],
                 ["--compare_dtypes", "--dtype", "float32"]):
        with pytest.raises(SystemExit):
            bench_gen.main(argv + ["--num_prompts", "1"])
    assert "not both" in capsys.readouterr().err

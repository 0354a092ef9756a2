"""Torch threads per process: cores // local processes, whatever OMP_NUM_THREADS; CLHA_NUM_THREADS overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clha import threads
from clha.errors import InputError
from tests.conftest import REPO

# Each child sees exactly two cores (the development machine's count, whatever machine runs the test), then does
# what every entry point does first, and reports its torch threads.
CHILD = """
import json, os, sys
cpus = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, cpus)
import logging; logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import torch
from clha.threads import configure_threads
configure_threads()
print(json.dumps({"rank": os.environ["RANK"], "cores": len(cpus), "threads": torch.get_num_threads(),
                  "interop": torch.get_num_interop_threads(), "omp": os.environ["OMP_NUM_THREADS"]}))
"""


def launch(*envs):
    """Processes started at once, each with OMP_NUM_THREADS=8 and its own extra environment."""
    base = {k: v for k, v in os.environ.items() if k != "CLHA_NUM_THREADS"}
    base.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="8", LOCAL_WORLD_SIZE="2", WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=dict(base, **env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for env in envs]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.append((json.loads(stdout.strip().splitlines()[-1]), stderr))
    return out


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs os.sched_getaffinity (Linux) and two cores")
def test_two_processes_split_the_cores_whatever_omp_num_threads_unless_asked():
    """Ranks 0 and 1 of a 2-process launch on two cores (LOCAL_WORLD_SIZE=2) with OMP_NUM_THREADS=8 use one thread
    each; a third process, as rank 0 of another such launch with CLHA_NUM_THREADS=3, uses three and warns."""
    results = launch({"RANK": "0", "LOCAL_RANK": "0"}, {"RANK": "1", "LOCAL_RANK": "1"},
                     {"RANK": "0", "LOCAL_RANK": "0", "CLHA_NUM_THREADS": "3"})
    for report, _ in results[:2]:
        assert report["cores"] == 2
        assert report["threads"] == 1 and report["interop"] == 1 and report["omp"] == "1"
    # logged once, by rank 0, naming the inherited value it ignored
    (_, err0), (_, err1), (explicit, err_explicit) = results
    assert "torch threads per process: 1 (2 core(s) // 2 local process(es); inherited OMP_NUM_THREADS=8 ignored)" \
        in err0
    assert "torch threads per process" not in err1
    assert "exceed" not in err0
    # the explicit setting wins, and the oversubscription is warned about
    assert explicit["threads"] == 3 and explicit["omp"] == "3"
    assert "torch threads per process: 3 (CLHA_NUM_THREADS=3)" in err_explicit
    assert "2 local process(es) x 3 thread(s) exceed the 2 core(s) available" in err_explicit


def test_bad_setting_is_a_clear_error(monkeypatch, capsys):
    for value in ("0", "two", "-1"):
        monkeypatch.setenv("CLHA_NUM_THREADS", value)
        with pytest.raises(InputError, match="field 'CLHA_NUM_THREADS': must be a positive integer"):
            threads.configure_threads(exit_on_error=False)
    with pytest.raises(SystemExit) as info:
        threads.configure_threads()
    assert info.value.code == 2
    assert "error: field 'CLHA_NUM_THREADS': must be a positive integer" in capsys.readouterr().err


def test_local_processes_from_the_launcher(monkeypatch):
    for name in threads.LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert threads.local_processes() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert threads.local_processes() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.local_processes() == 2


def _load_script(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("entry", ["train/main.py", "train/train_reward_model.py", "eval_hh/evaluate.py"])
def test_every_entry_point_sets_threads_first(entry, monkeypatch):
    """Each command configures threads before it parses its arguments (so before any model or process group)."""
    calls = []

    def fake(exit_on_error=True):
        calls.append(entry)
        raise SystemExit(99)

    monkeypatch.setattr(threads, "configure_threads", fake)
    module = _load_script(REPO / entry)
    for mod in (module, sys.modules.get("clha.eval.stages")):      # where it was imported by name
        if mod is not None and hasattr(mod, "configure_threads"):
            monkeypatch.setattr(mod, "configure_threads", fake)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 99 and calls == [entry]

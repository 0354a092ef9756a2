import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CLHA_NUM_THREADS", "1")   # entry points run in-process or launched by tests: one thread

import torch  # noqa: E402

# Tiny test models gain nothing from a second thread, and OpenMP threads that spin against other processes make
# a busy machine many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def in_ci() -> bool:
    """CI sets CI=true (as GitHub Actions and most CI services do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_shared_data(*subpaths: str) -> Path:
    """../shared/data (and these folders in it), for the tests on the real HH-RLHF files. Missing, the test is
    skipped on a developer's machine; in CI, which promises the data beside the clone, it is an error."""
    missing = [p for p in [SHARED_DATA, *(SHARED_DATA / s for s in subpaths)] if not p.is_dir()]
    if missing:
        message = f"shared HH-RLHF data not found: {', '.join(map(str, missing))}"
        if in_ci():
            pytest.fail(f"{message} (CI=true: the CI run must provide ../shared/data)", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA


def pytest_runtest_setup(item):
    """`@pytest.mark.needs_shared_data("hh-rlhf", ...)`: see require_shared_data."""
    for mark in item.iter_markers(name="needs_shared_data"):
        require_shared_data(*mark.args)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A tiny Llama causal LM + byte-level BPE tokenizer saved as a Hugging Face folder."""
    from clha.testing.tiny import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"), seed=0)


def make_ranked_rows(num: int, n: int = 2, seed: int = 0):
    """Small ranked examples with varied prompt/response lengths and rewards (some gaps below 3)."""
    from clha.data.format import ASSISTANT, PROMPTER, RankedExample

    rng = random.Random(seed)
    words = "the cat sat on a mat and we like to talk about bread rain chess music trees".split()
    rows = []
    for i in range(num):
        turns = [PROMPTER + " ".join(rng.choices(words, k=rng.randint(3, 12)))]
        if rng.random() < 0.4:
            turns += [ASSISTANT + " ".join(rng.choices(words, k=rng.randint(2, 8))),
                      PROMPTER + " ".join(rng.choices(words, k=rng.randint(2, 6)))]
        turns.append(ASSISTANT)
        suffix = [" ".join(rng.choices(words, k=rng.randint(1, 10))) for _ in range(n)]
        reward = sorted((round(rng.uniform(-6, 6), 3) for _ in range(n)), reverse=True)
        rows.append(RankedExample([list(turns) for _ in range(n)], suffix, reward, 0,
                                  {"source": "test", "line_num": i + 1}))
    return rows

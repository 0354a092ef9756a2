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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"HH-RLHF data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A tiny Llama causal LM + byte-level BPE tokenizer saved as a Hugging Face folder."""
    from clha.tiny import save_tiny_causal_lm

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

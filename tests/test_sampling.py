"""Seeded sampling (clha/sampling.py) on a tiny Llama: determinism under a seed, the nucleus, the engines."""

import pytest
import torch

from clha.sampling import RowSampler, SamplingConfig, row_seed, sample_responses, sample_with_details
# the same one-thread setting, tiny tokenizer and model (module-scoped fixtures) as the greedy tests
from tests.test_generation import _one_thread, _prompts, _spread_weights, model, tokenizer  # noqa: F401


CONFIG = SamplingConfig(temperature=1.0, top_p=0.95, seed=7)


def test_same_seed_same_samples_whatever_the_batching(model, tokenizer):
    """A prompt's samples depend on (seed, key, prompt) only: not on the batch size, the other prompts of the call,
    their order or the engine."""
    prompts = _prompts()
    full = sample_with_details(model, tokenizer, prompts, 3, CONFIG, max_new_tokens=12, batch_size=4, engine="fast")
    assert sample_with_details(model, tokenizer, prompts, 3, CONFIG, max_new_tokens=12, batch_size=21,
                               engine="fast") == full
    # a subset of the prompts, in reverse order, keyed by their original index
    picked = [5, 2, 0]
    part = sample_with_details(model, tokenizer, [prompts[i] for i in picked], 3, CONFIG, keys=picked,
                               max_new_tokens=12, batch_size=1, engine="fast")
    assert part == [full[i] for i in picked]
    hf = sample_with_details(model, tokenizer, prompts, 3, CONFIG, max_new_tokens=12, batch_size=3, engine="hf")
    assert hf == full
    # the samples really are samples: they differ between the k draws and from greedy decoding
    from clha.generation import generate_responses

    greedy = generate_responses(model, tokenizer, prompts, max_new_tokens=12)
    assert sum(len({g.response for g in row}) > 1 for row in full) >= len(prompts) - 1
    assert sum(row[0].response != g for row, g in zip(full, greedy)) >= len(prompts) - 1


def test_another_seed_gives_other_samples(model, tokenizer):
    prompts = _prompts()[:4]
    a = sample_responses(model, tokenizer, prompts, 2, CONFIG, max_new_tokens=10)
    b = sample_responses(model, tokenizer, prompts, 2, SamplingConfig(temperature=1.0, top_p=0.95, seed=8),
                         max_new_tokens=10)
    assert a != b and len(a) == 4 and all(len(row) == 2 for row in a)
    assert row_seed(7, 0, 0) != row_seed(7, 0, 1) != row_seed(7, 1, 0) != row_seed(8, 0, 0)


def test_sampler_draws_from_the_nucleus_with_the_right_frequencies():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    counts = torch.zeros(4)
    nucleus = torch.zeros(4)
    full = RowSampler(SamplingConfig(seed=0), [1])
    top = RowSampler(SamplingConfig(top_p=0.7, seed=0), [2])
    for _ in range(2000):
        counts[full(logits, [0])] += 1
        nucleus[top(logits, [0])] += 1
    torch.testing.assert_close(counts / 2000, torch.tensor([0.1, 0.5, 0.15, 0.25]), atol=0.04, rtol=0)
    # top_p 0.7: the nucleus is {0.5, 0.25} (0.5 alone is below 0.7), renormalised to 2/3, 1/3
    assert nucleus[0] == 0 and nucleus[2] == 0
    assert abs(nucleus[1] / 2000 - 2 / 3) < 0.04
    # a very low temperature is greedy; top_p that the best token alone reaches is greedy too
    cold = RowSampler(SamplingConfig(temperature=1e-4, seed=0), [3])
    tight = RowSampler(SamplingConfig(top_p=0.3, seed=0), [4])
    assert all(int(cold(logits, [0])) == 1 and int(tight(logits, [0])) == 1 for _ in range(50))


def test_sampling_leaves_greedy_decoding_alone(model, tokenizer):
    """Greedy generation after sampling is what it was before (no shared random state, training flags restored)."""
    from clha.generation import generate_responses

    prompts = _prompts()[:3]
    before = generate_responses(model, tokenizer, prompts, max_new_tokens=10)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model.train()
    sample_responses(model, tokenizer, prompts, 2, CONFIG, max_new_tokens=10)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=10) == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_k_and_keys(model, tokenizer):
    with pytest.raises(ValueError, match="k"):
        sample_responses(model, tokenizer, _prompts()[:1], 0, CONFIG)
    with pytest.raises(ValueError, match="keys"):
        sample_responses(model, tokenizer, _prompts()[:2], 1, CONFIG, keys=[0])

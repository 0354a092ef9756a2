"""Deterministic data order, so that a resumed run sees exactly the examples an uninterrupted run would.

Epoch `e` visits a permutation of all examples drawn from `seed + e`. The permutation is padded by
wrapping around (like torch's DistributedSampler) to a whole number of optimizer steps, so every epoch
has `steps_per_epoch` steps of `per_device * world_size * grad_accum` examples. The position in the data
is therefore just (epoch, step in epoch): nothing else needs saving to resume.
"""

from __future__ import annotations

import math
from typing import List

import numpy as np


def examples_per_step(per_device: int, world_size: int, grad_accum: int) -> int:
    return per_device * world_size * grad_accum


def steps_per_epoch(num_examples: int, per_device: int, world_size: int, grad_accum: int) -> int:
    if num_examples <= 0:
        raise ValueError("no training examples")
    return math.ceil(num_examples / examples_per_step(per_device, world_size, grad_accum))


def epoch_order(num_examples: int, epoch: int, seed: int, per_device: int, world_size: int,
                grad_accum: int) -> np.ndarray:
    """Example indices of one epoch, padded by wrap-around to a whole number of optimizer steps."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    total = steps_per_epoch(num_examples, per_device, world_size, grad_accum) * examples_per_step(
        per_device, world_size, grad_accum)
    if total > num_examples:
        perm = np.concatenate([perm, np.resize(perm, total - num_examples)])
    return perm


def micro_batch(order: np.ndarray, step: int, micro: int, rank: int, per_device: int, world_size: int,
                grad_accum: int) -> List[int]:
    """Indices that process `rank` trains on in micro-batch `micro` of optimizer step `step` (in-epoch)."""
    start = ((step * grad_accum + micro) * world_size + rank) * per_device
    return [int(i) for i in order[start:start + per_device]]

"""Disjoint partitions of HH-RLHF pairs, grouped by prompt.

The official train splits are not available offline here, so experiments carve their own partitions out of
whatever raw files exist (here: the four test files):

    policy_train   pairs the policy is trained on (step 2's training file)
    rm_train       pairs held out for training a reward model
    dev            pairs the dev sample is drawn from (step 2's sampled_dev.json)
    test           pairs evaluated on (step 3's per-subset test files)

Grouping: all pairs whose **first human turn** has the same normalised text (Unicode NFKC, case-folded,
white space collapsed, stripped) go to the same partition, across subsets and raw files, so no prompt text
appears in two partitions (HH-RLHF repeats many opening questions, e.g. "What are some cuss words in english?").

Assignment: a group goes to a partition by a seeded hash of its key: u = sha256(f"{seed}\\0{key}") read as a
number in [0, 1), then the partition whose cumulative fraction interval holds u. This is deterministic,
independent of file and row order, and a prompt keeps its partition when other files are added. Partition sizes
follow the fractions in expectation (by prompt group, so sizes in pairs deviate a little).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

from clha.errors import InputError

PARTITIONS: Tuple[str, ...] = ("policy_train", "rm_train", "dev", "test")
DEFAULT_FRACTIONS: Dict[str, float] = {"policy_train": 0.55, "rm_train": 0.20, "dev": 0.05, "test": 0.20}
DEFAULT_SEED = 42

_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """The grouping key of a first human turn: NFKC, case-folded, white space collapsed, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


@dataclass
class PartitionConfig:
    fractions: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    seed: int = DEFAULT_SEED

    def __post_init__(self):
        unknown = set(self.fractions) - set(PARTITIONS)
        if unknown:
            raise InputError(f"unknown partition(s) {sorted(unknown)}; known: {', '.join(PARTITIONS)}")
        fractions = {p: float(self.fractions.get(p, 0.0)) for p in PARTITIONS}
        if any(f < 0 for f in fractions.values()):
            raise InputError(f"partition fractions must be >= 0, got {fractions}")
        total = sum(fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise InputError(f"partition fractions must sum to 1, got {total:g} ({fractions})")
        self.fractions = fractions

    @classmethod
    def from_list(cls, values: Sequence[float], seed: int = DEFAULT_SEED) -> "PartitionConfig":
        """Fractions in the order policy_train, rm_train, dev, test."""
        if len(values) != len(PARTITIONS):
            raise InputError(f"expected {len(PARTITIONS)} fractions ({', '.join(PARTITIONS)}), got {len(values)}")
        return cls(dict(zip(PARTITIONS, values)), seed)

    def to_json(self) -> Dict:
        return {"fractions": dict(self.fractions), "seed": self.seed, "group_by": "first human turn, normalised",
                "assignment": "sha256(seed, key) -> cumulative fraction interval"}


def group_unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by the seed and the group key."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def assign_partition(key: str, config: PartitionConfig) -> str:
    u = group_unit(key, config.seed)
    cumulative = 0.0
    last = None
    for name in PARTITIONS:
        frac = config.fractions[name]
        if frac <= 0:
            continue
        cumulative += frac
        last = name
        if u < cumulative:
            return name
    return last  # only reached through rounding when u is just below 1


def partition_items(items: Iterable, first_human_turn, config: PartitionConfig) -> Dict[str, List]:
    """Split `items` into the partitions; `first_human_turn(item)` gives the text to group by.

    Item order within a partition is the input order.
    """
    parts: Dict[str, List] = {name: [] for name in PARTITIONS}
    cache: Dict[str, str] = {}
    for item in items:
        key = normalise_prompt(first_human_turn(item))
        if key not in cache:
            cache[key] = assign_partition(key, config)
        parts[cache[key]].append(item)
    return parts


def partition_pairs(pairs: Iterable, config: PartitionConfig) -> Dict[str, List]:
    """Partition RawPair objects (anything with a `first_human_turn` attribute)."""
    return partition_items(pairs, lambda p: p.first_human_turn, config)


def partition_sizes(parts: Mapping[str, Sequence]) -> Dict[str, int]:
    return {name: len(parts.get(name, ())) for name in PARTITIONS}

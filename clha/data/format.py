"""The ranked JSONL format shared by preprocessing, training and evaluation.

One JSON object per line:

    {"prefix": [[turn, ..., "<|assistant|>"], ... n copies ...],
     "suffix": [y_1, ..., y_n],          # ranked: index 0 is the best candidate
     "reward": [r_1, ..., r_n],
     "sft_index": 0,
     "meta": {"source": subset, "line_num": N, ...}}

A turn is "<|prompter|>" + text or "<|assistant|>" + text; the last turn of a prompt is the bare
"<|assistant|>" marker where the model must answer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

from clha.errors import InputError
from clha.fileio import iter_jsonl, write_jsonl

PROMPTER = "<|prompter|>"
ASSISTANT = "<|assistant|>"
HUMAN_TAG = "\n\nHuman: "
ASSISTANT_TAG = "\n\nAssistant: "


def render_prompt(turns: List[str]) -> str:
    """Render marker turns as the HH-RLHF text the policy sees: "\\n\\nHuman: ...\\n\\nAssistant:"."""
    parts = []
    for turn in turns:
        if turn.startswith(PROMPTER):
            parts.append(HUMAN_TAG + turn[len(PROMPTER):])
        elif turn.startswith(ASSISTANT):
            parts.append(ASSISTANT_TAG + turn[len(ASSISTANT):])
        else:
            raise ValueError(f"turn does not start with {PROMPTER} or {ASSISTANT}: {turn[:40]!r}")
    return "".join(parts).rstrip()


def first_human_turn(turns: List[str]) -> str:
    """Text of the first human turn of marker turns ("" when there is none): what prompt grouping keys on."""
    for turn in turns:
        if turn.startswith(PROMPTER):
            return turn[len(PROMPTER):]
    return ""


def model_input_text(prompt: str, response: str) -> str:
    """The text a causal LM is trained on: prompt + " " + response."""
    return prompt + " " + response


@dataclass
class RankedExample:
    prefix: List[List[str]]
    suffix: List[str]
    reward: List[float]
    sft_index: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.suffix)

    @property
    def prompt_turns(self) -> List[str]:
        return self.prefix[0]

    def prompt_text(self) -> str:
        return render_prompt(self.prefix[0])

    def to_json(self) -> Dict[str, Any]:
        return {"prefix": self.prefix, "suffix": self.suffix, "reward": self.reward,
                "sft_index": self.sft_index, "meta": self.meta}


def _check_turns(turns: Any, path, line, name: str) -> None:
    if not isinstance(turns, list) or not turns:
        raise InputError("must be a non-empty list of turns", path, line, name)
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise InputError(f"turn {i} is not a string", path, line, name)
        if not (turn.startswith(PROMPTER) or turn.startswith(ASSISTANT)):
            raise InputError(f"turn {i} does not start with {PROMPTER} or {ASSISTANT}", path, line, name)
    if turns[-1] != ASSISTANT:
        raise InputError(f"last turn must be the bare {ASSISTANT} marker", path, line, name)


def parse_ranked(obj: Any, path: Optional[str] = None, line: Optional[int] = None,
                 require_reward: bool = True, expected_n: Optional[int] = None) -> RankedExample:
    """Validate one ranked JSON object; errors name the file, line and field."""
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object", path, line)
    for key in ("prefix", "suffix"):
        if key not in obj:
            raise InputError("missing", path, line, key)
    suffix = obj["suffix"]
    if not isinstance(suffix, list) or not suffix or not all(isinstance(s, str) for s in suffix):
        raise InputError("must be a non-empty list of strings", path, line, "suffix")
    n = len(suffix)
    if expected_n is not None and n < expected_n:
        raise InputError(f"has {n} candidates, training_stage_num asks for {expected_n}", path, line, "suffix")
    prefix = obj["prefix"]
    if not isinstance(prefix, list) or len(prefix) != n:
        raise InputError(f"must hold one turn list per candidate ({n})", path, line, "prefix")
    for k, turns in enumerate(prefix):
        _check_turns(turns, path, line, f"prefix[{k}]")
    reward = obj.get("reward")
    if reward is None:
        if require_reward:
            raise InputError("missing", path, line, "reward")
        reward = [0.0] * n
    if not isinstance(reward, list) or len(reward) != n or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) for r in reward):
        raise InputError(f"must be a list of {n} numbers", path, line, "reward")
    for k, r in enumerate(reward):
        if not math.isfinite(r):
            # JSON readers accept NaN/Infinity; such a row would silently train nothing (its pairs masked, its
            # SFT gate closed), so it is refused with its place.
            raise InputError(f"is {r}: rewards must be finite numbers (rescore this row or drop it)", path, line,
                             f"reward[{k}]")
    sft_index = obj.get("sft_index", 0)
    if not isinstance(sft_index, int) or not 0 <= sft_index < n:
        raise InputError(f"must be an integer in [0, {n})", path, line, "sft_index")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError("must be an object", path, line, "meta")
    return RankedExample(prefix=prefix, suffix=list(suffix), reward=[float(r) for r in reward],
                         sft_index=sft_index, meta=meta)


def read_ranked(path: str | os.PathLike, require_reward: bool = True,
                expected_n: Optional[int] = None) -> List[RankedExample]:
    """Read a ranked JSONL file, validating every row."""
    examples = [parse_ranked(obj, str(path), line, require_reward, expected_n)
                for line, obj in iter_jsonl(path)]
    return examples


def write_ranked(path: str | os.PathLike, examples: Iterable[RankedExample]) -> int:
    return write_jsonl(path, (ex.to_json() for ex in examples))

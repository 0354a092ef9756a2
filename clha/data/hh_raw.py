"""Reading raw HH-RLHF files and splitting their dialogues into marker turns.

A raw HH-RLHF file (`<raw_dir>/<subset>/{train,test}.jsonl` or `.jsonl.gz`) holds one JSON object per
line, `{"chosen": dialogue, "rejected": dialogue}`, where a dialogue is the text

    "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."

Splitting rules (see docs/preprocessing.md):
- A dialogue is split **only** at the speaker tags "\\n\\nHuman: " and "\\n\\nAssistant: " (a tag at the very
  end of the text may lack the trailing space). Everything between two tags is one turn, so a reply with
  blank lines keeps all of its paragraphs. Turn texts are stripped of surrounding white space.
- Consecutive chunks of the same speaker ("\\n\\nAssistant: a\\n\\nAssistant: b") are one turn, joined by
  "\\n" (as the reference preprocessing did; 27 of the 8552 raw test pairs have such a turn).
- The last assistant turn of `chosen` and of `rejected` are the two candidates; the shared history plus the
  bare "<|assistant|>" marker is the prompt.

Rows are either structurally broken (raise InputError naming file, line and field) or well formed. Well-formed
pairs that cannot be used are dropped and counted; odd but usable pairs are kept and counted (`RawStats`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from clha.data.format import ASSISTANT, PROMPTER, first_human_turn
from clha.errors import InputError
from clha.fileio import check_gzip, iter_jsonl

logger = logging.getLogger(__name__)

# Raw folder names, in the order the project lists them, and the stems of the per-subset test files.
RAW_SUBSETS: Tuple[str, ...] = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SUBSET_STEMS: Dict[str, str] = {
    "harmless-base": "harmless_base",
    "helpful-base": "helpful_base",
    "helpful-online": "helpful_online",
    "helpful-rejection-sampled": "helpful_rejection",
}
STEM_TO_SUBSET: Dict[str, str] = {stem: subset for subset, stem in SUBSET_STEMS.items()}
# Other spellings met in the wild (the reference scripts call the folder "helpful-rejection").
SUBSET_ALIASES: Dict[str, str] = {"helpful-rejection": "helpful-rejection-sampled"}
RAW_SPLITS: Tuple[str, ...] = ("train", "test")

_TAG = re.compile(r"\n\n(Human|Assistant):(?: |$)")
_ROLE_MARKER = {"Human": PROMPTER, "Assistant": ASSISTANT}


def canonical_subset(name: str) -> str:
    """Map any accepted spelling (raw folder name, file stem, alias) to the raw folder name."""
    name = name.strip()
    if name in SUBSET_STEMS:
        return name
    if name in STEM_TO_SUBSET:
        return STEM_TO_SUBSET[name]
    if name in SUBSET_ALIASES:
        return SUBSET_ALIASES[name]
    if name.replace("_", "-") in SUBSET_ALIASES:
        return SUBSET_ALIASES[name.replace("_", "-")]
    raise InputError(f"unknown HH-RLHF subset {name!r}; known: {', '.join(RAW_SUBSETS)} "
                     f"(or {', '.join(STEM_TO_SUBSET)})")


def subset_stem(name: str) -> str:
    """`helpful-rejection-sampled` -> `helpful_rejection` (the test file stem)."""
    return SUBSET_STEMS[canonical_subset(name)]


@dataclass
class RawPair:
    """One usable chosen/rejected pair of a raw file, in human order (chosen first)."""

    subset: str          # raw folder name, canonical
    split: str           # the raw file's split: "train" or "test"
    line_num: int        # 1-based line in the raw file
    file: str            # path of the raw file relative to the raw directory, e.g. "helpful-base/test.jsonl.gz"
    prompt: List[str]    # marker turns ending with the bare "<|assistant|>"
    chosen: str
    rejected: str

    @property
    def first_human_turn(self) -> str:
        return first_human_turn(self.prompt)


@dataclass
class RawStats:
    """What happened to the rows of one or more raw files; `counts` maps a kind to a number of rows."""

    counts: Counter = field(default_factory=Counter)

    # Kinds of dropped rows (well formed, but not a usable pair).
    DROP_KINDS = ("dropped_turn_count_mismatch", "dropped_history_mismatch", "dropped_ends_with_human",
                  "skipped_broken")
    # Kinds of kept rows worth knowing about (a kept row may have several).
    KEPT_KINDS = ("kept_identical_candidates", "kept_empty_chosen", "kept_empty_rejected",
                  "kept_merged_same_speaker", "kept_multi_paragraph_candidate", "kept_starts_with_assistant")

    def add(self, other: "RawStats") -> None:
        self.counts.update(other.counts)

    def as_dict(self) -> Dict[str, int]:
        keys = ["rows", "pairs"] + list(self.DROP_KINDS) + list(self.KEPT_KINDS)
        return {k: int(self.counts.get(k, 0)) for k in keys}

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


def split_dialogue(text: str, path: Optional[str] = None, line: Optional[int] = None,
                   field_name: Optional[str] = None) -> Tuple[List[str], bool]:
    """Split one raw dialogue into marker turns ("<|prompter|>text" / "<|assistant|>text").

    Returns `(turns, merged)` where `merged` tells whether consecutive chunks of one speaker were joined.
    Raises InputError when the text has no Human or no Assistant turn, or text before the first tag.
    """
    if not text.startswith("\n\n"):
        # Allow a dialogue written without the leading blank line ("Human: ...").
        text = "\n\n" + text
    pieces = _TAG.split(text)
    head, roles, bodies = pieces[0], pieces[1::2], pieces[2::2]
    if head.strip():
        raise InputError(f"text before the first 'Human:'/'Assistant:' tag: {head.strip()[:40]!r}",
                         path, line, field_name)
    if "Human" not in roles:
        raise InputError("dialogue has no '\\n\\nHuman: ' turn", path, line, field_name)
    if "Assistant" not in roles:
        raise InputError("dialogue has no '\\n\\nAssistant: ' turn", path, line, field_name)
    speakers: List[str] = []
    texts: List[str] = []
    merged = False
    for role, body in zip(roles, bodies):
        body = body.strip()
        if speakers and speakers[-1] == role:
            texts[-1] = texts[-1] + "\n" + body
            merged = True
        else:
            speakers.append(role)
            texts.append(body)
    return [_ROLE_MARKER[r] + t for r, t in zip(speakers, texts)], merged


def _check_row(obj, path: str, line: int) -> Tuple[str, str]:
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object with 'chosen' and 'rejected'", path, line)
    values = []
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise InputError("missing", path, line, key)
        if not isinstance(obj[key], str):
            raise InputError(f"must be a string, got {type(obj[key]).__name__}", path, line, key)
        values.append(obj[key])
    return values[0], values[1]


def parse_raw_row(obj, path: str, line: int, subset: str, split: str, file: str,
                  stats: RawStats) -> Optional[RawPair]:
    """Turn one raw row into a RawPair, or None (counted in `stats`) if it is well formed but unusable."""
    chosen_text, rejected_text = _check_row(obj, path, line)
    chosen, merged_c = split_dialogue(chosen_text, path, line, "chosen")
    rejected, merged_r = split_dialogue(rejected_text, path, line, "rejected")
    if len(chosen) != len(rejected):
        stats.counts["dropped_turn_count_mismatch"] += 1
        return None
    if not (chosen[-1].startswith(ASSISTANT) and rejected[-1].startswith(ASSISTANT)):
        stats.counts["dropped_ends_with_human"] += 1
        return None
    if chosen[:-1] != rejected[:-1]:
        stats.counts["dropped_history_mismatch"] += 1
        return None
    good, bad = chosen[-1][len(ASSISTANT):], rejected[-1][len(ASSISTANT):]
    if good == bad:
        stats.counts["kept_identical_candidates"] += 1
    if not good:
        stats.counts["kept_empty_chosen"] += 1
    if not bad:
        stats.counts["kept_empty_rejected"] += 1
    if merged_c or merged_r:
        stats.counts["kept_merged_same_speaker"] += 1
    if "\n\n" in good or "\n\n" in bad:
        stats.counts["kept_multi_paragraph_candidate"] += 1
    if chosen[0].startswith(ASSISTANT):
        stats.counts["kept_starts_with_assistant"] += 1
    return RawPair(subset=subset, split=split, line_num=line, file=file,
                   prompt=chosen[:-1] + [ASSISTANT], chosen=good, rejected=bad)


def read_raw_file(path: str | os.PathLike, subset: str, split: str, file: Optional[str] = None,
                  stats: Optional[RawStats] = None, skip_broken: bool = False) -> List[RawPair]:
    """Read one raw HH-RLHF file.

    Malformed JSON, an unreadable or empty file always raise InputError. A row with a missing or non-string field or
    a dialogue without a Human/Assistant turn raises too, unless `skip_broken` (then it is logged and counted).
    """
    path = str(path)
    subset = canonical_subset(subset)
    stats = stats if stats is not None else RawStats()
    file = file if file is not None else f"{subset}/{Path(path).name}"
    pairs: List[RawPair] = []
    rows_before = stats.counts["rows"]
    gzip_checked = False
    for line, obj in iter_jsonl(path):   # malformed JSON / unreadable gzip: always an InputError
        stats.counts["rows"] += 1
        try:
            pair = parse_raw_row(obj, path, line, subset, split, file, stats)
        except InputError as err:
            if not gzip_checked:   # a damaged .gz can decompress into broken rows: name the damage, not the row
                check_gzip(path)
                gzip_checked = True
            if not skip_broken:
                raise
            stats.counts["skipped_broken"] += 1
            logger.warning("skipping broken row: %s", err)
            continue
        if pair is not None:
            stats.counts["pairs"] += 1
            pairs.append(pair)
    if not rows_before < stats.counts["rows"]:
        raise InputError("holds no rows (an empty or cut-off download?); remove it or choose --subsets/--splits",
                         path=path)
    return pairs


@dataclass
class RawFile:
    subset: str
    split: str
    path: Path
    rel: str    # path relative to the raw directory


def find_raw_files(raw_dir: str | os.PathLike, subsets: Optional[Sequence[str]] = None,
                   splits: Sequence[str] = RAW_SPLITS) -> List[RawFile]:
    """The raw files under `raw_dir`, in the canonical subset order, then split order.

    `<raw_dir>/<subset>/<split>.jsonl` is preferred over `<split>.jsonl.gz` when both exist. A subset folder
    may also be spelled `helpful-rejection`. Requested subsets that have no file at all are an error.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputError("raw data directory does not exist (expected <raw_dir>/<subset>/{train,test}.jsonl[.gz])",
                         path=raw_dir)
    wanted = [canonical_subset(s) for s in subsets] if subsets else list(RAW_SUBSETS)
    for split in splits:
        if split not in RAW_SPLITS:
            raise InputError(f"unknown split {split!r}; known: {', '.join(RAW_SPLITS)}")
    found: List[RawFile] = []
    for subset in wanted:
        names = [subset] + [alias for alias, target in SUBSET_ALIASES.items() if target == subset]
        folders = [raw_dir / n for n in names if (raw_dir / n).is_dir()]
        before = len(found)
        for folder in folders[:1]:
            for split in splits:
                plain, gz = folder / f"{split}.jsonl", folder / f"{split}.jsonl.gz"
                if plain.is_file():
                    if gz.is_file():
                        logger.warning("both %s and %s exist; reading %s", plain, gz.name, plain.name)
                    found.append(RawFile(subset, split, plain, f"{folder.name}/{plain.name}"))
                elif gz.is_file():
                    found.append(RawFile(subset, split, gz, f"{folder.name}/{gz.name}"))
        if subsets and len(found) == before:
            raise InputError(f"no {'/'.join(splits)} file for subset {subset!r} "
                             f"(looked for {subset}/<split>.jsonl[.gz])", path=raw_dir)
    if not found:
        raise InputError(f"no raw HH-RLHF files found (expected <subset>/<split>.jsonl[.gz] for subsets "
                         f"{', '.join(wanted)})", path=raw_dir)
    return found


def read_raw_dir(raw_dir: str | os.PathLike, subsets: Optional[Sequence[str]] = None,
                 splits: Sequence[str] = RAW_SPLITS, skip_broken: bool = False
                 ) -> Tuple[List[RawPair], Dict[str, RawStats]]:
    """Read every raw file under `raw_dir`; returns the pairs and the stats per file (key: relative path)."""
    pairs: List[RawPair] = []
    stats: Dict[str, RawStats] = {}
    for raw in find_raw_files(raw_dir, subsets, splits):
        file_stats = RawStats()
        pairs.extend(read_raw_file(raw.path, raw.subset, raw.split, raw.rel, file_stats, skip_broken))
        stats[raw.rel] = file_stats
        logger.info("%s: %s", raw.rel, file_stats.summary())
    return pairs, stats


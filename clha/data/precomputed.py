"""Rewards computed earlier, read from PRO-format files instead of running a reward model.

A directory such as `../shared/data/pro-format/hh_test` holds one file per subset, named by the test file
stem (`harmless_base.json`, `helpful_base.json`, `helpful_online.json`, `helpful_rejection.json`). Despite
the `.json` name each is JSONL: one ranked row per line with `suffix` = [chosen, rejected] (human order),
`reward` = one number per candidate and `meta.line_num` = the 1-based line of the pair in the raw test file.
Other files in the directory (e.g. `bad_test_indices.json`) are ignored.

    rewards = PrecomputedRewards("../shared/data/pro-format/hh_test")
    rewards.lookup("helpful-base", 108)      # -> [r_chosen, r_rejected]

Subset names may be given as raw folder names (`helpful-rejection-sampled`) or file stems
(`helpful_rejection`). A file is read the first time one of its rows is looked up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from clha.data.hh_raw import SUBSET_STEMS, canonical_subset
from clha.errors import InputError
from clha.fileio import iter_jsonl


class PrecomputedRewards:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputError("precomputed rewards directory does not exist", path=self.directory)
        self.files: Dict[str, Path] = {}
        for subset, stem in SUBSET_STEMS.items():
            for name in (f"{stem}.json", f"{stem}.jsonl"):
                if (self.directory / name).is_file():
                    self.files[subset] = self.directory / name
                    break
        if not self.files:
            raise InputError(f"no precomputed reward files ({', '.join(s + '.json' for s in SUBSET_STEMS.values())})",
                             path=self.directory)
        self._rows: Dict[str, Dict[int, Dict[str, Any]]] = {}

    @property
    def subsets(self) -> List[str]:
        """Raw folder names of the subsets that have a file here."""
        return list(self.files)

    def has_subset(self, subset: str) -> bool:
        return canonical_subset(subset) in self.files

    def _load(self, subset: str) -> Dict[int, Dict[str, Any]]:
        if subset not in self._rows:
            path = self.files[subset]
            rows: Dict[int, Dict[str, Any]] = {}
            for line, obj in iter_jsonl(path):
                meta = obj.get("meta") if isinstance(obj, dict) else None
                line_num = meta.get("line_num") if isinstance(meta, dict) else None
                if not isinstance(line_num, int) or isinstance(line_num, bool):
                    raise InputError("missing or not an integer", path, line, "meta.line_num")
                if line_num in rows:
                    raise InputError(f"raw line {line_num} appears twice (first at line "
                                     f"{rows[line_num]['_line']})", path, line, "meta.line_num")
                rows[line_num] = dict(obj, _line=line)
            self._rows[subset] = rows
        return self._rows[subset]

    def row(self, subset: str, line_num: int) -> Optional[Dict[str, Any]]:
        """The stored row for a raw line (with `_line`, its line in the PRO file), or None."""
        subset = canonical_subset(subset)
        if subset not in self.files:
            return None
        return self._load(subset).get(int(line_num))

    def lookup(self, subset: str, line_num: int) -> List[float]:
        """Rewards of the pair at 1-based `line_num` of the raw `subset` test file, in the stored order.

        Raises InputError naming the subset and line when the subset has no file, the row is absent, or
        the row has no valid `reward` list.
        """
        canon = canonical_subset(subset)
        if canon not in self.files:
            raise InputError(f"no precomputed rewards for subset {canon!r} (raw line {line_num}): "
                             f"no {SUBSET_STEMS[canon]}.json here", path=self.directory)
        row = self.row(canon, line_num)
        path = self.files[canon]
        if row is None:
            raise InputError(f"no stored reward for subset {canon!r}, raw line {line_num}", path=path)
        reward = row.get("reward")
        suffix = row.get("suffix")
        if (not isinstance(reward, list) or not reward
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in reward)
                or (isinstance(suffix, list) and len(suffix) != len(reward))):
            raise InputError(f"subset {canon!r}, raw line {line_num}: must be a list of numbers, one per "
                             f"candidate", path=path, line=row["_line"], field="reward")
        return [float(r) for r in reward]

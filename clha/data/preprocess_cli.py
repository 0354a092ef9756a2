"""Command-line helpers shared by the preprocessing steps (`train/hh_preprocess_data/step_*.py`).

`run_cli` runs a step's main: logging to stderr, bad input (`InputError`) -> one line naming the file, line and
field, and exit status 2, with nothing written (every step checks all of its input before it writes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

from clha.data.hh_raw import RAW_SUBSETS
from clha.data.reward_scoring import RewardSource
from clha.errors import InputError

logger = logging.getLogger(__name__)


def add_reward_args(parser) -> None:
    group = parser.add_argument_group("rewards (at least one of --reward_model / --precomputed_rewards)")
    group.add_argument("--reward_model", default=None,
                       help="reward model folder or hub id, loaded with clha.rm.scoring.load_reward_model "
                            "(reference: OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5 for training data)")
    group.add_argument("--precomputed_rewards", default=None,
                       help="folder of PRO-format files with stored rewards (e.g. ../shared/data/pro-format/hh_test), "
                            "matched by subset and meta.line_num of the raw test file; with --reward_model too, "
                            "the model scores EVERY row and the stored rewards are only compared with its scores "
                            "(agreement report)")
    group.add_argument("--allow_mixed_reward_sources", action="store_true",
                       help="with both options: stored rewards where a row has them, the model for the rest (two "
                            "reward scales in one file; each row's meta.reward_source records its source)")
    group.add_argument("--batch_size", type=int, default=16, help="reward model batch size (pairs)")
    group.add_argument("--device", default=None, help="reward model device (default: cuda if available, else cpu)")
    group.add_argument("--max_length", type=int, default=512,
                       help="reward model input length in tokens (cut from the left)")


def add_subset_arg(parser) -> None:
    parser.add_argument("--subsets", nargs="+", default=None, metavar="SUBSET",
                        help=f"only these subsets (default: all found): {' '.join(RAW_SUBSETS)} "
                             "(file stems like helpful_rejection are accepted too)")


def reward_source_from_args(args) -> RewardSource:
    return RewardSource.from_args(reward_model=args.reward_model, precomputed_rewards=args.precomputed_rewards,
                                  device=args.device, batch_size=args.batch_size, max_length=args.max_length,
                                  allow_mixed=args.allow_mixed_reward_sources)


def print_summary(summary: Dict) -> None:
    """A step's summary as one JSON line on stdout (counts, reward mode, rows per source, agreement)."""
    print("summary: " + json.dumps(summary, ensure_ascii=False))


def path_or_default(value: Optional[str], repo_root: Path, default: str) -> Path:
    """A path the user gave (relative to the current directory), else `default` under the repository root."""
    return Path(value) if value else repo_root / default


def run_cli(main, argv=None) -> int:
    """Run a step's main(argv): logging to stderr, InputError -> one clear line and exit status 2."""
    import sys
    import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("done in %.1f s", time.perf_counter() - start)
    return 0

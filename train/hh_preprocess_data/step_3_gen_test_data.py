"""Step 3: score the test pairs, one file per subset, candidates in human order (see docs/preprocessing.md).

    python train/hh_preprocess_data/step_3_gen_test_data.py --precomputed_rewards ../shared/data/pro-format/hh_test

One reward source per run: with both options the reward model scores every row and the stored rewards are only
compared with its scores; --allow_mixed_reward_sources mixes them (each row's meta.reward_source says which).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from clha.data.preprocess import (add_reward_args, add_subset_arg, path_or_default,  # noqa: E402
                                  print_summary, reward_source_from_args, run_cli, step3_test_data)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in_dir", default=None,
                        help="step-1 output folder (default: <repo>/data/preprocessed_data/hhrlhf)")
    parser.add_argument("--out_dir", default=None,
                        help="folder for <stem>.json test files (default: <repo>/data/hh_test)")
    add_subset_arg(parser)
    add_reward_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rewards = reward_source_from_args(args)
    rows = step3_test_data(path_or_default(args.in_dir, ROOT, "data/preprocessed_data/hhrlhf"),
                           path_or_default(args.out_dir, ROOT, "data/hh_test"), rewards, subsets=args.subsets)
    print_summary({"rows": rows, "rewards": rewards.summary()})


if __name__ == "__main__":
    sys.exit(run_cli(main))

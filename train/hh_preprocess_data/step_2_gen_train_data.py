"""Step 2: score and re-rank the training pairs (best first) and draw the dev sample (see docs/preprocessing.md).

    python train/hh_preprocess_data/step_2_gen_train_data.py --reward_model PATH_OR_ID
    python train/hh_preprocess_data/step_2_gen_train_data.py --precomputed_rewards ../shared/data/pro-format/hh_test

One reward source per run: with both options the reward model scores every row and the stored rewards are only
compared with its scores; --allow_mixed_reward_sources mixes them (each row's meta.reward_source says which).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from clha.data.preprocess import (DEFAULT_DEV_SIZE, DEFAULT_SEED, add_reward_args, add_subset_arg,  # noqa: E402
                                  path_or_default, print_summary, reward_source_from_args, run_cli,
                                  step2_train_data)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in_dir", default=None,
                        help="step-1 output folder (default: <repo>/data/preprocessed_data/hhrlhf)")
    parser.add_argument("--train_out", default=None,
                        help="ranked training file (default: <repo>/data/hh_train_len2/train.json)")
    parser.add_argument("--dev_out", default=None,
                        help="dev sample file (default: <repo>/data/hh_dev/sampled_dev.json)")
    parser.add_argument("--no_dev", action="store_true", help="do not write the dev sample")
    parser.add_argument("--dev_size", type=int, default=DEFAULT_DEV_SIZE,
                        help=f"prompts in the dev sample, drawn across subsets (default {DEFAULT_DEV_SIZE})")
    parser.add_argument("--dev_order", choices=["human", "reward"], default="human",
                        help="candidate order in the dev sample: human (chosen first, as the reference) or reward")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the training-file shuffle and the dev sample")
    parser.add_argument("--no_shuffle", action="store_true",
                        help="keep the training rows in subset / raw line order")
    add_subset_arg(parser)
    add_reward_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rewards = reward_source_from_args(args)
    counts = step2_train_data(path_or_default(args.in_dir, ROOT, "data/preprocessed_data/hhrlhf"),
                              path_or_default(args.train_out, ROOT, "data/hh_train_len2/train.json"),
                              None if args.no_dev else path_or_default(args.dev_out, ROOT,
                                                                       "data/hh_dev/sampled_dev.json"),
                              rewards, dev_size=args.dev_size, seed=args.seed, subsets=args.subsets,
                              dev_order=args.dev_order, shuffle=not args.no_shuffle)
    print_summary(counts)


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Step 1: split raw HH-RLHF dialogues into prompt turns + [chosen, rejected] (see docs/preprocessing.md).

    python train/hh_preprocess_data/step_1_process.py     # data/raw_data/hhrlhf -> data/preprocessed_data/hhrlhf
    python train/hh_preprocess_data/step_1_process.py --raw_dir ../shared/data/hh-rlhf --partition
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from clha.data.hh_raw import RAW_SPLITS  # noqa: E402
from clha.data.preprocess import add_subset_arg, path_or_default, run_cli, step1_process  # noqa: E402
from clha.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED, PARTITIONS, PartitionConfig  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw_dir", default=None,
                        help="folder with <subset>/{train,test}.jsonl[.gz] (default: <repo>/data/raw_data/hhrlhf)")
    parser.add_argument("--out_dir", default=None,
                        help="output folder (default: <repo>/data/preprocessed_data/hhrlhf)")
    add_subset_arg(parser)
    parser.add_argument("--splits", nargs="+", default=list(RAW_SPLITS), choices=list(RAW_SPLITS),
                        help="raw splits to read when present (default: train test)")
    parser.add_argument("--partition", action="store_true",
                        help="carve disjoint prompt-grouped partitions (policy_train rm_train dev test) out of all "
                             "the raw files read, instead of keeping the raw train/test splits")
    parser.add_argument("--partition_fractions", nargs=4, type=float, metavar=("POLICY", "RM", "DEV", "TEST"),
                        default=[DEFAULT_FRACTIONS[p] for p in PARTITIONS],
                        help="fractions of prompt groups for policy_train rm_train dev test (sum 1; default "
                             + " ".join(str(DEFAULT_FRACTIONS[p]) for p in PARTITIONS) + ")")
    parser.add_argument("--partition_seed", type=int, default=DEFAULT_SEED, help="seed of the partition hash")
    parser.add_argument("--skip_broken", action="store_true",
                        help="log and count structurally broken rows (missing/non-string field, no Human or "
                             "Assistant turn) instead of stopping; malformed JSON still stops")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    partition = PartitionConfig.from_list(args.partition_fractions, args.partition_seed) if args.partition else None
    step1_process(path_or_default(args.raw_dir, ROOT, "data/raw_data/hhrlhf"),
                  path_or_default(args.out_dir, ROOT, "data/preprocessed_data/hhrlhf"),
                  subsets=args.subsets, splits=args.splits, partition=partition, skip_broken=args.skip_broken)


if __name__ == "__main__":
    sys.exit(run_cli(main))

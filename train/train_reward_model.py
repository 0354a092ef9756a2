#!/usr/bin/env python
"""Train (or evaluate) a reward model on preference pairs. Launch with `accelerate launch` (see
train/train_reward_model.sh); `python train/train_reward_model.py --help` lists every option."""

import logging
import os
import sys

from clha.errors import InputError
from clha.rm.config import parse_reward_config
from clha.rm.trainer import run_reward_training
from clha.threads import configure_threads


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    configure_threads()      # torch threads per process: cores // local processes (clha/threads.py)
    cfg = parse_reward_config(argv)
    try:
        results = run_reward_training(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":     # other processes of a multi-process launch print nothing
        return 0
    heldout = results.get("heldout") or {}
    if heldout:
        subsets = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in heldout["per_subset"].items())
        print(f"held-out accuracy {heldout['accuracy']:.4f} ({heldout['pairs']} pairs; {subsets}); "
              f"Spearman with stored rewards {heldout.get('spearman_with_stored', float('nan')):.4f}; "
              f"train {results['train_seconds'] / 60:.1f} min")
    if "agreement_with" in results:
        a = results["agreement_with"]
        print(f"agreement with {a['other']}: {a['agreement']:.4f} (independent models: {a.get('chance', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a causal LM with CLHA or a baseline loss. Launch with `accelerate launch` (see train_hh.sh)."""

import logging
import sys

from clha.config import parse_config
from clha.errors import InputError, SaveError
from clha.training.trainer import NonFiniteLossError, run_training


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from clha.threads import configure_threads; configure_threads()  # noqa: E702 - threads per process: clha/threads.py
    cfg = parse_config(argv)
    try:
        summary = run_training(cfg)
    except (InputError, NonFiniteLossError, SaveError) as err:
        # errors of the training loop come while a progress bar holds the line: start a new one
        start = "" if isinstance(err, InputError) else "\n"
        print(f"{start}error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("clha").info("done: %s", {k: v for k, v in summary.items() if k != "validation"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

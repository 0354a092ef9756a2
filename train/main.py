#!/usr/bin/env python
"""Train a causal LM with CLHA or a baseline loss. Launch with `accelerate launch` (see train_hh.sh)."""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clha.config import parse_config  # noqa: E402
from clha.errors import InputError  # noqa: E402
from clha.trainer import NonFiniteLossError, run_training  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from clha.threads import configure_threads; configure_threads()  # noqa: E702 - threads per process: clha/threads.py
    cfg = parse_config(argv)
    try:
        summary = run_training(cfg)
    except (InputError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("clha").info("done: %s", {k: v for k, v in summary.items() if k != "validation"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

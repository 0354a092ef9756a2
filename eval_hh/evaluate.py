#!/usr/bin/env python
"""One evaluation stage (generate | reward | score); launch with `accelerate launch` (see run_infer_main_dist.sh)."""

import sys

from clha.eval.stages import main

if __name__ == "__main__":
    sys.exit(main())

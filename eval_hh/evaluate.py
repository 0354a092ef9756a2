#!/usr/bin/env python
"""One evaluation stage (generate | reward | score); launch with `accelerate launch` (see run_infer_main_dist.sh)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clha.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

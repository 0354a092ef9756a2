#!/usr/bin/env python
"""Side-by-side table and reward chart of evaluation runs:

    python eval_hh/compare.py eval_hh/inference_res/1_2 eval_hh/inference_res/2_2 [--out_dir DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clha.evaluation import compare_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(compare_main())

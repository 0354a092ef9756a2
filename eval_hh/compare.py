#!/usr/bin/env python
"""Side-by-side table and reward chart of evaluation runs:

    python eval_hh/compare.py eval_hh/inference_res/1_2 eval_hh/inference_res/2_2 [--out_dir DIR]
"""

import sys

from clha.eval.compare import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())

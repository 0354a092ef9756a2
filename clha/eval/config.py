"""The evaluation's configuration: one dataclass whose fields carry their help (`clha.options`), so it is also the
reference of `eval_hh/evaluate.py --help`. The stage (generate | reward | score) is the one positional argument."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from clha.data.hh_raw import SUBSET_STEMS
from clha.data.tokenize import RESPONSE_BUDGET
from clha.errors import InputError
from clha.loading import DTYPE_CHOICES
from clha.options import aliased, build_parser, option

SUBSETS: Tuple[str, ...] = tuple(SUBSET_STEMS.values())      # the test-file stems, e.g. harmless_base
STAGES: Tuple[str, ...] = ("generate", "reward", "score")
DEFAULT_EVAL_REWARD_MODEL = "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1"


@aliased
@dataclass
class EvalConfig:
    model_path: str = option("", "policy checkpoint folder, or a hub id", required=True)
    test_dir: str = option("data/hh_test", "folder with <subset>.json ranked test files")
    out_dir: str = option("", "where shards and reports go", required=True)
    eval_reward_model: str = option(DEFAULT_EVAL_REWARD_MODEL, "evaluation reward model (path/hub id)")
    train_reward_model: Optional[str] = option(
        None, "training reward model; default: `reward_model` of the checkpoint's clha_config.json")
    allow_same_reward_model: bool = option(
        False, "evaluate with the training reward model anyway (the report says so)")
    subsets: List[str] = option(help="subset file stems to evaluate", nargs="+",
                                default_factory=lambda: list(SUBSETS))
    limit: int = option(0, "only the first N examples of each subset (0: all)")
    block_size: int = option(512, f"max tokens of prompt + response; the prompt budget is block_size - {RESPONSE_BUDGET}")
    max_new_tokens: int = option(RESPONSE_BUDGET, f"max new tokens per response (at most the {RESPONSE_BUDGET}-token "
                                                  "response budget, so that prompt + response fit block_size)")
    gen_batch_size: int = option(28, "prompts per generate() call")
    reward_batch_size: int = option(16, "pairs per reward-model batch")
    reward_max_length: int = option(1024, "RM input budget (left cut)")
    gguf_file: Optional[str] = option(None, "GGUF file inside --model_path to load")
    torch_dtype: str = option("auto", "weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16",
                              choices=DTYPE_CHOICES, aliases=("dtype",))
    force: bool = option(False, "redo this stage even where shards are complete")
    name: str = option("", "run name in reports (default: the out_dir name)")

    def validate(self) -> None:
        if not self.model_path:
            raise InputError("--model_path is required", field="model_path")
        if not self.out_dir:
            raise InputError("--out_dir is required", field="out_dir")
        if not self.subsets:
            raise InputError("no subsets to evaluate", field="subsets")
        unknown = [s for s in self.subsets if s not in SUBSETS]
        if unknown:
            raise InputError(f"unknown subset(s) {unknown}; known: {', '.join(SUBSETS)}", field="subsets")
        for key in ("block_size", "max_new_tokens", "gen_batch_size", "reward_batch_size", "reward_max_length"):
            if getattr(self, key) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, key)}", field=key)
        if self.limit < 0:
            raise InputError(f"must be >= 0 (0: all examples), got {self.limit}", field="limit")
        if self.block_size <= RESPONSE_BUDGET:
            raise InputError(f"must exceed the {RESPONSE_BUDGET}-token response budget, got {self.block_size}",
                             field="block_size")
        if self.max_new_tokens > RESPONSE_BUDGET:
            raise InputError(f"must be at most the {RESPONSE_BUDGET}-token response budget, got {self.max_new_tokens}: "
                             f"prompts are cut to block_size - {RESPONSE_BUDGET} tokens, so a longer response would "
                             "make prompt + response exceed block_size", field="max_new_tokens")
        if self.torch_dtype not in DTYPE_CHOICES:
            raise InputError(f"must be auto, float32, bfloat16 or float16, got {self.torch_dtype!r}",
                             field="torch_dtype")

    @property
    def run_name(self) -> str:
        return self.name or Path(self.out_dir).name


def build_eval_parser():
    parser = build_parser(EvalConfig, "Evaluate a causal LM on HH-RLHF test subsets (one stage per call).")
    parser.add_argument("stage", choices=STAGES,
                        help="generate: responses; reward: eval RM scores; score: BLEU + report")
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> Tuple[str, EvalConfig]:
    args = vars(build_eval_parser().parse_args(argv))
    stage = args.pop("stage")
    cfg = EvalConfig(**args)
    cfg.validate()
    return stage, cfg

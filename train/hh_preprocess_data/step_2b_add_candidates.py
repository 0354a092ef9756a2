"""Step 2b: sample k extra candidates per prompt from a policy, score every candidate with the training reward model,
write ranked length-n rows (see docs/longer_rankings.md).

    python train/hh_preprocess_data/step_2b_add_candidates.py --n 3 --k 2 \\
        --model_path HuggingFaceTB/SmolLM2-135M-Instruct --reward_model resources/reward_models/train_rm
    accelerate launch --num_processes 4 train/hh_preprocess_data/step_2b_add_candidates.py ...   (sharded)

Default files: data/hh_train_len2/train.json -> data/hh_train_len<n>/train.json. For the dev file:
--in_file data/hh_dev/sampled_dev.json --out_file data/hh_dev_len<n>/sampled_dev.json --order input --chosen_first.
Resumable: shards under <out_file>.work/ (or --work_dir); a rerun computes only the missing chunks.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from clha.data.candidates import (ORDERS, CandidateConfig, ShardError, human_chosen_index,
                                  merge_and_write, precision_of, read_input, run_chunks)
from clha.errors import InputError
from clha.threads import configure_threads  # noqa: E402

logger = logging.getLogger("step_2b")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in_file", default=None, help="ranked file, every row with the same number of candidates "
                                                   "(default: <repo>/data/hh_train_len2/train.json)")
    p.add_argument("--out_file", default=None, help="output (default: <repo>/data/hh_train_len<n>/train.json)")
    p.add_argument("--n", type=int, required=True, help="candidates per output row (input candidates < n <= "
                                                        "input candidates + k)")
    p.add_argument("--k", type=int, default=2, help="responses sampled per prompt (default 2)")
    p.add_argument("--model_path", required=True, help="policy: Hugging Face folder or hub id (with --gguf_file: "
                                                       "the folder holding the GGUF file)")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model_path (de-quantized to float)")
    p.add_argument("--reward_model", required=True, help="the TRAINING reward model (folder or hub id)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42, help="sampling seed (row r's samples use seed, r, sample j)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--block_size", type=int, default=512, help="as in training: prompts cut from the left to "
                                                               "block_size - 128 tokens")
    p.add_argument("--gen_batch_size", type=int, default=8, help="rows (prompt x sample) decoded together")
    p.add_argument("--reward_batch_size", type=int, default=16)
    p.add_argument("--reward_max_length", type=int, default=512, help="reward model input tokens (cut from the "
                                                                      "left)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="policy and reward model weights (auto: bf16 on a GPU that supports it, else float32)")
    p.add_argument("--order", default="reward", choices=ORDERS,
                   help="reward: best first (training files); input: the input candidates in their order, then the "
                        "samples best first (dev files in human order)")
    p.add_argument("--chosen_first", action="store_true",
                   help="the input's first candidate is the human chosen reply (dev/test files); for the summary")
    p.add_argument("--step1_dir", default=None,
                   help="step-1 output of the input rows: tells the summary which candidate was the human chosen "
                        "reply of a training file that step 2 ranked by reward")
    p.add_argument("--work_dir", default=None, help="shards and summary.json (default: <out_file>.work)")
    p.add_argument("--chunk_size", type=int, default=64, help="rows per shard (the unit of resume)")
    p.add_argument("--force", action="store_true", help="recompute every chunk")
    return p.parse_args(argv)


def config_from_args(args) -> CandidateConfig:
    in_file = Path(args.in_file) if args.in_file else ROOT / "data/hh_train_len2/train.json"
    out_file = Path(args.out_file) if args.out_file else ROOT / f"data/hh_train_len{args.n}/train.json"
    return CandidateConfig(
        in_file=str(in_file), out_file=str(out_file), n=args.n, k=args.k, model_path=args.model_path,
        reward_model=args.reward_model, gguf_file=args.gguf_file, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
        gen_batch_size=args.gen_batch_size, reward_batch_size=args.reward_batch_size,
        reward_max_length=args.reward_max_length, dtype=args.dtype, order=args.order, work_dir=args.work_dir,
        chunk_size=args.chunk_size, force=args.force)


def main(argv=None) -> int:
    from clha.loading import make_accelerator

    args = parse_args(argv)
    cfg = config_from_args(args)
    cfg.check()
    rows = read_input(cfg)
    chosen = human_chosen_index(rows, args.step1_dir, args.chosen_first)
    acc = make_accelerator()
    start = time.perf_counter()
    done = run_chunks(cfg, rows, acc.process_index, acc.num_processes, acc.device)
    logger.info("rank %d: %d chunks computed in %.1f s", acc.process_index, len(done), time.perf_counter() - start)
    acc.wait_for_everyone()
    if acc.is_main_process:
        summary = merge_and_write(cfg, rows, precision_of(cfg, acc.device), chosen)
        print("summary: " + json.dumps(summary, ensure_ascii=False))
    acc.wait_for_everyone()
    return 0


def run(argv=None) -> int:
    """main(argv) with logging to stderr; bad input or incomplete shards -> one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    configure_threads()
    try:
        return main(argv)
    except (InputError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())

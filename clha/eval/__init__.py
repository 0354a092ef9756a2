"""Evaluation on the HH-RLHF test subsets: generate -> reward -> score, sharded over processes.

    accelerate launch ... eval_hh/evaluate.py generate --model_path M --test_dir data/hh_test --out_dir OUT ...
    accelerate launch ... eval_hh/evaluate.py reward   ... --eval_reward_model RM
    accelerate launch ... eval_hh/evaluate.py score    ...
    (eval_hh/run_infer_main_dist.sh runs the three; see docs/evaluation.md)

Protocol (docs/method.md, Evaluation): greedy decoding (`clha.generation`), at most 128 new tokens, response cut at
the first "Human:"/"Assistant:". Per subset and over all examples pooled (sample-weighted, as the reference):
- Reward: mean of sigmoid(eval RM logit) x 100. The evaluation RM must differ from the training RM.
- BLEU: nltk `sentence_bleu` defaults (4-gram, uniform weights, brevity penalty, no smoothing) of the response
  against the human-chosen reply (suffix[0]), x 100. The reference code passed the two *strings* to nltk, so its
  BLEU is over characters; "BLEU" here is the same (comparable with the published tables) and "BLEU (words)" is
  the same formula over word/punctuation tokens.
- Beyond the paper: win rate against the human-chosen reply under the eval RM (ties count half), the chosen
  reply's own reward, the mean response length in whitespace-separated words, and the share of responses that
  used all new tokens without EOS or a stop string.

Sharding and resume: in every stage, process `r` of `W` takes the examples `i` with `i % W == r` of each subset and
writes one shard `OUT/shards/<stage>/<subset>.rank<r>-of-<W>.json` (atomically). A shard records a fingerprint of
everything its content depends on (model files, settings, test data, the previous stage's merged content); a rerun
skips a (subset, rank) whose shard is complete and current, so a crashed evaluation resumes, and `--force` redoes
it. Merging orders rows by example index and fails loudly when an example is missing or present twice.

Outputs of the score stage, in OUT: `report.md`, `report.json` (the same numbers), `examples.jsonl` (one row per
example: prompt, response, rewards, BLEU ...; every report number is a plain mean of a column of this file) and
`reward_by_subset.png`. `compare_runs` (eval_hh/compare.py) puts several runs side by side.

Modules: `config` (`EvalConfig`, the options), `inputs` (test files, the policy checkpoint, the reward models'
identities), `shards` (shard files, fingerprints, merging), `stages` (generate / reward / score, `main`), `bleu`
(BLEU and the reward transform), `report` (report.json / report.md / the chart), `compare` (several runs).
"""

"""Training a policy: the loop (`trainer`), its checkpoints and resumable state (`state`), DPO's reference
log-probs (`reference`), validation on the dev prompts (`validation`) and the logs (`records`).

Only the training entry points (`train/main.py`, the demo) use this package; evaluation, reward scoring and
reward-model training share the base layer `clha.loading` instead.
"""

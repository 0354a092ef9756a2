"""Reward models: scoring (`scoring`: `load_reward_model`, `RewardScorer` and its Hugging Face backends), the
OpenAssistant GPT-NeoX architecture (`neox`), and training one (`config`, `data`, `losses`, `metrics`, `batches`,
`model`, `trainer`: `RewardModelTrainer`, `run_reward_training`).

Scoring is what the rest of the project uses (preprocessing steps 2 and 3, validation during training, the
evaluation's reward stage); training writes a folder that scoring loads like any other reward model.
"""

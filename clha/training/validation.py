"""Validation during training: greedy generation on the dev prompts, scored by the reward model (methods of
`clha.training.trainer.Trainer`). Writes ``validation.jsonl`` and ``dev_generations_step_<N>.jsonl`` under
log_path, a checkpoint per validation, and points ``best_checkpoint`` at the best one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List

import torch

from clha.fileio import atomic_write
from clha.training.state import point_symlink

logger = logging.getLogger("clha.training")


class ValidationMixin:
    """Uses the trainer's cfg, accelerator, model, tokenizer, dev_examples, pos, history and scalars."""

    def _scorer(self):
        if self._reward_model is None:
            from clha.rm.scoring import load_reward_model
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin is None:
                self._reward_model = load_reward_model(self.cfg.reward_model, device=self.accelerator.device)
                return self._reward_model
            # Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, which then partitions every
            # model it loads (zero.Init); the reward model is used whole on each process, outside DeepSpeed.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
            try:
                self._reward_model = load_reward_model(self.cfg.reward_model, device=self.accelerator.device)
            finally:
                plugin.set_deepspeed_weakref()
        return self._reward_model

    def validate(self) -> float:
        """Greedy generation on this process's share of the dev prompts, scored by the reward model."""
        from clha.generation import generate_responses
        from clha.modeling import _attention_implementation, attn_implementation_as

        cfg, acc = self.cfg, self.accelerator
        mine = list(range(acc.process_index, len(self.dev_examples), acc.num_processes))
        prompts = [self.dev_examples[i].prompt_turns for i in mine]
        model = acc.unwrap_model(self.model)
        # A policy that trains with flex attention generates with sdpa: KV-cache decoding gains nothing from block
        # masks, and flex would compile again for every new shape (measured on an H200: 42 s for the first call,
        # then 1.8x slower than sdpa, same responses).
        gen_attn = "sdpa" if _attention_implementation(model) == "flex_attention" else _attention_implementation(model)
        with attn_implementation_as(model, gen_attn):
            responses = generate_responses(model, self.tokenizer, prompts, block_size=cfg.block_size,
                                           max_new_tokens=cfg.max_new_tokens,
                                           batch_size=cfg.per_device_eval_batch_size, progress=acc.is_main_process)
        rewards = self._scorer().score(prompts, responses, batch_size=cfg.reward_batch_size) if prompts else []
        local = [(i, r, float(s)) for i, r, s in zip(mine, responses, rewards)]
        gathered = _gather_objects(acc, local)
        gathered.sort(key=lambda t: t[0])
        mean_reward = sum(torch.sigmoid(torch.tensor(s)).item() for _, _, s in gathered) / max(len(gathered), 1)
        step = self.pos.global_step
        name = f"step_{step}"
        record = {"step": step, "dev_reward": mean_reward, "num_prompts": len(gathered),
                  "mean_response_words": sum(len(r.split()) for _, r, _ in gathered) / max(len(gathered), 1)}
        improved = self.pos.best_reward is None or mean_reward > self.pos.best_reward
        self.save_hf_checkpoint(name)
        if improved:
            self.pos.best_reward, self.pos.best_step = mean_reward, step
            if acc.is_main_process:
                point_symlink(Path(cfg.output_dir) / "best_checkpoint", name)
        record.update(best_step=self.pos.best_step, best_reward=self.pos.best_reward)
        if acc.is_main_process:
            with open(Path(cfg.log_path) / "validation.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            with atomic_write(Path(cfg.log_path) / f"dev_generations_{name}.jsonl") as f:
                for i, r, s in gathered:
                    f.write(json.dumps({"index": i, "prompt": self.dev_examples[i].prompt_text(), "response": r,
                                        "reward": s}, ensure_ascii=False) + "\n")
            self.scalars.add("dev/reward", mean_reward, step)
            logger.info("step %d: dev reward %.4f (best %.4f at step %s)", step, mean_reward,
                        self.pos.best_reward, self.pos.best_step)
        self.history.append(record)
        acc.wait_for_everyone()
        self.model.train()
        return mean_reward


def _gather_objects(accelerator, items: List) -> List:
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object
    return list(gather_object(items))

"""Reward-model scoring: one logit per (prompt, response) pair.

Two backends behind one interface (`RewardScorer.score`):

(a) any Hugging Face sequence-classification model with one label (Llama / GPT-NeoX / BERT / DeBERTa ...
    `*ForSequenceClassification`). Input text: the prompt turns rendered as HH-RLHF text
    (`clha.data.format.render_prompt`) + " " + response; the tokenizer adds its own special tokens
    ([CLS] ... [SEP], BOS) as it normally would.
(b) OpenAssistant GPT-NeoX reward models (`model_type: gpt_neox_reward_model`, see `clha.rm.neox`). Input
    text: `<|prompter|>q<|endoftext|><|assistant|>a<|endoftext|>...<|assistant|>response<|endoftext|>`, each turn
    followed by the tokenizer's eos.

Both truncate FROM THE LEFT to `max_length` tokens (the special tokens the tokenizer adds are kept), so the end
of the dialogue, the response being judged, always survives. Batches are sorted by length (longest first),
right-padded with an attention mask, run under `torch.inference_mode()`; scores come back as Python floats in
input order.

Precision: `load_reward_model` loads the backbone in `dtype` (bf16 on a GPU by default) but runs the one-logit
head (`score` / `classifier` / `out_proj`) in float32 on a float32 copy of its input (`fp32_reward_head`), so the
logits are float32. A bf16 logit keeps 8 significant bits (between 2 and 4 the step is 1/64), which rounds reward
gaps and turns close comparisons (response vs chosen reply) into ties.

Typical use::

    scorer = load_reward_model("OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1")   # or a local folder
    rewards = scorer.score([["<|prompter|>Hi", "<|assistant|>"]], ["Hello! How can I help?"])
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from clha.data.format import ASSISTANT, PROMPTER, model_input_text, render_prompt
from clha.errors import InputError
from clha.loading import check_location, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

# `progress=None` shows a progress bar when a call needs more than this many batches.
PROGRESS_MIN_BATCHES = 4

Prompt = Sequence[str]

# --------------------------------------------------------------------------------------------------------------
# Input formats
# --------------------------------------------------------------------------------------------------------------

def _check_prompt(prompt) -> List[str]:
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise TypeError("a prompt must be a list of marker turns ('<|prompter|>...', '<|assistant|>...'), "
                        f"got {type(prompt).__name__}")
    turns = list(prompt)
    for turn in turns:
        if not isinstance(turn, str) or not (turn.startswith(PROMPTER) or turn.startswith(ASSISTANT)):
            raise ValueError(f"turn does not start with {PROMPTER} or {ASSISTANT}: {str(turn)[:40]!r}")
    return turns


def format_hh_input(prompt: Prompt, response: str) -> str:
    """Backend (a) text: rendered HH-RLHF prompt ("\\n\\nHuman: ...\\n\\nAssistant:") + " " + response."""
    return model_input_text(render_prompt(_check_prompt(prompt)), response)


def format_oasst_input(prompt: Prompt, response: str, eos_token: str = "<|endoftext|>") -> str:
    """Backend (b) text: every marker turn followed by eos, then `<|assistant|>response<eos>`.

    The bare trailing `<|assistant|>` of a ranked-format prompt is where the response goes, so it is dropped
    before the response turn is appended.
    """
    turns = _check_prompt(prompt)
    if turns and turns[-1] == ASSISTANT:
        turns = turns[:-1]
    return "".join(turn + eos_token for turn in turns) + ASSISTANT + response + eos_token


# --------------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------------

class RewardScorer:
    """Base class: anything that gives one reward logit per (prompt, response) pair.

    Subclasses implement `score`; `score_pairs` and `score_ranked` are built on it.
    """

    name: str = ""

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16,
              progress: Optional[bool] = None) -> List[float]:
        """One reward logit per pair, in input order. `prompts[i]` is a list of marker turns."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16,
                 progress: Optional[bool] = None) -> List[float]:
        return self.score(prompts, responses, batch_size=batch_size, progress=progress)

    def score_pairs(self, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str],
                    batch_size: int = 16, progress: Optional[bool] = None) -> Tuple[List[float], List[float]]:
        """Score chosen and rejected responses of the same prompts in one pass: (chosen_scores, rejected_scores)."""
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(f"prompts ({len(prompts)}), chosen ({len(chosen)}) and rejected ({len(rejected)}) "
                             "must have the same length")
        scores = self.score(list(prompts) + list(prompts), list(chosen) + list(rejected), batch_size=batch_size,
                            progress=progress)
        n = len(prompts)
        return scores[:n], scores[n:]

    def score_ranked(self, examples, batch_size: int = 16, progress: Optional[bool] = None) -> List[List[float]]:
        """Score every candidate of ranked examples (`RankedExample`: prefix[k] + suffix[k]); one list per example."""
        prompts: List[Prompt] = []
        responses: List[str] = []
        for ex in examples:
            for turns, response in zip(ex.prefix, ex.suffix):
                prompts.append(turns)
                responses.append(response)
        flat = self.score(prompts, responses, batch_size=batch_size, progress=progress)
        out, pos = [], 0
        for ex in examples:
            out.append(flat[pos:pos + len(ex.suffix)])
            pos += len(ex.suffix)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class HFRewardScorer(RewardScorer):
    """Backend (a): a one-label Hugging Face sequence classifier, HH-RLHF text input, left truncation.

    Can wrap an in-memory model + tokenizer (e.g. one just trained); `load_reward_model` builds it from a path.
    The tokenizer is set to right padding and left truncation; if it has no pad token, eos becomes the pad token
    and `model.config.pad_token_id` is set to it, so causal-LM classifiers pool the last real token.
    """

    input_format = "hh"

    def __init__(self, model, tokenizer, name: Optional[str] = None, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.name = str(name if name is not None else getattr(model.config, "_name_or_path", "") or "")
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise InputError("the tokenizer has neither a pad token nor an eos token to pad with", self.name)
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) != tokenizer.pad_token_id:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        self.max_length = self._effective_max_length(max_length)
        params = inspect.signature(model.forward).parameters
        self._use_token_type_ids = "token_type_ids" in params and "token_type_ids" in getattr(
            tokenizer, "model_input_names", ["token_type_ids"])

    # -- inputs --------------------------------------------------------------------------------------------
    def _effective_max_length(self, max_length: int) -> int:
        if max_length is None or int(max_length) < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        limit = int(max_length)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and 0 < positions < limit:
            logger.warning("%s: max_length %d exceeds the model's %d positions; using %d",
                           self.name, limit, positions, positions)
            limit = positions
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < limit:
            limit = tok_max
        return limit

    def format_input(self, prompt: Prompt, response: str) -> str:
        """The exact text the reward model sees for one pair (before tokenization and truncation)."""
        return format_hh_input(prompt, response)

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> List[Dict[str, List[int]]]:
        """Tokenize pairs (special tokens added, left-truncated to max_length), unpadded."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
        for i, response in enumerate(responses):
            if not isinstance(response, str):
                raise TypeError(f"response {i} is a {type(response).__name__}, not a string")
        texts = [self.format_input(p, r) for p, r in zip(prompts, responses)]
        if not texts:
            return []
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=self._use_token_type_ids)
        keys = ["input_ids"] + (["token_type_ids"] if self._use_token_type_ids else [])
        rows = [{k: list(enc[k][i]) for k in keys} for i in range(len(texts))]
        for i, row in enumerate(rows):
            if not row["input_ids"]:
                raise ValueError(f"pair {i} tokenizes to no tokens")
        return rows

    def forward_logits(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Differentiable logits (one per pair) on exactly the inputs `score` uses: for training reward models."""
        rows = self.encode(prompts, responses)
        batch = {k: v.to(self.device) for k, v in self._collate(rows).items()}
        logits = self.model(**batch).logits
        return logits.reshape(len(rows), -1)[:, 0]

    def _collate(self, rows: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long) if self._use_token_type_ids else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if token_type_ids is not None:
                token_type_ids[i, :n] = torch.tensor(row["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return batch

    # -- scoring -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return torch.device("cpu")

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16,
              progress: Optional[bool] = None) -> List[float]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = self.encode(prompts, responses)
        if not rows:
            return []
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # longest first, stable
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        show = progress if progress is not None else len(batches) > PROGRESS_MIN_BATCHES
        scores: List[Optional[float]] = [None] * len(rows)
        device = self.device
        was_training = self.model.training
        self.model.eval()
        try:
            from tqdm.auto import tqdm

            with torch.inference_mode(), tqdm(total=len(rows), disable=not show, desc="reward", unit="pair",
                                              leave=False) as bar:
                for idx in batches:
                    batch = {k: v.to(device) for k, v in self._collate([rows[i] for i in idx]).items()}
                    logits = self.model(**batch).logits
                    if logits.dim() == 1:
                        logits = logits.unsqueeze(-1)
                    if logits.shape[-1] != 1:
                        raise ValueError(f"{self.name}: the model returns {logits.shape[-1]} logits per input; "
                                         "a reward model must return one")
                    for i, value in zip(idx, logits[:, 0].float().cpu().tolist()):
                        scores[i] = float(value)
                    bar.update(len(idx))
        finally:
            if was_training:
                self.model.train()
        return scores  # type: ignore[return-value]


class OAsstRewardScorer(HFRewardScorer):
    """Backend (b): OpenAssistant GPT-NeoX reward model, `<|prompter|>...<|endoftext|>` input, left truncation."""

    input_format = "oasst"

    def format_input(self, prompt: Prompt, response: str) -> str:
        return format_oasst_input(prompt, response, self.tokenizer.eos_token)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

HEAD_NAMES = ("score", "classifier", "out_proj")


def fp32_reward_head(model) -> Optional[str]:
    """Make the model's one-logit head compute in float32: its weights are cast to float32 and its input is cast
    up with autocast off, so the logits come out float32 whatever the backbone's dtype. Returns the head's
    attribute name (`score` for Llama / GPT-NeoX classifiers, `classifier` for BERT / DeBERTa, `out_proj` for
    OpenAssistant's models), or None when the model has none of them (its logits are then only cast afterwards).
    Idempotent."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module) and any(True for _ in head.parameters()):
            break
    else:
        return None
    if getattr(head, "_clha_fp32_head", False):
        return name
    head.float()
    inner = head.forward

    def forward(hidden, *args, **kwargs):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return inner(hidden.float(), *args, **kwargs)

    head.forward = forward
    head._clha_fp32_head = True
    return name


def load_reward_model(path_or_id: Union[str, os.PathLike], device: Union[str, torch.device, None] = None,
                      max_length: int = 512, dtype: Union[torch.dtype, str, None] = None) -> RewardScorer:
    """Load a reward model from a local folder or a hub id; the backend follows the config's `model_type`.

    `gpt_neox_reward_model` -> `OAsstRewardScorer`; anything else -> `HFRewardScorer` over
    `AutoModelForSequenceClassification` (one label). A checkpoint that holds only a backbone (no classifier,
    e.g. a sentence-transformers folder) is loaded with a new, untrained one-label head and a warning.
    `device`: default cuda when available, else cpu. `dtype`: default bf16 on GPU, fp32 on CPU; the head always
    computes in float32 (`fp32_reward_head`).
    Raises `InputError` naming the path when it does not exist or cannot be loaded.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from clha.rm import neox as reward_neox  # registers gpt_neox_reward_model with the Auto classes

    name = os.fspath(path_or_id)
    if not isinstance(name, str) or not name.strip():
        raise InputError("empty reward model path or id", repr(path_or_id))
    location = check_location(name, None, "reward model")
    if os.path.isdir(location) and not os.path.isfile(os.path.join(location, "config.json")):
        raise InputError("has no config.json: not a Hugging Face model folder", name)

    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load the reward model config: {err}", name) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the reward model tokenizer: {err}", name) from err

    try:
        if getattr(config, "model_type", None) == reward_neox.MODEL_TYPE:
            model = reward_neox.GPTNeoXRewardModel.from_pretrained(location, config=config, dtype=dtype_)
            scorer_cls = OAsstRewardScorer
        else:
            kwargs = {}
            if getattr(config, "num_labels", 1) != 1:
                architectures = getattr(config, "architectures", None) or []
                if any(a.endswith(("ForSequenceClassification", "RewardModel")) for a in architectures):
                    raise InputError(f"the classifier has {config.num_labels} labels; a reward model must have "
                                     "one", name)
                logger.warning("%s holds no one-label classification head (architectures %s): loading it with "
                               "a NEW, UNTRAINED one-label head; its scores are meaningless until trained",
                               name, architectures)
                kwargs["num_labels"] = 1
            model = AutoModelForSequenceClassification.from_pretrained(location, dtype=dtype_, **kwargs)
            scorer_cls = HFRewardScorer
    except OSError as err:
        raise InputError(f"cannot load the reward model weights: {err}", name) from err
    model.to(device_)
    if dtype_ != torch.float32:
        fp32_reward_head(model)
    model.eval()
    return scorer_cls(model, tokenizer, name=name, max_length=max_length)


__all__ = ["RewardScorer", "HFRewardScorer", "OAsstRewardScorer", "load_reward_model", "format_hh_input",
           "format_oasst_input", "fp32_reward_head", "PROGRESS_MIN_BATCHES"]

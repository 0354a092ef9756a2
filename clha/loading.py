"""The base layer every run builds on: accelerator, dtypes, model locations, loading and saving Hugging Face models,
TensorBoard scalars.

Training (`clha.training`), evaluation (`clha.eval`), reward scoring and reward-model training (`clha.rm`) all take
these from here, so none of them imports another's loop, and the rules below hold everywhere:

- **Locations** (`looks_local`, `check_location`): a model argument is a local folder or a hub id ("name" or
  "org/name"). A string that can only be a path ("./x", "/x", "~/x", "x/", "a/b/c") and does not exist is an
  `InputError` ("... path does not exist") before anything is downloaded or loaded.
- **Dtypes** (`resolve_dtype`): "auto" (or None) is bfloat16 on a CUDA device that supports it and float32
  elsewhere; names and short aliases ("bf16", "fp16", ...) and torch dtypes are accepted.
- **Policies** (`load_policy`): tokenizer and causal LM from a folder, a hub id or a GGUF file inside a folder
  (de-quantized into a dense float model, `from_pretrained_dense`); a tokenizer without a pad token pads with EOS.
- **Saving** (`save_hf_folder`): model, tokenizer and JSON files written under a temporary name and renamed into
  place, so a folder is either the previous one or the complete new one.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from clha.errors import InputError
from clha.fileio import atomic_folder, write_json

DEFAULT_TIMEOUT_MINUTES = 60
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# ---------------------------------------------------------------------------------------------------- accelerator
def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_mixed_precision(name: Optional[str], cuda_bf16: Optional[bool] = None) -> Optional[str]:
    """The accelerate ``mixed_precision`` of a run: None leaves it to `accelerate launch`; "auto" takes what the
    launch config said and, without one, bf16 autocast on a GPU that supports it and none (fp32) elsewhere;
    "no" / "bf16" / "fp16" are used as given (bf16 autocast also runs on the CPU). ``cuda_bf16`` overrides the
    device check (the tests emulate a GPU's defaults on the CPU with it)."""
    if name is None or name != "auto":
        return name
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched.lower()
    return "bf16" if (cuda_supports_bf16() if cuda_bf16 is None else cuda_bf16) else "no"


def make_accelerator(cfg=None, timeout_minutes: Optional[int] = None):
    """The Accelerator of a run.

    ``cfg``: a training config with gradient_accumulation_steps, per_device_train_batch_size, max_grad_norm and,
    optionally, mixed_precision (see `resolve_mixed_precision`; None: what `accelerate launch` was told) and
    ddp_timeout_minutes; None for a run that does not train (evaluation): one step per batch, precision as
    launched. ``timeout_minutes`` (default: the config's, else 60) bounds how long a process waits for the others
    in a collective operation of a multi-process run (also DeepSpeed's: accelerate passes it on)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # (A single process must get no process-group settings: accelerate would then expect a process group.)
        minutes = timeout_minutes or getattr(cfg, "ddp_timeout_minutes", None) or DEFAULT_TIMEOUT_MINUTES
        group = {"timeout": timedelta(minutes=minutes)}
        if not torch.cuda.is_available():
            # Without CUDA accelerate sets no process-group backend; DeepSpeed on the CPU needs gloo.
            group["backend"] = "gloo"
        handlers.append(InitProcessGroupKwargs(**group))
    if cfg is None:
        return Accelerator(kwargs_handlers=handlers)
    mixed_precision = resolve_mixed_precision(getattr(cfg, "mixed_precision", None))
    kwargs = {"mixed_precision": mixed_precision} if mixed_precision else {}
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              kwargs_handlers=handlers, **kwargs)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
    return accelerator


def adamw_param_groups(model, weight_decay: float) -> List[dict]:
    """Trainable parameters in two AdamW groups: weight decay on weights, none on biases and norms."""
    no_decay = ("bias", "norm")
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if any(k in name.lower() for k in no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]       # (LoRA adapters have no bias / norm parameters)


# --------------------------------------------------------------------------------------------------------- dtypes
def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """None: cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Union[str, torch.dtype, None] = "auto", device=None) -> torch.dtype:
    """A torch dtype from a name ("auto", "float32", "bfloat16", "float16" or an alias such as "bf16"), a torch
    dtype, or None (= "auto"). "auto": bfloat16 on a CUDA device that supports it, float32 otherwise; ``device``
    None means the device a model would get by default (`resolve_device`)."""
    if dtype is None or dtype == "auto":
        cuda = resolve_device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------------ locations
def looks_local(name: str) -> bool:
    """True for a string that can only be a filesystem path, never a hub id ("name" or "org/name")."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    return "\\" in name or name.endswith("/") or name.count("/") > 1


def check_location(name: Optional[str], field: Optional[str], what: str = "model", gguf_file: Optional[str] = None) -> str:
    """The expanded location of a model argument. An existing path must be a folder (holding ``gguf_file`` when
    one is given); a missing one that can only be a path raises `InputError` "<what> path does not exist"; any
    other string is returned as a hub id (checked when it is loaded)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"no {what} given", field=field)
    location = os.path.expanduser(name)
    if os.path.exists(location):
        if not os.path.isdir(location):
            raise InputError("is a file, not a model folder", path=name, field=field)
        if gguf_file and not os.path.isfile(os.path.join(location, gguf_file)):
            raise InputError(f"GGUF file {gguf_file!r} not found in the model folder", path=name, field="gguf_file")
    elif looks_local(name):
        raise InputError(f"{what} path does not exist", path=name, field=field)
    return location


# ------------------------------------------------------------------------------------------------------- loading
def load_tokenizer(location: str, gguf_file: Optional[str] = None, field: str = "model_name_or_path",
                   pad_with_eos: bool = True):
    """`AutoTokenizer.from_pretrained` (from the GGUF file when one is given); without a pad token it pads with
    EOS. Errors name the location."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a tokenizer: {err}", path=location, field=field) from None
    if pad_with_eos and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(model_name_or_path: str, gguf_file: Optional[str] = None, dtype_name="auto",
                attn_implementation: Optional[str] = "auto", field: str = "model_name_or_path"):
    """(model, tokenizer) of a causal LM from a folder, a hub id, or a GGUF file inside a folder. ``dtype_name``: a
    `resolve_dtype` name or a torch dtype; ``attn_implementation``: see `clha.modeling.set_attn_implementation`
    (None keeps what transformers chose). The tokenizer pads with EOS when it has no pad token, and the model's
    config records the pad id."""
    from transformers import AutoModelForCausalLM

    path = check_location(model_name_or_path, field, "model", gguf_file)
    tokenizer = load_tokenizer(path, gguf_file, field)
    try:
        model = from_pretrained_dense(AutoModelForCausalLM, path, gguf_file, dtype=resolve_dtype(dtype_name))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a causal LM: {err}", path=path, field=field) from None
    if attn_implementation is not None:
        from clha.modeling import set_attn_implementation
        set_attn_implementation(model, attn_implementation)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def from_pretrained_dense(auto_class, path: str, gguf_file: Optional[str] = None, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)`; with a GGUF file inside `path`, its weights unpacked into a
    dense float model that trains and saves like any other (policies, evaluation and reward models all load
    through here)."""
    model = auto_class.from_pretrained(path, **kwargs, **gguf_load_kwargs(gguf_file))
    if gguf_file:
        drop_gguf_quantizer(model)
    return model


def gguf_load_kwargs(gguf_file: Optional[str]) -> dict:
    """`from_pretrained` keyword arguments that unpack a GGUF file into a dense float model (trainable, saved as a
    normal checkpoint, and run by the ordinary float kernels); {} without a GGUF file. Call
    `drop_gguf_quantizer` on the loaded model."""
    if not gguf_file:
        return {}
    kwargs = {"gguf_file": gguf_file}
    try:
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    except (ImportError, TypeError):   # older transformers always de-quantize GGUF files and have no such option
        pass
    return kwargs


def drop_gguf_quantizer(model) -> None:
    """A de-quantized GGUF model is a plain dense model: forget the GGUF loader so it trains and saves as one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("_is_quantized", None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass


# -------------------------------------------------------------------------------------------------------- saving
def save_hf_folder(out_dir: Union[str, os.PathLike], model, tokenizer, json_files: Optional[Dict[str, Any]] = None,
                   state_dict=None, save_model: Optional[Callable[[Path], None]] = None) -> Path:
    """A Hugging Face folder: the model (safetensors; ``save_model(folder)`` instead when given, e.g. a LoRA
    checkpoint), the tokenizer and ``json_files`` ({file name: object}), written under a temporary name and
    renamed into place (an older folder of that name is replaced). ``state_dict``: the weights to save when the
    model's own are partitioned (ZeRO-3)."""
    with atomic_folder(out_dir) as tmp:
        if save_model is not None:
            save_model(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (json_files or {}).items():
            write_json(tmp / name, obj)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------- TensorBoard
class ScalarWriter:
    """TensorBoard scalars under ``<log_dir>/tensorboard``, the writer created on first use. TensorBoard is optional
    at run time: without it nothing is written."""

    def __init__(self, log_dir: Union[str, os.PathLike]):
        self.log_dir = Path(log_dir)
        self._writer = None

    def _get(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"))
            except ImportError:
                self._writer = False
        return self._writer

    def add(self, tag: str, value: float, step: int, flush: bool = True) -> None:
        writer = self._get()
        if writer:
            writer.add_scalar(tag, value, step)
            if flush:
                writer.flush()

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()

"""The trainer's AdamW: fused when accelerate places the parameters on CUDA and the run is not DeepSpeed; torch's
default (foreach) implementation on the CPU and under DeepSpeed."""

import pytest
import torch
from accelerate.utils import DistributedType

from clha.config import parse_config
from tests.test_trainer import _args, _write_data, fresh_accelerate  # noqa: F401


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that records the keyword arguments the trainer passes, then builds without `fused` (no CUDA here)."""

    calls = []

    def __init__(self, params, **kwargs):
        type(self).calls.append(dict(kwargs))
        kwargs.pop("fused", None)
        super().__init__(params, **kwargs)


class _ReportedAs:
    """A real CPU accelerator that reports another device and distributed type to the trainer (what decides the
    optimizer); everything else, model placement included, is the real accelerator's."""

    def __init__(self, real, device: str, distributed_type):
        self._real = real
        self.device = torch.device(device)
        self.distributed_type = distributed_type

    def __getattr__(self, name):
        return getattr(self._real, name)


def _trainer(tmp_path, tiny_lm_dir, accelerator=None):
    from clha.training.trainer import Trainer

    cfg = parse_config(_args(tiny_lm_dir, _write_data(tmp_path, num=4), tmp_path / "o", tmp_path / "l", 1))
    trainer = Trainer(cfg, accelerator=accelerator(cfg) if accelerator else None)
    trainer.setup()
    return trainer


def test_a_cpu_run_does_not_ask_for_fused_adamw(tmp_path, tiny_lm_dir, fresh_accelerate):
    trainer = _trainer(tmp_path, tiny_lm_dir)
    assert trainer.accelerator.device.type == "cpu"
    defaults = trainer.optimizer.defaults
    assert not defaults["fused"] and defaults["foreach"] is None      # torch picks its default implementation


@pytest.mark.parametrize("distributed_type, fused", [(DistributedType.NO, True), (DistributedType.DEEPSPEED, None)])
def test_fused_adamw_on_cuda_unless_deepspeed(tmp_path, tiny_lm_dir, fresh_accelerate, monkeypatch,
                                              distributed_type, fused):
    from clha.loading import make_accelerator

    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    monkeypatch.setattr(_RecordingAdamW, "calls", [])
    _trainer(tmp_path, tiny_lm_dir, lambda cfg: _ReportedAs(make_accelerator(cfg), "cuda", distributed_type))
    assert len(_RecordingAdamW.calls) == 1
    assert _RecordingAdamW.calls[0].get("fused") is fused

"""The training step's formats on the CPU: channels-last by default in fp32, bf16 autocast only when asked."""

import pytest
import torch

from fastpred.train.config import resolve
from fastpred.train.step import Learner

TINY = {"data": "synthetic", "proj_dim": 8, "proj_hidden": 16, "batch_size": 8, "resolution": 16}


def _step(**given) -> tuple[Learner, dict]:
    """One step of a tiny Learner on the CPU; the dtype and layout the first convolution saw and gave."""
    cfg = resolve({**TINY, **given})
    learner = Learner(cfg, rank=0, world_size=1, device=torch.device("cpu"), num_classes=10, steps_per_epoch=3)
    conv = next(m for m in learner.online.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    seen = {}

    def on_conv(module, inputs, out):
        seen.update(input_cl=inputs[0].is_contiguous(memory_format=torch.channels_last), out_dtype=out.dtype)

    conv.register_forward_hook(on_conv)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 8, 3, 16, 16), generator=g, dtype=torch.uint8)
    learner.train_step(x[0], x[1], torch.arange(8) % 10)
    assert torch.isfinite(learner.health_count("loss"))
    seen["weight_cl"] = conv.weight.is_contiguous(memory_format=torch.channels_last)
    return learner, seen


def test_cpu_default_is_channels_last_fp32():
    learner, seen = _step()
    assert learner.channels_last and not learner.amp
    assert seen == {"input_cl": True, "weight_cl": True, "out_dtype": torch.float32}
    learner, seen = _step(channels_last=False)
    assert seen == {"input_cl": False, "weight_cl": False, "out_dtype": torch.float32}


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 instructions")
def test_cpu_amp_is_bf16_when_asked():
    learner, seen = _step(cpu_amp=True)
    assert learner.amp and seen["out_dtype"] == torch.bfloat16

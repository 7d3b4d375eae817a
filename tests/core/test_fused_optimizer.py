"""trainer.fused_optimizer: fused AdamW for pretrained models by default, same updates."""

from __future__ import annotations

import torch

from rlfuse.trainer import fused_adamw
from support import compose


def test_default_is_fused_for_a_pretrained_model_only():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_adamw(compose(["algo=dpo"]), params) is None  # the tiny model: plain loop
    assert fused_adamw(compose(["algo=dpo", "model.name_or_path=/some/model"]), params) is True
    assert fused_adamw(compose(["algo=dpo", "trainer.fused_optimizer=false", "model.name_or_path=/m"]), params) is None
    assert fused_adamw(compose(["algo=dpo", "trainer.fused_optimizer=true"]), params) is True


def test_fused_step_equals_plain():
    g = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(64, 32, generator=g), [torch.randn(64, 32, generator=g) for _ in range(3)]
    out = {}
    for fused in (None, True):
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=fused)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        out[fused] = p.detach()
    torch.testing.assert_close(out[True], out[None], rtol=1e-5, atol=1e-7)

"""trainer.precision: mixed precision trains like fp32; bf16-true keeps updates plain bf16 AdamW loses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlfuse import models
from rlfuse.precision import (
    Precision,
    StochasticRoundingAdamW,
    _pack,
    _unpack,
    check_model_dtype,
    resolve_mode,
    round_stochastic_,
)
from rlfuse.trainer import train
from support import compose

# DPO on the built-in pairs at a normal DPO learning rate, from the (seeded) tiny model.
DPO = [
    "algo=dpo",
    "algo.warmup=null",
    "algo.lr=1e-6",
    "trainer.max_steps=3",
    "trainer.warmup_steps=0",
    "trainer.schedule=constant",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "rollout.batch_size=8",
    "eval=[]",
    "logger=[]",
]


def _run(tmp_path, precision: str, extra=()):
    cfg = compose(DPO + [f"trainer.precision={precision}", *extra])
    out = train(cfg, tmp_path / precision)
    final = load_file(str(tmp_path / precision / "final" / "model.safetensors"))
    return cfg, out, final


def _initial(cfg):
    tok = models.load_tokenizer(cfg.model)
    return {k: v.detach().clone() for k, v in models.load_policy(cfg.model, tok, cfg.seed).state_dict().items()}


def _delta(final, init):
    keys = sorted(k for k in final if k in init)
    return torch.cat([(final[k].float() - init[k].float()).flatten() for k in keys])


def test_modes_and_refused_combinations():
    assert resolve_mode("auto", torch.device("cpu")) == "fp32"
    assert Precision.create("bf16-mixed", torch.device("cpu")).param_dtype == torch.float32
    assert Precision.create("bf16-true", torch.device("cpu")).param_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="trainer.precision must be one of"):
        resolve_mode("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="model.dtype=bfloat16 with trainer.precision=bf16-mixed"):
        check_model_dtype("bf16-mixed", "bfloat16")
    check_model_dtype("bf16-true", "bfloat16")
    check_model_dtype("fp32", None)


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way between two bf16 values
    dst = torch.empty(x.shape, dtype=torch.bfloat16)
    round_stochastic_(dst, x)
    assert set(dst.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(dst.float().mean().item() - x[0].item()) < 2e-5
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # round-to-nearest loses it


@pytest.mark.parametrize("scale", [1.0, 0.02])  # norm weights ~1, matrices ~0.02
def test_bf16_true_keeps_updates_that_plain_bf16_adamw_loses(scale):
    torch.manual_seed(0)
    init = (torch.rand(20_000) + 0.5) * scale  # positive, so every weight has a real ulp
    grad = torch.randn(20_000)
    params = {
        "fp32": torch.nn.Parameter(init.clone()),
        "bf16": torch.nn.Parameter(init.to(torch.bfloat16)),
        "sr": torch.nn.Parameter(init.to(torch.bfloat16)),
    }
    opts = {
        "fp32": torch.optim.AdamW([params["fp32"]], lr=1e-6, weight_decay=0.0),
        "bf16": torch.optim.AdamW([params["bf16"]], lr=1e-6, weight_decay=0.0),
        "sr": StochasticRoundingAdamW([params["sr"]], lr=1e-6),
    }
    start = {k: p.detach().float().clone() for k, p in params.items()}
    for _ in range(50):
        for k, p in params.items():
            p.grad = grad.to(p.dtype)
            opts[k].step()
    moved = {k: (p.detach().float() - start[k]) for k, p in params.items()}
    want = moved["fp32"]  # about -50e-6 * sign(grad) per weight
    assert want.abs().mean() > 4e-5
    assert (moved["bf16"] != 0).float().mean() < 0.01  # plain bf16 AdamW: (almost) nothing moves
    # stochastic rounding: the same update as fp32, on average, in direction and size
    assert torch.dot(moved["sr"], want) / want.norm() ** 2 == pytest.approx(1.0, abs=0.1)
    assert (moved["sr"].sign() == want.sign())[moved["sr"] != 0].float().mean() > 0.9


def test_stochastic_rounding_adamw_matches_adamw_in_fp32():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    ob = StochasticRoundingAdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    torch.set_num_threads(2)
    return _run(tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_moves_the_weights_like_fp32(tmp_path, fp32_run, mode):
    torch.set_num_threads(2)
    cfg, out32, w32 = fp32_run
    _, out16, w16 = _run(tmp_path, mode)
    init = _initial(cfg)
    d32, d16 = _delta(w32, init), _delta(w16, init)
    assert all(v.dtype == torch.float32 for v in w16.values())  # final/ holds the fp32 masters
    assert (d32 != 0).float().mean() > 0.9
    assert (d16 != 0).float().mean() > 0.9  # (pure bf16 AdamW moves ~0% here: see the test above)
    cos = torch.dot(d32, d16) / (d32.norm() * d16.norm())
    assert cos > 0.9, f"{mode} update direction differs from fp32's: cos {cos:.3f}"
    assert d16.norm() / d32.norm() == pytest.approx(1.0, abs=0.1)
    # the logged loss tracks fp32's
    assert out16["last"]["loss/total"] == pytest.approx(out32["last"]["loss/total"], abs=2e-3)


@pytest.mark.slow
def test_bf16_true_trains_and_save_dtype(tmp_path):
    torch.set_num_threads(2)
    cfg, out, w = _run(tmp_path, "bf16-true", ["trainer.save_dtype=float16", "algo.lr=1e-4"])
    init = {k: v.to(torch.bfloat16) for k, v in _initial(cfg).items()}  # what bf16-true starts from
    assert all(v.dtype == torch.float16 for v in w.values() if v.is_floating_point())
    assert (_delta(w, init) != 0).float().mean() > 0.3
    assert torch.isfinite(torch.tensor(out["last"]["loss/total"]))


def test_dtype_keys_are_checked_before_the_first_step():
    for key, bad in (("model.ref_dtype", "bf16"), ("trainer.save_dtype", "half"), ("model.dtype", "fp32")):
        cfg = compose(DPO + [f"{key}={bad}"])
        with pytest.raises(ValueError, match=f"{key} must be one of float32, bfloat16, float16"):
            Precision.from_config(cfg, torch.device("cpu"))
    cfg = compose(DPO + ["model.dtype=bfloat16", "model.lora.r=4", "trainer.precision=bf16-mixed"])
    assert Precision.from_config(cfg, torch.device("cpu")).mode == "bf16-mixed"  # frozen LoRA base may be bf16
    with pytest.raises(ValueError, match="model.dtype=bfloat16 with trainer.precision=fp32"):
        Precision.from_config(compose(DPO + ["model.dtype=bfloat16", "trainer.precision=fp32"]), torch.device("cpu"))


def test_ref_dtype_casts_only_the_frozen_reference(tmp_path):
    torch.set_num_threads(2)
    cfg = compose(DPO + ["model.ref_dtype=bfloat16", "trainer.max_steps=1"])
    from rlfuse.manager import PluginManager
    from rlfuse.trainer import Context

    ctx = Context(cfg, tmp_path, PluginManager())
    ctx.tokenizer = models.load_tokenizer(cfg.model)
    ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
    assert next(ctx.reference.parameters()).dtype == torch.bfloat16
    assert next(ctx.policy.parameters()).dtype == torch.float32
    out = train(cfg, tmp_path / "run")  # DPO's reference log-probs come from the bf16 copy
    assert abs(out["last"]["loss/total"] - 0.6931) < 0.05


def test_ref_dtype_auto_is_bf16_under_bf16_mixed_only(tmp_path):
    """model.ref_dtype=auto (the default): the frozen reference is stored in bf16 under
    bf16-mixed (autocast computes in bf16 anyway: half its memory, no cast per step) and in
    the policy's dtype otherwise; null and explicit dtypes are kept as given."""
    from rlfuse.manager import PluginManager
    from rlfuse.trainer import Context

    def ref_dtype(*over):
        cfg = compose(DPO + list(over))
        ctx = Context(cfg, tmp_path, PluginManager())
        ctx.tokenizer = models.load_tokenizer(cfg.model)
        ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
        return next(ctx.reference.parameters()).dtype

    assert compose(DPO).model.ref_dtype == "auto"
    assert ref_dtype("trainer.precision=bf16-mixed") == torch.bfloat16
    assert ref_dtype("trainer.precision=fp32") == torch.float32
    assert ref_dtype("trainer.precision=fp16-mixed") == torch.float32
    assert ref_dtype("trainer.precision=bf16-mixed", "model.ref_dtype=null") == torch.float32
    assert ref_dtype("trainer.precision=bf16-mixed", "model.ref_dtype=float32") == torch.float32


def test_auto_is_bf16_mixed_on_a_bf16_cpu_for_a_pretrained_model_only(monkeypatch):
    import rlfuse.precision as P

    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_has_bf16_matmul", lambda: True)
    assert resolve_mode("auto", cpu, pretrained=True) == "bf16-mixed"
    assert resolve_mode("auto", cpu, pretrained=False) == "fp32"  # the tiny model
    assert resolve_mode("fp32", cpu, pretrained=True) == "fp32"  # an explicit mode is kept
    monkeypatch.setattr(P, "cpu_has_bf16_matmul", lambda: False)
    assert resolve_mode("auto", cpu, pretrained=True) == "fp32"
    monkeypatch.setattr(P, "cpu_has_bf16_matmul", lambda: True)
    cfg = compose(DPO + ["model=hf", "model.name_or_path=/some/folder"])
    assert Precision.from_config(cfg, cpu).mode == "bf16-mixed"
    assert Precision.from_config(compose(DPO), cpu).mode == "fp32"
    # the tiny model loaded from a folder (a pipeline's later stage) stays fp32: seeded figures
    assert Precision.from_config(compose(DPO + ["model.name_or_path=/some/folder"]), cpu).mode == "fp32"


@pytest.mark.parametrize("flags,want", [
    ("fpu sse avx512f avx512_bf16 avx512_vnni", True),  # AMD EPYC (Zen 4): AVX512-BF16, no AMX
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True),  # Xeon with AMX
    ("fpu avx512f avx512_vnni", False),  # AVX-512 without bf16
    ("fpu avx2 avx512_bf16x", False),  # a flag that only starts with the name
])
def test_bf16_cpu_flags(tmp_path, monkeypatch, flags, want):
    import builtins

    import rlfuse.precision as P

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    assert P.cpu_has_bf16_matmul() is want


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 40, bias=False), torch.nn.LayerNorm(40),
        torch.nn.Linear(40, 7),
    )


@pytest.mark.parametrize("mode", ["bf16-mixed", "fp16-mixed"])
@pytest.mark.parametrize("cache", [False, True])
def test_recast_weights_give_bitwise_the_same_gradients(mode, cache):
    """The mixed modes' forward saves the fp32 weight, not its low-precision copy, and the
    backward casts it again: the gradients are bitwise those of plain autocast."""
    prec = Precision(mode, torch.device("cpu"))
    x = torch.randn(13, 24)
    grads = []
    for ctx in (torch.autocast("cpu", dtype=prec.compute_dtype), prec.autocast(cache=cache)):
        model = _mlp()
        with ctx:
            loss = model(x).float().pow(2).mean()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_recast_saves_a_reference_for_casts_of_trained_weights_only():
    w = torch.nn.Parameter(torch.randn(5, 3))
    frozen = torch.randn(5, 3)
    for t in (w.to(torch.bfloat16), w.to(torch.float16), w.to(torch.bfloat16).t()):
        saved = _pack(t)
        assert not isinstance(saved, torch.Tensor) and saved[0] is w  # no copy kept
        back = _unpack(saved)
        assert torch.equal(back, t) and back.stride() == t.stride() and back.dtype == t.dtype
    act = (w * 2).to(torch.bfloat16)  # an activation: kept as it is
    for t in (act, frozen.to(torch.bfloat16), w, w.to(torch.bfloat16)[:2]):
        assert _pack(t) is t


def test_recast_refuses_a_weight_changed_between_forward_and_backward():
    model = _mlp()
    with Precision("bf16-mixed", torch.device("cpu")).autocast(cache=False):
        loss = model(torch.randn(4, 24)).float().sum()
    with torch.no_grad():
        model[2].weight.add_(1.0)  # its cast is saved: the backward needs it for the input gradient
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        loss.backward()

"""``model.weights_dtype: fp8`` in the Trainer: what is quantised, exact resume, checkpoints and
exports without FP8, compile, gradient checkpointing, FP8 attention only in no-grad passes, and
the DMD direction against the fp32 and bf16 guidance (docs/fp8.md)."""

from __future__ import annotations

import pytest
import torch
from tests.utils import assert_resume_is_exact
from torch import nn

from dmdr_fast.algo.generator import dmd_direction, dmd_inputs
from dmdr_fast.config import DMDRTrainerConfig, ModelConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.models.fp8 import Fp8Linear
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train.components import frozen_fp8

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]
LORA_STUDENT = {"kind": "lora", "num_steps": 2, "lora": {"rank": 4, "targets": [*ATTN, "*ff.net.2"]}}


def _config(model=None, student=None, dmdr=None, **train) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict(
        {
            "model": {"weights_dtype": "fp8", **(model or {})},
            "train": {
                "max_steps": 4, "batch_size": 4, "log_every": 1, "sample_every": 0, "eval_every": 0,
                "checkpoint_every": 2, "tensorboard": False, "device": "cpu", "deterministic": True,
                **train,
            },
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 2, **(dmdr or {})},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": student or {"num_steps": 2},
        }
    )  # fmt: skip


def _trainer(cfg: DMDRTrainerConfig, out_dir=None, layers: int = 1) -> Trainer:
    return Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=layers, seed=0)), data=ClassLabelSampler(10), out_dir=out_dir
    )


def _fp8_layers(net: nn.Module) -> list[Fp8Linear]:
    return [m for m in net.modules() if isinstance(m, Fp8Linear)]


def test_guidance_is_fp8_full_student_is_not_and_checkpoints_hold_no_fp8(tmp_path):
    tr = _trainer(_config(), tmp_path)
    # 1 block: q, k, v, out, ff in/out (W8A8) and the AdaLN modulation (weight-only)
    assert tr.fp8 is not None and len(tr.fp8.quantized) == 7 and len(tr.fp8.weight_only) == 1
    assert len(_fp8_layers(tr.guidance.network)) == 7 and not _fp8_layers(tr.student.network)
    tr.fit(progress=False)
    sd = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    tensors = [v for part in (sd["student"], sd["critic"]) for v in part.values()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    assert not _fp8_layers(tr.export_student())
    assert "fp8: 7 linears quantised" in (tmp_path / "notes.txt").read_text()


def test_lora_student_shares_the_fp8_base_and_resumes_exactly(tmp_path):
    cfg = _config(student=LORA_STUDENT)
    full = _trainer(cfg)
    student_fp8 = {id(m) for m in _fp8_layers(full.student.network)}
    assert student_fp8 and student_fp8 <= {id(m) for m in _fp8_layers(full.guidance.network)}
    exported = full.export_student()
    assert not _fp8_layers(exported)  # dequantised: no FP8 tensor leaves through an export
    assert all(t.dtype != torch.float8_e4m3fn for t in exported.state_dict().values())
    assert_resume_is_exact(_trainer, cfg, tmp_path)


@pytest.mark.parametrize("mode", ["bf16", "fp8"])
def test_critic_gradients_with_gradient_checkpointing(mode):
    grads = []
    for checkpointing in (False, True):
        tr = _trainer(_config(model={"fp8_backward": mode}))
        if checkpointing:
            tr.guidance.network.enable_gradient_checkpointing()
        assert tr.step() is None  # ratio_update 2: the critic only
        grads.append([p.grad.clone() for p in tr.guidance.network.parameters() if p.requires_grad])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tr = _trainer(_config(compile=True, compile_backend="aot_eager"))
    tr.fit(max_steps=2, progress=False)
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_fp8_attention_runs_in_no_grad_passes_only(monkeypatch):
    import dmdr_fast.models.attention as attn

    calls = {"fp8": 0, "grad_during_fp8": 0}
    real = attn._attention_fp8_op

    def spy(*a, **k):
        calls["fp8"] += 1
        calls["grad_during_fp8"] += torch.is_grad_enabled()
        return real(*a, **k)

    monkeypatch.setattr(attn, "_attention_fp8_op", spy)
    tr = _trainer(_config())
    assert tr.step() is None  # a critic update: forwards with grad only
    assert calls["fp8"] == 0
    tr.step()  # a generator update: the score passes are no-grad
    assert calls["fp8"] > 0 and calls["grad_during_fp8"] == 0
    off = _trainer(_config(model={"fp8_attention": False}))
    calls["fp8"] = 0
    off.step(), off.step()
    assert calls["fp8"] == 0


def _direction(tr: Trainer, x0, cond, autocast: bool) -> torch.Tensor:
    null = tr.student.null_condition(x0.shape[0]) if tr.cfg_scale.enabled else None
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        inputs = dmd_inputs(
            tr.scores, x0, torch.ones(x0.shape[0]), cond, null, step=2, renoise_times=tr.dynars,
            cfg=tr.cfg_scale, real_scale=0.5, decoupled=False, ca_renoise=tr.config.dmdr.ca_renoise,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
    g, _ = dmd_direction(x0.clone().requires_grad_(True), inputs, dmd_weight=1.0, ca_weight=0.0, eps=1e-4)
    return g.flatten()


@pytest.mark.parametrize(
    ("guidance", "activations", "attention"),
    [(2.0, True, True), (1.0, False, False)],
    ids=["cfg-w8a8-fp8attn", "nocfg-weight-only"],
)
def test_dmd_direction_with_fp8_guidance_matches_fp32_and_bf16(guidance, activations, attention):
    """With CFG (w = 2) the direction is dominated by w·(v_cond − v_uncond), a difference of two
    passes with different conditions, which W8A8 FP8 keeps. Without CFG it is the small fake − real
    difference of two passes that differ only by the critic LoRA: quantising their activations
    decorrelates their errors (W8A8: cosine ~0.95-0.97 on the digits preset, docs/fp8.md), while
    weight-only FP8 keeps it (the weight error is common to both passes)."""
    cfg = _config(model={"weights_dtype": "fp32"}, dmdr={"guidance": guidance}, max_steps=20, batch_size=16)
    tr = _trainer(cfg, layers=2)
    tr.fit(progress=False)  # a critic that moved away from the teacher
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 10
    ref, bf16 = _direction(tr, x0, cond, False), _direction(tr, x0, cond, True)
    fp8_cfg = ModelConfig(weights_dtype="fp8", fp8_activations=activations, fp8_attention=attention)
    frozen_fp8(fp8_cfg, tr.guidance.network, None)
    fp8 = _direction(tr, x0, cond, False)
    cos = torch.nn.functional.cosine_similarity
    print(f"cos(fp8, fp32) {float(cos(fp8, ref, dim=0)):.4f}, cos(fp8, bf16) {float(cos(fp8, bf16, dim=0)):.4f}, "
          f"cos(bf16, fp32) {float(cos(bf16, ref, dim=0)):.4f}")  # fmt: skip
    assert float(cos(fp8, ref, dim=0)) >= 0.99
    if guidance > 1:  # without CFG bf16 itself is ~0.99 from fp32 on this tiny random teacher
        assert float(cos(fp8, bf16, dim=0)) >= 0.99


def test_w8a8_is_not_weight_only():
    """The two modes are different computations (guards the option's plumbing)."""
    tr = _trainer(_config(model={"fp8_activations": False}))
    layer = next(m for m in _fp8_layers(tr.guidance.network) if m.in_features == m.out_features)
    assert layer.activations is False
    x = torch.randn(5, layer.in_features)
    weight_only = layer(x)
    torch.testing.assert_close(weight_only, x @ layer.weight.t() + layer.bias, rtol=1e-5, atol=1e-5)
    layer.activations = True
    assert not torch.allclose(layer(x), weight_only, rtol=1e-4, atol=1e-4)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import os

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        tr = _trainer(_config(student=LORA_STUDENT, max_steps=2, checkpoint_every=0), out)
        assert _fp8_layers(tr.guidance.network)
        tr.fit(progress=False)
        flat = torch.cat([p.detach().flatten() for p in tr.student.network.parameters() if p.requires_grad])
        torch.save(flat, os.path.join(out, f"params_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_process_gloo_with_fp8_guidance(tmp_path):
    """DDP over a LoRA student whose frozen base is FP8 (buffers, left out of DDP's buckets): the
    ranks see different data and still end with identical LoRA weights."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"params_rank{r}.pt") for r in range(2))
    assert torch.equal(p0, p1)
    init = _trainer(_config(student=LORA_STUDENT)).student.network
    assert not torch.equal(
        p0, torch.cat([p.detach().flatten() for p in init.parameters() if p.requires_grad])
    )

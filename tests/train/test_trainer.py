"""Trainer: a smoke run, exact resume, checkpoint atomicity, stage switching, and DDP on gloo."""

from __future__ import annotations

import os

import pytest
import torch

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train.logging import read_jsonl

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def small_config(**train) -> DMDRTrainerConfig:
    base = {
        "train": {
            "max_steps": 4, "batch_size": 4, "log_every": 1, "sample_every": 0, "eval_every": 0,
            "checkpoint_every": 2, "tensorboard": False, "device": "cpu", "deterministic": True,
            "num_grid_samples": 4, **train,
        },
        "dmdr": {"dynamic_horizon": 4, "ratio_update": 2},
        "critic": {"lora": {"rank": 4, "targets": ATTN}},
        "student": {"num_steps": 2},
    }  # fmt: skip
    return DMDRTrainerConfig.from_dict(base)


def make_trainer(cfg, out_dir=None, **kw):
    return Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10), out_dir=out_dir, **kw
    )


def test_smoke_run_writes_logs_checkpoints_and_samples(tmp_path):
    cfg = small_config(sample_every=2)
    tr = make_trainer(cfg, tmp_path)
    before = [p.detach().clone() for p in tr.student.network.parameters()]
    state = tr.fit(progress=False)
    assert state.gen_step == 4 and state.step == 8  # ratio_update = 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "loss_dmd",
        "loss_critic",
        "grad_norm_g",
        "grad_norm_c",
        "lambda_r",
        "dynars_alpha",
        "iter_time",
    ):
        assert all(key in r for r in rows), key
    assert rows[0]["lambda_r"] == pytest.approx(0.75) and rows[-1]["lambda_r"] < 0.75  # DynaDG anneals
    assert (tmp_path / "config.yaml").is_file()
    assert DMDRTrainerConfig.load_yaml(tmp_path / "config.yaml") == cfg
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000004.pt"
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    after = list(tr.student.network.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the student did not change"


def test_resume_is_exact(tmp_path):
    """N steps in one go == k steps, stop, resume in a fresh Trainer, continue to N."""
    cfg = small_config()
    full = make_trainer(cfg)
    full.fit(progress=False)

    part = make_trainer(cfg, tmp_path)
    part.fit(max_steps=2, progress=False)
    del part  # "kill"
    resumed = make_trainer(cfg, tmp_path)
    assert resumed.resume()
    assert resumed.state.gen_step == 2
    resumed.fit(progress=False)
    for (n, a), b in zip(full.student.network.named_parameters(), resumed.student.network.parameters()):
        assert torch.equal(a, b), f"student {n} differs after resume"
    for (n, a), b in zip(full.guidance.network.named_parameters(), resumed.guidance.network.parameters()):
        assert torch.equal(a, b), f"guidance {n} differs after resume"


@pytest.mark.gpu
def test_resume_on_cuda_is_exact(tmp_path):
    """On the GPU too: the checkpoint is read onto the CPU (RNG states must be CPU tensors)."""
    cfg = small_config(device="cuda", deterministic=False)
    full = make_trainer(cfg)
    full.fit(progress=False)
    part = make_trainer(cfg, tmp_path)
    part.fit(max_steps=2, progress=False)
    resumed = make_trainer(cfg, tmp_path)
    assert resumed.resume() and resumed.state.gen_step == 2
    assert all(p.device.type == "cuda" for p in resumed.student.network.parameters())
    resumed.fit(progress=False)
    for a, b in zip(full.student.network.parameters(), resumed.student.network.parameters()):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-6
        )  # GPU kernels need not be bitwise deterministic


def test_critic_gradients_do_not_change_with_gradient_checkpointing():
    """Checkpointing recomputes the guidance network's forward during backward: it must still run
    at the fake score's LoRA scale λ_f (it ran at the resting scale 1 once, silently)."""
    grads = []
    for checkpointing in (False, True):
        tr = make_trainer(small_config())  # ratio_update 2: the first iteration updates the critic only
        if checkpointing:
            tr.guidance.network.enable_gradient_checkpointing()
        assert tr.step() is None
        grads.append([p.grad.clone() for p in tr.guidance.network.parameters() if p.requires_grad])
    assert len(grads[0]) > 0 and any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_interrupted_write_leaves_latest_intact(tmp_path, monkeypatch):
    tr = make_trainer(small_config(), tmp_path)
    tr.fit(max_steps=2, progress=False)
    good = ckpt.latest_checkpoint(tmp_path)

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed in the middle of torch.save

    monkeypatch.setattr(torch, "save", boom)
    tr.state.gen_step = 3
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    ckpt.load_checkpoint(good)  # still readable


def test_stage_two_turns_reward_on_and_lowers_lr():
    from dmdr_fast.rewards import ClassifierReward, CompositeReward, RewardSpec

    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    spec = RewardSpec("clf", weight=0.5)
    reward = CompositeReward([ClassifierReward(clf, spec=spec, num_classes=10, in_channels=1)])
    cfg = DMDRTrainerConfig.from_dict(
        {
            **small_config().to_dict(),
            "rewards": [{"kind": "classifier", "weight": 0.5, "name": "clf"}],
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 2, "cold_start_steps": 2},
            "optim": {"lr_generator_stage2": 1e-6},
        }
    )
    tr = make_trainer(cfg, reward=reward)
    logs = []
    while tr.state.gen_step < 4:
        m = tr.step()
        if m is not None:
            logs.append(m)
    assert [m["stage"] for m in logs] == [1, 1, 2, 2]
    assert "loss_reward" not in logs[1] and "loss_reward" in logs[2]
    assert logs[1]["lr_g"] == cfg.optim.lr_generator and logs[2]["lr_g"] == 1e-6


@pytest.mark.parametrize(
    "overrides",
    [
        {"critic": {"kind": "full"}, "dmdr": {"guidance": 2.0, "dynamic_horizon": 4, "ratio_update": 2}},
        {"student": {"kind": "lora", "num_steps": 2, "lora": {"rank": 4, "alpha": 8, "targets": ATTN}}},
        {
            "student": {"num_steps": 2, "backward_sim": "final", "ema_decay": 0.9},
            "train": {"precision": "bf16"},
        },
    ],
    ids=["full-critic-cfg", "lora-student", "final-sim-ema-bf16"],
)
def test_variants_train(overrides):
    base = small_config().to_dict()
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    cfg = DMDRTrainerConfig.from_dict(base)
    tr = make_trainer(cfg)
    trainable = [p for p in tr.student.network.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    tr.fit(max_steps=2, progress=False)
    assert tr.state.gen_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    if cfg.student.kind == "lora":  # only LoRA factors train
        assert all("lora_" in n for n, p in tr.student.network.named_parameters() if p.requires_grad)
    x = tr.sample(torch.arange(4))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_missing_reward_model_is_an_error():
    cfg = DMDRTrainerConfig.from_dict(
        {**small_config().to_dict(), "rewards": [{"kind": "classifier", "weight": 0.5}]}
    )
    with pytest.raises(ValueError, match="no `reward` model"):
        make_trainer(cfg)


def _ddp_worker(rank: int, world: int, init_file: str, out: str, compile_backend: str | None = None) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        extra = {"compile": True, "compile_backend": compile_backend} if compile_backend else {}
        tr = make_trainer(
            small_config(max_steps=2, checkpoint_every=0, **extra), out
        )  # both ranks get out_dir
        tr.fit(progress=False)
        flat = torch.cat([p.detach().flatten() for p in tr.student.network.parameters()])
        torch.save(flat, os.path.join(out, f"params_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_process_gloo(tmp_path):
    """Two CPU processes: different data per rank, identical weights after every step (DDP); then
    the same with train.compile (networks compiled in place, then wrapped): the ranks stay in sync
    and, with aot_eager (the same ATen ops), the weights equal the eager run's bit for bit."""
    import torch.multiprocessing as mp

    params = {}
    for name, backend in (("eager", None), ("compiled", "aot_eager")):
        out = tmp_path / name
        out.mkdir()
        mp.spawn(_ddp_worker, args=(2, str(out / "init"), str(out), backend), nprocs=2, join=True)
        p0, p1 = (torch.load(out / f"params_rank{r}.pt") for r in range(2))
        assert torch.equal(p0, p1), name
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2], "only rank 0 logs"
        params[name] = p0
    assert torch.equal(params["compiled"], params["eager"])


def _processor_names(net) -> set[str]:
    return {type(m.processor).__name__ for m in net.modules() if hasattr(m, "processor")}


@pytest.mark.parametrize("attention", ["torch", "native"])
def test_attention_backend_reaches_every_network(attention):
    """train.attention routes teacher/guidance, student and a full critic through the dispatcher."""
    base = small_config().to_dict()
    base["train"] = {**base["train"], "attention": attention}
    base["critic"] = {"kind": "full"}
    tr = make_trainer(DMDRTrainerConfig.from_dict(base))
    nets = [tr.guidance.network, tr.student.network, tr.critic.network]
    native = _processor_names(DiTAdapter(tiny_dit(num_layers=1, seed=0)).network)
    for net in nets:
        names = _processor_names(net)
        assert (names == native) if attention == "native" else (names.isdisjoint(native) and names)
    tr.fit(max_steps=1, progress=False)
    assert _processor_names(tr.export_student()) == native  # exported without dmdr_fast's processors


def test_unknown_attention_backend_is_refused():
    base = small_config().to_dict()
    base["train"] = {**base["train"], "attention": "flash"}
    with pytest.raises(ValueError, match="flash"):
        make_trainer(DMDRTrainerConfig.from_dict(base))


def test_deterministic_mode_is_scoped_to_the_trainer(monkeypatch):
    """``train.deterministic`` holds inside the Trainer's own work and leaves the process as it was."""
    assert not torch.are_deterministic_algorithms_enabled()
    tr = make_trainer(small_config(max_steps=1))
    seen = []
    real = tr.data

    class Spy:  # the condition sampler is called inside every iteration
        def sample(self, batch_size, generator):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return real.sample(batch_size, generator)

    tr.data = Spy()
    tr.fit(progress=False)
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()


def test_ema_tracks_the_student_and_swaps_in_and_back():
    base = small_config().to_dict()
    base["student"] = {**base["student"], "ema_decay": 0.5}
    tr = make_trainer(DMDRTrainerConfig.from_dict(base))
    start = {n: p.detach().clone() for n, p in tr.student.network.named_parameters()}
    tr.fit(max_steps=1, progress=False)
    params = dict(tr.student.network.named_parameters())
    live = {n: p.detach().clone() for n, p in params.items()}
    for n, e in tr.ema.items():  # one update of decay 0.5: halfway between the start and now
        torch.testing.assert_close(e, 0.5 * start[n] + 0.5 * live[n])
    with pytest.raises(RuntimeError, match="inside"), tr.ema_weights():
        assert all(torch.equal(params[n], e) for n, e in tr.ema.items())
        raise RuntimeError("inside")
    assert all(torch.equal(p, live[n]) for n, p in params.items())  # restored, also after an error

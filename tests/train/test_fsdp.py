"""FSDP2 and gradient accumulation: sharding and micro-batches change where the arithmetic runs,
not the result (docs/parallel.md).

The reference is ONE process with ``train.grad_accum = 2``: micro-batch i draws from RNG stream
slot i, exactly what rank i draws in a 2-process run, so 1 × 2 micro-batches, DDP on 2 ranks and
FSDP on 2 ranks see the same samples and must end at the same weights (fp32: summation order of
the gradient reduction differs, so equality is to ~1e-6 relative, not bit for bit).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train.parallel import fsdp_units

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def fsdp_config(kind: str, *, parallel: str = "ddp", grad_accum: int = 1, **train) -> DMDRTrainerConfig:
    """Digits-DiT run: full student + full critic (``kind="full"``) or LoRA student + LoRA critic."""
    lora = {"rank": 4, "targets": ATTN}
    base = {
        "train": {
            "max_steps": 3, "batch_size": 2, "log_every": 1, "sample_every": 0, "eval_every": 0,
            "checkpoint_every": 0, "tensorboard": False, "device": "cpu", "deterministic": True,
            "num_grid_samples": 4, "parallel": parallel, "grad_accum": grad_accum, **train,
        },
        "dmdr": {"dynamic_horizon": 4, "ratio_update": 2, "guidance": 2.0},
        "student": {"num_steps": 2, "kind": kind, "ema_decay": 0.9, **({"lora": lora} if kind == "lora" else {})},
        "critic": {"kind": "full"} if kind == "full" else {"lora": lora},
    }  # fmt: skip
    return DMDRTrainerConfig.from_dict(base)


def make(cfg: DMDRTrainerConfig, out_dir=None) -> Trainer:
    teacher = DiTAdapter(tiny_dit(num_layers=2, seed=0))
    return Trainer(cfg, teacher, data=ClassLabelSampler(10), out_dir=out_dir)


def full_weights(tr: Trainer) -> dict[str, torch.Tensor]:
    """Student, critic and EMA as full tensors (gathered from the shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    out = {f"student.{n}": full(p) for n, p in tr.student.network.named_parameters() if p.requires_grad}
    owner = tr.critic if tr.critic is not None else tr.guidance
    out |= {f"critic.{n}": full(p) for n, p in owner.network.named_parameters() if p.requires_grad}
    out |= {f"ema.{n}": full(v) for n, v in (tr.ema or {}).items()}
    return out


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init_file: str) -> Iterator[None]:
    """This worker as ``rank`` of a ``world``-process gloo group (one thread), left on exit."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        yield
        # Every rank done before any tears down: a rank leaving while its peer still writes has
        # ended once in std::terminate at exit (gloo's threads; seen in CI, not reproduced).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def save_weights(tr: Trainer, path: str) -> None:
    """:func:`full_weights` (a collective under FSDP: every rank gathers), written by rank 0."""
    weights = full_weights(tr)
    if torch.distributed.get_rank() == 0:
        torch.save(weights, path)


def _worker(
    rank: int, world: int, init_file: str, out: str, kind: str, parallel: str, batch: int = 2
) -> None:
    with gloo_rank(rank, world, init_file):
        tr = make(fsdp_config(kind, parallel=parallel, batch_size=batch))
        tr.fit(progress=False)
        save_weights(tr, os.path.join(out, f"{kind}_{parallel}_{world}.pt"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Per network, ‖a − b‖ ≤ 1e-3 · ‖b − start‖ (the change training made): the runs differ only in
    the order of the gradient sums (~1e-7 relative in fp32), which Adam amplifies where a gradient
    is near zero (its step is ~lr whatever the gradient's size); measured: ~1e-4 (DDP)."""
    assert a.keys() == b.keys(), what
    for group in ("student", "critic", "ema"):
        keys = [k for k in b if k.startswith(group + ".")]
        if not keys and group == "ema":  # a run without EMA
            continue
        diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
        moved = torch.cat([(b[k] - START[k.replace("ema.", "student.", 1)]).flatten() for k in keys]).norm()
        assert moved > 0 and diff <= 1e-3 * moved, f"{what} {group}: |diff| {diff:.3g}, |moved| {moved:.3g}"


START: dict[str, torch.Tensor] = {}


def test_units_are_the_transformer_blocks():
    net = tiny_dit(num_layers=3, seed=0)
    # block 0 stays in the root unit: DiT's forward calls its norm1.emb from outside the block
    assert fsdp_units(net) == list(net.transformer_blocks)[1:]


def test_grad_accum_one_micro_batch_is_the_plain_step():
    """grad_accum = 1 takes exactly the code path of before (bit for bit), and micro-batches move
    the weights differently from one batch of the same size only through their RNG streams."""
    a, b = make(fsdp_config("full")), make(fsdp_config("full", grad_accum=2, batch_size=1))
    a.fit(progress=False)
    b.fit(progress=False)
    assert b.state.step == a.state.step and b.state.gen_step == 3
    assert all(torch.isfinite(v).all() for v in full_weights(b).values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp_and_ddp_on_two_ranks_equal_one_process_with_two_micro_batches(tmp_path, kind):
    import torch.multiprocessing as mp

    reference = make(fsdp_config(kind, grad_accum=2))
    START.clear()
    START.update(full_weights(reference))
    reference.fit(progress=False)
    expected = full_weights(reference)
    for parallel in ("ddp", "fsdp"):
        init = tmp_path / f"init_{parallel}"
        mp.spawn(_worker, args=(2, str(init), str(tmp_path), kind, parallel), nprocs=2, join=True)
        _close(torch.load(tmp_path / f"{kind}_{parallel}_2.pt"), expected, f"{kind}/{parallel}")


def _ckpt_worker(rank: int, world: int, init_file: str, out: str, job: str) -> None:
    """``job``: "full" (3 steps), "part" (2 steps, checkpoint), "resume" (resume, to 3 steps),
    "load" (resume only: the loaded weights, gathered)."""
    with gloo_rank(rank, world, init_file):
        batch = 2 * 2 // world  # the same world batch (4) on 1, 2 or 4 ranks
        tr = make(fsdp_config("full", parallel="fsdp", batch_size=batch), os.path.join(out, "run"))
        if job == "full":
            tr.fit(progress=False)
        elif job == "part":
            tr.fit(max_steps=2, progress=False)
        else:
            assert tr.resume()
            if job == "resume":
                tr.fit(progress=False)
        save_weights(tr, os.path.join(out, f"{job}_{world}.pt"))


def _spawn(tmp_path, world: int, job: str) -> dict[str, torch.Tensor]:
    import torch.multiprocessing as mp

    init = tmp_path / f"init_{job}_{world}"
    mp.spawn(_ckpt_worker, args=(world, str(init), str(tmp_path), job), nprocs=world, join=True)
    return torch.load(tmp_path / f"{job}_{world}.pt")


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_and_reshards(tmp_path):
    """Kill-and-resume under FSDP (2 ranks) equals the uninterrupted run; the 2-rank checkpoint
    loads on 1 process without FSDP (2 micro-batches: the same RNG slots, so it also continues
    exactly) and on 4 ranks (the weights as saved)."""
    from dmdr_fast.train import checkpoint as ckpt

    full = _spawn(tmp_path, 2, "full")
    saved = _spawn(tmp_path, 2, "part")
    folder = ckpt.latest_checkpoint(tmp_path / "run")
    assert folder.name == "step_0000002" and ckpt.is_sharded_checkpoint(folder)
    assert not any(p.name.endswith(".partial") for p in folder.parent.iterdir())
    resumed = _spawn(tmp_path, 2, "resume")
    for n in full:  # same world size, same shards, same RNG streams: the same arithmetic
        torch.testing.assert_close(resumed[n], full[n], rtol=0, atol=0, msg=n)

    # 1 process, no process group: DCP reads the shards into plain tensors.
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000002\n")
    one = make(fsdp_config("full", grad_accum=2), tmp_path / "run")
    assert one.resume() and one.state.gen_step == 2
    for n, v in full_weights(one).items():
        torch.testing.assert_close(v, saved[n], rtol=0, atol=0, msg=n)
    one.fit(progress=False)
    START.clear()
    START.update(saved)
    _close(full_weights(one), full, "resumed on 1 process")

    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000002\n")
    four = _spawn(tmp_path, 4, "load")
    for n in saved:
        torch.testing.assert_close(four[n], saved[n], rtol=0, atol=0, msg=n)


def _grpo_worker(rank: int, world: int, init_file: str, out: str, job: str) -> None:
    """GRPO with the KL regulariser (its reference weights are part of the state) on 2 ranks."""
    from tests.train.test_rl_trainer import _config, _trainer

    with gloo_rank(rank, world, init_file):
        parallel = "ddp" if job == "ddp" else "fsdp"
        cfg = _config(
            rl={"group_size": 4, "regularizer": "kl"}, batch_size=2, max_steps=4, checkpoint_every=0,
            dmdr={"cold_start_steps": 1}, parallel=parallel,
        )  # fmt: skip
        tr = _trainer(cfg, os.path.join(out, "run"))
        if job == "part":
            tr.fit(max_steps=3, progress=False)
        else:
            if job == "resume":
                assert tr.resume() and tr.state.gen_step == 3 and tr.rl.reference is not None
            tr.fit(progress=False)
        save_weights(tr, os.path.join(out, f"grpo_{job}.pt"))


@pytest.mark.slow
def test_grpo_groups_under_fsdp_equal_ddp_and_resume_exactly(tmp_path):
    """GRPO groups spanning 2 ranks train the same under FSDP as under DDP (to the reduction-order
    tolerance), and an FSDP run killed after step 3 and resumed (KL reference from the shards)
    equals the uninterrupted FSDP run bit for bit."""
    import torch.multiprocessing as mp

    runs = {}
    for job in ("ddp", "fsdp", "part", "resume"):
        (tmp_path / job).mkdir()
        out = tmp_path / ("part" if job == "resume" else job)
        mp.spawn(_grpo_worker, args=(2, str(tmp_path / f"init_{job}"), str(out), job), nprocs=2, join=True)
        runs[job] = torch.load(out / f"grpo_{job}.pt")
    from tests.train.test_rl_trainer import _config, _trainer

    START.clear()
    START.update(full_weights(_trainer(_config(rl={"group_size": 4}, batch_size=4))))  # the start
    _close(runs["fsdp"], runs["ddp"], "grpo fsdp vs ddp")
    for n in runs["fsdp"]:
        torch.testing.assert_close(runs["resume"][n], runs["fsdp"][n], rtol=0, atol=0, msg=n)


def test_micro_batches_average_not_sum():
    """Two micro-batches that are the same batch (both RNG slots in the same state) must step each
    optimiser exactly as that one batch does: each optimiser sees the mean of its micro-batches'
    gradients (g/2 + g/2 = g exactly in binary floating point), and the critic still steps once per
    iteration, the generator once per generator iteration."""
    one = make(fsdp_config("full"))
    two = make(fsdp_config("full", grad_accum=2))
    two.gens[1].set_state(two.gens[0].get_state())
    one.fit(progress=False)
    two.fit(progress=False)
    assert two.state.step == one.state.step and two.state.gen_step == one.state.gen_step
    for n, v in full_weights(one).items():
        torch.testing.assert_close(full_weights(two)[n], v, rtol=0, atol=0, msg=n)


@pytest.mark.slow
def test_fsdp_on_four_ranks_equals_one_process_with_four_micro_batches(tmp_path):
    """4 shards per parameter; the label table has 11 rows, not divisible by 4 (FSDP pads the shards)."""
    import torch.multiprocessing as mp

    reference = make(fsdp_config("full", grad_accum=4, batch_size=1))
    START.clear()
    START.update(full_weights(reference))
    reference.fit(progress=False)
    args = (4, str(tmp_path / "init"), str(tmp_path), "full", "fsdp", 1)
    mp.spawn(_worker, args=args, nprocs=4, join=True)
    _close(torch.load(tmp_path / "full_fsdp_4.pt"), full_weights(reference), "fsdp on 4 ranks")

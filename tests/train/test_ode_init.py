"""ODE-regression init (student.ode_init): teacher pairs on disk, the regression, once per run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dmdr_fast.algo import euler_sample
from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.train import ClassLabelSampler, Trainer
from dmdr_fast.train import ode_init as ode_mod
from dmdr_fast.train.logging import read_jsonl
from dmdr_fast.train.ode_init import ODEPairs, generate_ode_pairs

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]
LABELS = torch.tensor([0, 3, 7, 1, 9])


def _teacher() -> DiTAdapter:
    return DiTAdapter(tiny_dit(num_layers=1, seed=0))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ode") / "pairs"
    generate_ode_pairs(_teacher(), LABELS, out, steps=3, guidance=2.0, batch_size=2, shard_size=3, seed=5)
    return out


def test_pairs_are_the_teachers_ode_samples(pairs_dir):
    teacher = _teacher()
    pairs = ODEPairs.open(pairs_dir, teacher)
    assert len(pairs) == 5 and len(pairs.meta["shards"]) == 2  # shards of >= 3 pairs: 4 + 1
    z, x0, cond = pairs.batch(torch.tensor([2, 3]), teacher)  # batch 1 of the generation (seed 5 + 1)
    torch.testing.assert_close(z, torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(6)))
    assert torch.equal(cond, LABELS[2:4])
    with torch.no_grad():
        want = euler_sample(
            teacher.velocity,
            z,
            cond,
            num_steps=3,
            shift=1.0,
            guidance=2.0,
            null_cond=teacher.null_condition(2),
        )
    torch.testing.assert_close(x0, want, rtol=1e-5, atol=1e-6)  # same solve, batched differently


def _config(pairs, **student) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict(
        {
            "train": {"max_steps": 1, "batch_size": 4, "log_every": 5, "sample_every": 0, "eval_every": 0,
                      "checkpoint_every": 0, "tensorboard": False, "device": "cpu", "deterministic": True},
            "dmdr": {"dynamic_horizon": 4, "ratio_update": 1},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 1, "ode_init": str(pairs), "ode_steps": 40, "ode_lr": 3e-3, **student},
        }
    )  # fmt: skip


def test_regression_fits_the_pairs_and_runs_once(pairs_dir, tmp_path, monkeypatch):
    calls = []
    original = ode_mod.ode_regression

    def spy(*args, **kwargs):
        calls.append(1)
        losses = original(*args, **kwargs)
        calls.append(losses)
        return losses

    monkeypatch.setattr(ode_mod, "ode_regression", spy)
    cfg = _config(pairs_dir)
    tr = Trainer(cfg, _teacher(), data=ClassLabelSampler(10), out_dir=tmp_path)
    tr.fit(progress=False)
    losses = calls[1]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])  # it learns the map
    assert tr.state.ode_init_done and tr.state.gen_step == 1
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "ode/loss" in r]
    assert [r["ode/step"] for r in rows] == list(range(5, 41, 5)) and all(r["step"] == 0 for r in rows)
    # A resumed run does not regress again.
    again = Trainer(_config(pairs_dir, **{}).with_overrides(["train.max_steps=2"]), _teacher(),
                    data=ClassLabelSampler(10), out_dir=tmp_path)  # fmt: skip
    assert again.resume() and again.state.ode_init_done
    again.fit(progress=False)
    assert len(calls) == 2 and again.state.gen_step == 2


def test_pairs_for_another_model_or_incomplete_are_refused(pairs_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="ode-pairs"):
        ODEPairs.open(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in pairs_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / "ode_pairs.json").read_text())
    meta["sample_shape"] = [4, 8, 8]
    (bad / "ode_pairs.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        ODEPairs.open(bad, _teacher())
    with pytest.raises(FileExistsError):
        generate_ode_pairs(_teacher(), LABELS, pairs_dir, steps=1)
    with pytest.raises(ValueError, match="steps"):
        generate_ode_pairs(_teacher(), LABELS, tmp_path / "none", steps=0)
    assert not (tmp_path / "none.tmp").exists() and not (tmp_path / "none").exists()


def test_cli_digits_pairs_use_balanced_labels(tmp_path, monkeypatch):
    """`dmdr-fast ode-pairs --preset digits`: the cached digits teacher (here a tiny stand-in)."""
    from types import SimpleNamespace

    from dmdr_fast.cli import main
    from dmdr_fast.recipes import digits

    monkeypatch.setattr(digits, "prepare_assets", lambda *a, **k: SimpleNamespace(fresh_teacher=_teacher))
    out = tmp_path / "pairs"
    assert main(["ode-pairs", "--preset", "digits", "--limit", "20", "--teacher-steps", "2", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    meta = json.loads((out / "ode_pairs.json").read_text())
    assert (
        meta["count"] == 20 and meta["labels"] == digits.balanced_labels(20).tolist() and meta["steps"] == 2
    )
    assert len(ODEPairs.open(out, _teacher())) == 20


def test_no_clipping_still_trains(pairs_dir):
    """optim.grad_clip = 0 means no clipping (clip_grad_norm_ with 0 would zero every gradient)."""
    cfg = _config(pairs_dir, ode_steps=3).with_overrides(["optim.grad_clip=0"])
    tr = Trainer(cfg, _teacher(), data=ClassLabelSampler(10))
    before = [p.detach().clone() for p in tr.student.network.parameters()]
    tr.ode_init(progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.network.parameters()))


class _Interrupt(RuntimeError):
    pass


def test_interrupted_generation_continues_and_equals_an_uninterrupted_one(pairs_dir, tmp_path, capsys):
    out = tmp_path / "pairs"
    args = {"steps": 3, "guidance": 2.0, "batch_size": 2, "shard_size": 3, "seed": 5}
    teacher, calls = _teacher(), []
    real = teacher.velocity

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 8:  # batch 3: after the first shard (2 batches = 4 pairs) was written
            raise _Interrupt
        return real(*a, **k)

    teacher.velocity = failing
    with pytest.raises(_Interrupt):
        generate_ode_pairs(teacher, LABELS, out, **args)
    tmp = out.with_name("pairs.tmp")
    assert not out.exists() and json.loads((tmp / "progress.json").read_text())["shards"][0]["count"] == 4
    teacher.velocity = real
    calls.clear()
    generate_ode_pairs(_teacher(), LABELS, out, **args)  # the same command again
    assert "continuing" in capsys.readouterr().err and not tmp.exists()
    done, clean = ODEPairs.open(out), ODEPairs.open(pairs_dir)
    assert done.meta == clean.meta and not (out / "progress.json").exists()
    for shard in clean.meta["shards"]:
        a, b = load_file(str(out / shard["file"])), load_file(str(pairs_dir / shard["file"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_partial_build_with_other_settings_starts_over(tmp_path):
    out = tmp_path / "pairs"
    tmp = out.with_name("pairs.tmp")
    tmp.mkdir()
    (tmp / "progress.json").write_text(
        json.dumps({"identity": {"seed": 1}, "shards": [{"file": "x", "count": 2}]})
    )
    (tmp / "stale.txt").write_text("from another run")
    generate_ode_pairs(_teacher(), LABELS, out, steps=2, batch_size=2, shard_size=2, seed=0, progress=False)
    assert len(ODEPairs.open(out)) == len(LABELS) and not (out / "stale.txt").exists()

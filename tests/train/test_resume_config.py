"""Resume refuses a config that changes the training and names the fields (issue: run folders)."""

from __future__ import annotations

import pytest
from tests.test_cli import TINY

from dmdr_fast.cli import main
from dmdr_fast.train.checkpoint import config_changes


def test_config_changes_names_training_fields_only():
    saved = {
        "name": "a",
        "dmdr": {"guidance": 1.0},
        "train": {"max_steps": 4, "lr": 1},
        "model": {"kwargs": {"teacher": {"steps": 30}}},
    }
    current = {
        "name": "b",
        "dmdr": {"guidance": 2.0},
        "train": {"max_steps": 9, "lr": 1},
        "model": {"kwargs": {"teacher": {"steps": 31}}},
    }
    assert config_changes(saved, current) == [
        ("dmdr.guidance", 1.0, 2.0),
        ("model.kwargs.teacher.steps", 30, 31),
    ]
    assert config_changes(saved, saved) == []
    # a field only one side has (a section added or removed) is a change too
    assert config_changes({"rl": {"algorithm": "grpo"}}, {}) == [("rl.algorithm", "grpo", None)]


def _argv(out, cache, *sets):
    argv = ["train", "--preset", "digits", "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    for kv in [*TINY, "train.eval_every=0", "train.sample_every=0", *sets]:
        argv += ["--set", kv]
    return argv


def test_cli_resume_refuses_a_changed_training_and_allows_a_longer_run(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_argv(out, cache)) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()
    code = main([*_argv(out, cache, "dmdr.guidance=2.0", "optim.lr_generator=0.5"), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "dmdr.guidance: 1.0 -> 2.0" in err and "optim.lr_generator" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing written
    # when and how long it runs may change
    assert main([*_argv(out, cache, "train.max_steps=6", "train.log_every=2"), "--resume"]) == 0
    assert "resumed from" in (out / "notes.txt").read_text()


@pytest.mark.parametrize("field", ["student.num_steps=2", "train.batch_size=4", "rewards=[]"])
def test_trainer_resume_refuses_each_training_change(tmp_path, field):
    from dmdr_fast._errors import UserError
    from dmdr_fast.configs import load_preset
    from dmdr_fast.recipes.digits.run import prepare_assets, train_student

    config = load_preset("digits", [*TINY, "train.eval_every=0", "train.sample_every=0"])
    assets = prepare_assets(
        tmp_path / "cache",
        config.model.kwargs.get("teacher"),
        config.model.kwargs.get("classifiers"),
        progress=False,
    )
    train_student(config, assets, tmp_path / "run", progress=False)
    changed = load_preset("digits", [*TINY, "train.eval_every=0", "train.sample_every=0", field])
    with pytest.raises(UserError, match=field.split("=")[0].replace(".", r"\.")):
        train_student(changed, assets, tmp_path / "run", resume=True, progress=False)


def test_the_global_batch_may_be_split_otherwise(tmp_path):
    """batch 8 x 1 micro-batch resumes as 4 x 2 (the same global batch, as when resharding)."""
    from dmdr_fast.configs import load_preset
    from dmdr_fast.recipes.digits.run import prepare_assets, train_student

    base = [*TINY, "train.eval_every=0", "train.sample_every=0"]
    config = load_preset("digits", base)
    kw = config.model.kwargs
    assets = prepare_assets(tmp_path / "cache", kw.get("teacher"), kw.get("classifiers"), progress=False)
    train_student(config, assets, tmp_path / "run", progress=False)
    split = load_preset("digits", [*base, "train.batch_size=4", "train.grad_accum=2", "train.max_steps=6"])
    assert train_student(split, assets, tmp_path / "run", resume=True, progress=False).state.gen_step == 6

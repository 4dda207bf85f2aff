"""``dmdr-fast experiment digits`` (seeds, the matched DMD-only row) and ``experiment coldstart``
on tiny settings (seconds per run)."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.test_cli import TINY

from dmdr_fast.cli import main
from dmdr_fast.train.logging import read_jsonl


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one tiny teacher for every experiment below


def _argv(name, out, cache, *extra, sets=()):
    flags = [a for kv in [*TINY, *sets] for a in ("--set", kv)]
    return ["experiment", name, "--out", str(out), "--cache-dir", str(cache), "--quiet", *extra, *flags]


def test_experiment_digits_runs_every_row_per_seed_and_matches_the_dmd_only_row(tmp_path, cache, capsys):
    out = tmp_path / "exp"
    assert main(_argv("digits", out, cache, "--seeds", "30,31", sets=["monitor.every=1"])) == 0
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out
    for row in ("DMD only (1-step)", "DMDR fixed (1-step)", "DMDR balanced (1-step)", "reward only (1-step)"):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert "| 2 |" in line and " ± " in line, line  # two seeds, mean ± std
    summary = json.loads((out / "experiment.json").read_text())
    assert summary["seeds"] == [30, 31] and len(summary["results"]["DMDR fixed (1-step)"]) == 2
    # Matched: up to the end of stage 1 (step 2) the DMD-only run is the DMDR run, bit for bit.
    hist = summary["histories"]
    assert hist["DMD only"][0]["step"] == 2 and hist["DMD only"][0] == hist["DMDR fixed"][0]
    assert hist["DMD only"][-1] != hist["DMDR fixed"][-1]  # stage 2 differs by the reward
    # The DMD-only row is the DMDR run without its reward: the same stages (and so the same
    # stage-2 learning rates from step 2), no reward term anywhere.
    for seed in (30, 31):
        cfg = yaml.safe_load((out / f"dmd-only-seed{seed}" / "config.yaml").read_text())
        dmdr = yaml.safe_load((out / f"dmdr-fixed-seed{seed}" / "config.yaml").read_text())
        assert cfg["rewards"] == [] and cfg["train"]["seed"] == seed
        assert cfg["dmdr"]["cold_start_steps"] == dmdr["dmdr"]["cold_start_steps"] == 2
        assert cfg["optim"] == dmdr["optim"]
        rows = read_jsonl(out / f"dmd-only-seed{seed}" / "metrics.jsonl")
        assert {r["stage"] for r in rows if "stage" in r} == {1, 2}
        assert not any("loss_reward" in r for r in rows)


def test_experiment_coldstart_tabulates_and_plots_every_arm(tmp_path, cache, capsys):
    out = tmp_path / "cold"
    argv = _argv("coldstart", out, cache, "--seeds", "30,31", "--eval-steps", "2,4")
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out
    assert "setting `default`" in table and (out / "curves.png").stat().st_size > 0
    for arm in ("both on", "DynaRS only", "DynaDG only", "both off"):
        for step in (2, 4):
            line = next(line for line in table.splitlines() if line.startswith(f"| {arm}, step {step} |"))
            assert "| 2 |" in line and " ± " in line, line
    summary = json.loads((out / "experiment.json").read_text())
    res = summary["results"]
    assert set(res) == {"both on", "DynaRS only", "DynaDG only", "both off"}
    assert all(len(res[arm][str(k)]) == 2 for arm in res for k in (2, 4))
    # Each arm's run carries its own switches, no reward, and all steps at stage 1.
    switches = {
        "both-on": (True, True),
        "dynars-only": (True, False),
        "dynadg-only": (False, True),
        "both-off": (False, False),
    }
    for arm, (rs, dg) in switches.items():
        cfg = yaml.safe_load((out / f"{arm}-seed31" / "config.yaml").read_text())
        assert (cfg["dmdr"]["dynars"], cfg["dmdr"]["dynadg"]) == (rs, dg)
        assert cfg["rewards"] == [] and cfg["train"]["seed"] == 31
        assert (
            cfg["optim"]["lr_generator_stage2"] == cfg["optim"]["lr_generator"]
        )  # stage 1's rates throughout
        assert cfg["optim"]["lr_critic_stage2"] == cfg["optim"]["lr_critic"]
    # The switches change the training: DMD with both strategies on ends elsewhere than with both off.
    fd = {arm: [r["fd"] for r in res[arm]["2"]] for arm in res}
    assert fd["both on"] != fd["both off"] and fd["DynaRS only"] != fd["DynaDG only"]
    # A second call finds the runs done and only re-tabulates them (resume, no retraining).
    before = (out / "both-on-seed30" / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "both-on-seed30" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "experiment.json").read_text())["results"] == res


@pytest.mark.parametrize("setting", ["reinit", "4step"])
def test_experiment_coldstart_harder_settings(tmp_path, cache, setting):
    out = tmp_path / setting
    assert (
        main(_argv("coldstart", out, cache, "--seeds", "30", "--eval-steps", "2", "--setting", setting)) == 0
    )
    table = (out / "table.md").read_text()
    assert f"setting `{setting}`" in table
    cfg = yaml.safe_load((out / "both-off-seed30" / "config.yaml").read_text())
    if setting == "4step":
        assert cfg["student"]["num_steps"] == 4 and "4-step student" in table
    else:
        assert cfg["student"]["init"].endswith("reinit-seed30.safetensors")
        from safetensors.torch import load_file

        from dmdr_fast.configs import load_preset
        from dmdr_fast.recipes.digits.experiment_common import load_assets

        init = load_file(cfg["student"]["init"])
        teacher = load_assets(
            load_preset("digits", TINY), cache, progress=False
        ).teacher_state  # the cached one
        changed = {k.split(".")[1] for k in init if not (init[k] == teacher[k].cpu()).all()}
        assert changed == {
            str(max(int(k.split(".")[1]) for k in init if k.startswith("transformer_blocks.")))
        }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["coldstart", "--preset", "sd3-medium-4step", "--setting", "reinit"], "use a digits preset"),
        (["coldstart", "--eval-steps", "5,2"], "--eval-steps: expected increasing"),
        (["coldstart", "--seeds", "1,x"], "--seeds: expected comma-separated integers"),
        (["coldstart", "--setting", "hard"], "--setting: 'hard' is not one of"),
        (["digits", "--setting", "4step"], "--setting: only for `experiment coldstart`"),
        (["digits-grpo", "--eval-steps", "5"], "--eval-steps: only for `experiment coldstart`"),
        (["nothing"], "unknown (available: digits, digits-grpo, coldstart)"),
    ],
)
def test_experiment_mistakes_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["experiment", *extra[:1], "--out", str(tmp_path / "x"), *extra[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_mean_std_table_and_seed_parsing():
    from dmdr_fast._errors import UserError
    from dmdr_fast.recipes.digits.experiment_common import mean_std, mean_std_table, monitor_cell, parse_seeds

    assert mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000"  # sample std (n − 1)
    assert mean_std([4.0]) == "4.000" and mean_std([1.0, 2.0], digits=1) == "1.5 ± 0.7"
    table = mean_std_table(
        {"a": [{"fd": 1.0, "r": 0.5}, {"fd": 3.0}], "b": [{"r": float("nan")}]},
        ["fd", "r"],
        extra={"monitor": {"a": "no warning"}},
    )
    assert table.splitlines()[2:] == [
        "| a | 2 | 2.000 ± 1.414 | 0.500 | no warning |",
        "| b | 1 | – | – | — |",
    ]
    assert monitor_cell(
        ["no warning (3 evaluations)", "WARNED from step 40, still collapsed: 5 of the 5"]
    ) == ("warned 1/2, still collapsed at the end 1/2")
    assert parse_seeds("30,31") == (30, 31)
    for bad in ("30,30", "a", ""):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)

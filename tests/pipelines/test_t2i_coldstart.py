"""``dmdr-fast experiment coldstart --preset <text-to-image>`` on a tiny random SD3 pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from tests.pipelines.test_t2i_roundtrip import COMMON, PROMPTS

from dmdr_fast.cli import main
from dmdr_fast.pipelines.random import save_random_pipeline


def test_coldstart_on_a_text_to_image_preset(tmp_path: Path, capsys):
    teacher = save_random_pipeline("sd3", "tiny", tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sets = [
        *[s for s in COMMON if not s.startswith(("train.max_steps", "dmdr.cold"))],
        f"model.path={teacher}",
        "model.kwargs.max_sequence_length=4",
        f"data.prompts={prompts}",
        "monitor.samples_per_condition=2",
        "dmdr.dynamic_horizon=2",
        "student.kind=full",
        "student.num_steps=1",
    ]
    out = tmp_path / "cold"
    argv = ["experiment", "coldstart", "--preset", "sd3-medium-4step", "--out", str(out), "--quiet",
            "--seeds", "0,1", "--eval-steps", "1,2", *[a for kv in sets for a in ("--set", kv)]]  # fmt: skip
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out and (out / "curves.png").is_file()
    for arm in ("both on", "DynaRS only", "DynaDG only", "both off"):
        line = next(line for line in table.splitlines() if line.startswith(f"| {arm}, step 2 |"))
        assert "| 2 |" in line and " ± " in line, line  # two seeds: fd_to_reference mean ± std
    res = json.loads((out / "experiment.json").read_text())["results"]
    assert all("fd_to_reference" in r for arm in res.values() for runs in arm.values() for r in runs)
    cfg = yaml.safe_load((out / "dynadg-only-seed1" / "config.yaml").read_text())
    assert (cfg["dmdr"]["dynars"], cfg["dmdr"]["dynadg"], cfg["rewards"]) == (False, True, [])
    assert cfg["train"]["max_steps"] == 2 and not (out / "dynadg-only-seed1" / "export").exists()

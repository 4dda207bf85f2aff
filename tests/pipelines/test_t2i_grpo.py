"""Rewards without gradients on text-to-image: the GRPO presets train on tiny random pipelines.

``sd3-medium-grpo`` and ``zimage-grpo`` (GRPO with DMD as the regulariser, JPEG compressibility as
the offline reward) run through ``dmdr-fast train`` on the tiny random SD3 and Z-Image pipelines,
as they are (``rl.algorithm: grpo``) and as advantage-weighted Decoupled DMD; the Trainer API runs
the same recipe without the CLI. Sizes are tiny (16², batch 4 = 2 prompts × 2 samples).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dmdr_fast.cli import main
from dmdr_fast.configs import load_preset
from dmdr_fast.pipelines.random import save_random_pipeline

PROMPTS = ["a red cat", "a blue dog", "a green car", "an old tree", "a tall house"]
FAMILIES = {  # family: (preset, overrides of the text length the tiny pipeline takes)
    "sd3": ("sd3-medium-grpo", ["model.kwargs.max_sequence_length=4"]),
    "zimage": ("zimage-grpo", ["model.kwargs.max_sequence_length=16"]),
}
TINY = [
    "model.kwargs.resolution=16",
    "model.weights_dtype=fp32",
    "model.gradient_checkpointing=false",
    "model.vae_slicing=false",
    "student.num_steps=2",
    "dmdr.cold_start_steps=1",  # one DMD step (stage 1), then the group-relative mode
    "dmdr.dynamic_horizon=1",
    "dmdr.ratio_update=1",
    "train.max_steps=3",
    "train.batch_size=4",
    "rl.group_size=2",  # 2 prompts × 2 samples per batch
    "rl.score_chunk=4",
    "monitor.every=0",
    "train.device=cpu",
    "train.precision=fp32",
    "train.log_every=1",
    "train.sample_every=0",
    "train.checkpoint_every=0",
    "train.tensorboard=false",
]
MODES = {  # mode: extra overrides, metrics its stage-2 rows carry
    "grpo": ([], ["loss_pg", "ratio", "ratio_last", "clip_frac", "loss_dmd"]),  # passes 2: ratio_last
    "advantage_weighted": (
        ["rl.algorithm=advantage_weighted", "dmdr.decoupled=true"],
        ["adv_abs", "loss_ca"],
    ),
}


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {family: save_random_pipeline(family, "tiny", root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_rl_rows(rows: list[dict], keys: list[str]) -> None:
    stage2 = [r for r in rows if r.get("stage") == 2 and "valid_frac" in r]
    assert stage2, f"no stage-2 RL rows in {rows}"
    for row in stage2:
        assert math.isfinite(row["reward/jpeg"]) and row["reward/jpeg"] < 0  # −kB of a JPEG
        assert row["valid_frac"] == 1.0  # PIL scores every sample
        for key in keys:
            assert key in row and math.isfinite(row[key]), (key, row)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grpo_preset_trains_from_the_cli(
    tiny_pipes: dict[str, Path], prompt_file: Path, tmp_path: Path, family: str, mode: str
):
    preset, extra = FAMILIES[family]
    config = load_preset(preset)
    assert (config.rl.algorithm, config.rl.regularizer) == ("grpo", "dmd")
    assert config.active_rewards[0].kind == "jpeg"
    assert config.train.batch_size % config.rl.group_size == 0
    overrides, keys = MODES[mode]
    if mode == "advantage_weighted":
        assert config.dmdr.guidance > 1  # the CA term it weights exists
    sets = [*TINY, *extra, *overrides, f"model.path={tiny_pipes[family]}", f"data.prompts={prompt_file}"]
    flags = [x for s in sets for x in ("--set", s)]
    out = tmp_path / "run"
    argv = ["train", "--preset", preset, *flags, "--out", str(out), "--quiet", "--debug"]
    assert main(argv) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # stage 1 (DMD), then two RL steps
    _check_rl_rows(rows, keys)
    if mode == "advantage_weighted":
        assert not any("loss_pg" in r for r in rows)
    assert (out / "export" / "dmdr_export.json").is_file()
    saved = (out / "config.yaml").read_text()
    assert f"algorithm: {mode}" in saved


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grpo_through_the_trainer_api(
    family: str, tiny_pipes: dict[str, Path], prompt_file: Path, tmp_path: Path
):
    """The recipe without the CLI: adapter, encoded prompts, the preset's rewards, Trainer.fit."""
    from dmdr_fast.data.prompts import PromptBatch
    from dmdr_fast.recipes.t2i import EncodedPromptSampler, build_adapter
    from dmdr_fast.rewards import rewards_from_config
    from dmdr_fast.train import Trainer

    preset, extra = FAMILIES[family]
    config = load_preset(preset, [*TINY, *extra, f"model.path={tiny_pipes[family]}"])
    adapter = build_adapter(config.model, device="cpu")
    batch = PromptBatch(prompts=PROMPTS, condition=adapter.encode_condition(PROMPTS))
    reward = rewards_from_config(config.rewards, device="cpu")
    assert [m.spec.name for m in reward.members] == ["jpeg"] and not reward.members[0].differentiable
    trainer = Trainer(config, adapter, reward=reward, data=EncodedPromptSampler(batch), out_dir=tmp_path)
    trainer.fit(progress=False)
    assert trainer.state.gen_step == config.train.max_steps
    _check_rl_rows(_rows(tmp_path), MODES["grpo"][1])

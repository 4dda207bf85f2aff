"""The text-to-image presets and CLI commands on a tiny random SD3 pipeline (benchmarks, sampling)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tests.utils import sqnr_db

from dmdr_fast.cli import main
from dmdr_fast.config import ConfigError, DMDRTrainerConfig
from dmdr_fast.configs import CONFIG_DIR, load_preset, preset_names
from dmdr_fast.models.families import T2I_FAMILIES, families, family_of_pipeline
from dmdr_fast.pipelines.random import (
    build_random_pipeline,
    random_options,
    random_sizes,
    save_random_pipeline,
)

# Every preset but digits is a text-to-image one (the GRPO presets included); the list is read from
# the folder so that a new preset is checked without editing this file.
T2I_PRESETS = [name for name in preset_names() if not name.startswith("digits")]
TINY = [
    "--set", "model.kwargs.resolution=16", "--set", "model.kwargs.max_sequence_length=4",
    "--set", "model.weights_dtype=fp32", "--set", "model.gradient_checkpointing=false",
    "--set", "train.precision=fp32", "--set", "train.device=cpu",
]  # fmt: skip


def test_the_preset_list_holds_every_t2i_yaml():
    assert {"sd3-medium-grpo", "zimage-grpo", "sd3-medium-4step", "zimage-8step"} <= set(T2I_PRESETS)


@pytest.mark.parametrize("name", T2I_PRESETS)
def test_preset_loads_validates_and_documents_every_value(name: str):
    config = load_preset(name)
    assert config.name == name and config.model.family in T2I_FAMILIES
    assert config.to_dict() == load_preset(name, []).to_dict()
    # Every value line of the YAML carries a comment saying where it comes from or what it does.
    for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
        if re.match(r"^\s*(- )?[a-z_0-9]+:\s*\S", line):
            assert "#" in line, f"{name}.yaml: undocumented value: {line.strip()}"
    assert {f.default_preset for f in families()} <= set(T2I_PRESETS)
    # ... and every field of the config is in the YAML (a new option must be documented in each
    # preset), except the DiT-only time/pixel settings and SDXL's noise timestep elsewhere.
    written = _keys(yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()))
    not_applicable = {"model.pixel_range", "model.round_timesteps", "model.timestep_scale"}
    if config.model.family != "sdxl":
        not_applicable.add("student.noise_timestep")
    missing = _keys(DMDRTrainerConfig().to_dict()) - written - not_applicable
    assert not missing, f"{name}.yaml does not list {sorted(missing)}"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted names of a config tree's leaves (``model.kwargs`` and the rewards list are leaves)."""
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            out |= _keys(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_preset_values_are_checked():
    with pytest.raises(ConfigError, match="real_scale0"):
        load_preset("sdxl-1step", ["dmdr.real_scale0=3.0"])  # above critic.fake_scale
    with pytest.raises(ConfigError, match="weights_dtype"):
        load_preset("sd3-medium-4step", ["model.weights_dtype=int8"])


def test_family_detection_and_errors(tmp_path: Path):
    with pytest.raises(ValueError, match=r"model_index\.json"):
        family_of_pipeline(tmp_path)
    with pytest.raises(ValueError, match="sizes"):
        build_random_pipeline("sd3", "huge", tmp_path)
    with pytest.raises(ValueError, match="families"):
        build_random_pipeline("dalle", "tiny", tmp_path)
    assert set(random_sizes()) == set(T2I_FAMILIES)
    assert all("tiny" in sizes for sizes in random_sizes().values())


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_pipeline_options_change_only_what_they_name(tmp_path: Path):
    assert random_options("sd3") == {"t5": True} and random_options("flux") == {"guidance_embeds": True}
    assert random_options("zimage") == random_options("sdxl") == {}
    with pytest.raises(ValueError, match=r"'sd3'.*guidance_embeds.*\['t5'\]"):
        build_random_pipeline("sd3", "tiny", tmp_path, guidance_embeds=False)
    with pytest.raises(ValueError, match=r"'zimage'.*t5.*none"):
        build_random_pipeline("zimage", "tiny", tmp_path, t5=False)
    # SD3 without T5: no T5 encoder or tokenizer; every other component is the default pipeline's.
    full = build_random_pipeline("sd3", "tiny", tmp_path / "full")
    no_t5 = build_random_pipeline("sd3", "tiny", tmp_path / "no_t5", t5=False)
    assert full.text_encoder_3 is not None and full.tokenizer_3 is not None
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _same_weights(getattr(full, name), getattr(no_t5, name)), name
    assert dict(full.scheduler.config) == dict(no_t5.scheduler.config)
    # Flux without guidance embeds (Flux-schnell-like): only the transformer differs.
    dev = build_random_pipeline("flux", "tiny", tmp_path / "dev")
    plain = build_random_pipeline("flux", "tiny", tmp_path / "plain", guidance_embeds=False)
    assert dev.transformer.config.guidance_embeds and not plain.transformer.config.guidance_embeds
    guidance_keys = [k for k in dev.transformer.state_dict() if "guidance_embedder" in k]
    assert guidance_keys and not any("guidance_embedder" in k for k in plain.transformer.state_dict())
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert _same_weights(getattr(dev, name), getattr(plain, name)), name
    assert dict(dev.scheduler.config) == dict(plain.scheduler.config)
    # save_random_pipeline passes the options on.
    folder = save_random_pipeline("sd3", "tiny", tmp_path / "saved", t5=False)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (folder / "text_encoder_3").exists()


def test_every_family_is_registered_once_with_its_own_module():
    """A family is its module (adapter + FAMILY + random_pipeline), one registry line and a preset."""
    specs = families()
    assert [f.name for f in specs] == list(T2I_FAMILIES)
    assert len({f.pipeline_class for f in specs}) == len(specs) == len({f.adapter for f in specs})
    for f in specs:
        assert f.adapter.__module__ == f"dmdr_fast.models.{f.name}"
        assert (CONFIG_DIR / f"{f.default_preset}.yaml").is_file()
        assert f.sampling_steps >= 1 and f.sampling_guidance >= 1.0


def test_train_without_model_path_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["train", "--preset", "sd3-medium-4step", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "model.path" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_random_pipeline("sd3", "tiny", tmp_path_factory.mktemp("sd3") / "pipe")
    assert family_of_pipeline(folder) == "sd3"
    return folder


def test_bench_sample_on_a_tiny_pipeline(sd3_dir: Path, tmp_path: Path):
    out = tmp_path / "sample.json"
    argv = ["bench", "sample", "--pipeline", str(sd3_dir), "--steps", "2", "--baseline-steps", "4"]
    assert main([*argv, "--reps", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["family"] == "sd3" and result["student_steps"] == 2 and result["baseline_steps"] == 4
    assert result["images_per_s"]["student"] > 0 and result["speedup"] > 0
    assert result["peak_mem_mib"]["student"] is None  # CUDA only


def test_bench_step_on_a_tiny_pipeline(sd3_dir: Path, tmp_path: Path):
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--pipeline", str(sd3_dir), *TINY, "--set", "train.batch_size=2"]
    assert main([*argv, "--cycles", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["student_steps"] == 4 and result["speedup_cycle"] > 0  # sd3-medium-4step's student


def test_bench_step_grpo_on_a_tiny_pipeline(sd3_dir: Path, tmp_path: Path):
    """``bench step`` in a group-relative mode keeps the (scored) reward on both sides."""
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--pipeline", str(sd3_dir), *TINY, "--set", "train.batch_size=2"]
    argv += ["--set", "rl.algorithm=grpo", "--set", "rl.group_size=2", "--set", "student.num_steps=2"]
    argv += ["--set", "rewards=[{kind: jpeg, weight: 1.0}]"]
    assert main([*argv, "--cycles", "1", "--warmup", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["speedup_cycle"] > 0


def test_bench_step_fp8_on_a_tiny_pipeline(sd3_dir: Path, tmp_path: Path):
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--pipeline", str(sd3_dir), *TINY, "--set", "train.batch_size=2"]
    argv += ["--set", "model.weights_dtype=fp8", "--set", "model.fp8_exclude=[]"]  # 16-wide: all eligible
    assert main([*argv, "--cycles", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fp8_vs"] == "bf16" and result["fp8_speedup_cycle"] > 0  # loaded in bf16, then FP8
    before, after = result["fp8_frozen_bytes"]
    assert 0 < after < before


def test_sample_pipeline_writes_a_grid(sd3_dir: Path, tmp_path: Path):
    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--pipeline",
        str(sd3_dir),
        "--prompt",
        "a cat",
        "--prompt",
        "a dog",
        "--per-prompt",
        "2",
    ]
    assert main([*argv, "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 16
    with pytest.raises(SystemExit, match="prompt"):
        main(["sample", "--pipeline", str(sd3_dir), "--out", str(out)])
    with pytest.raises(SystemExit, match="checkpoint"):
        main(["sample", "--out", str(out)])


def test_cache_prompts_refuses_a_cache_of_another_model(
    sd3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    cache = tmp_path / "cache"
    argv = [
        "cache-prompts",
        "--pipeline",
        str(sd3_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(cache),
        "--quiet",
    ]
    assert main([*argv, *TINY]) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["fingerprint"]["max_sequence_length"] == 4
    # Training with another T5 length must refuse this cache, naming the differing setting.
    run = [
        "train",
        "--preset",
        "sd3-medium-4step",
        "--set",
        f"model.path={sd3_dir}",
        "--set",
        f"data.cache={cache}",
    ]
    other = [
        a if a != "model.kwargs.max_sequence_length=4" else "model.kwargs.max_sequence_length=6" for a in TINY
    ]
    before = (cache / "cache.json").read_text()
    assert main([*run, *other, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    # The last stderr line (diffusers' loading bars come before it): the field, not only hashes.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dmdr-fast: prompt cache"), err
    assert "'model.kwargs.max_sequence_length': cache 4 vs this run 6" in err
    assert "same model.* overrides as train" in err
    assert (cache / "cache.json").read_text() == before  # the cache is left as it was


def _exported_student(sd3_dir: Path, factory: pytest.TempPathFactory, kind: str) -> Path:
    """A student of the tiny SD3 pipeline, trained one step and exported by `dmdr-fast train`."""
    prompts = factory.mktemp("prompts") / "p.txt"
    prompts.write_text("a cat\na dog\na tree\n")
    run = factory.mktemp("run")
    sets = [f"model.path={sd3_dir}", f"data.prompts={prompts}", "rewards=[]", "dmdr.cold_start_steps=0",
            "train.max_steps=1", "train.batch_size=2", "student.num_steps=2", "monitor.every=0",
            "monitor.samples_per_condition=2", f"student.kind={kind}"]  # fmt: skip
    flags = [x for s in sets for x in ("--set", s)]
    assert main(["train", "--preset", "sd3-medium-4step", *TINY, *flags, "--out", str(run), "--quiet"]) == 0
    return run / "export"


@pytest.fixture(scope="module")
def sd3_lora_export(sd3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _exported_student(sd3_dir, tmp_path_factory, "lora")


def test_eval_exported_lora_against_the_teacher(sd3_dir: Path, sd3_lora_export: Path, tmp_path: Path):
    from tests.rewards.test_clip_rewards import make_tiny_clip, write_tiny_tokenizer

    clip_dir = tmp_path / "clip"
    tokenizer = write_tiny_tokenizer(clip_dir)
    make_tiny_clip(tokenizer).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    real = tmp_path / "real"  # a folder of "real" images of another size, cropped/resized to 16²
    real.mkdir()
    for i in range(5):
        Image.effect_noise((24, 20), 40 + 10 * i).convert("RGB").save(real / f"{i}.png")
    out = tmp_path / "eval"
    argv = ["eval", "--pipeline", str(sd3_dir), "--lora", str(sd3_lora_export), "--prompt", "a red cat",
            "--prompt", "a blue dog", "--per-prompt", "2", "--teacher-steps", "3", "--reward",
            f"clip={clip_dir}", "--reference-images", str(real), "--reference-limit", "4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    teacher, student = result["models"]
    assert teacher.startswith("teacher (3 steps, guidance 7") and student.startswith("student (2 steps)")
    row = result["models"][student]
    for key in ("score/clip", "win_rate/clip", "diversity_pixel", "diversity_feat", "fd_to_reference"):
        assert key in row, key
    assert result["num_real"] == 4 and result["features"] == "CLIP image"  # FD_CLIP / CMMD
    for name in (teacher, student):
        assert result["models"][name]["fd_to_real"] >= 0 and "mmd_to_real" in result["models"][name]
    assert 0 <= row["win_rate/clip"] <= 1 and row["diversity_pixel"] > 0
    s = result["settings"]
    assert (s["kind"], s["family"], s["student_steps"]) == ("lora", "sd3", 2)
    assert s["shared_kwargs"] == {"height": 16, "width": 16, "max_sequence_length": 4}
    assert "win_rate/clip" in (out / "eval.md").read_text()
    assert Image.open(out / "teacher_vs_student.png").size[0] > 4 * 16


def test_eval_exported_full_student(sd3_dir: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path):
    """A full student is its own pipeline folder: the teacher is freed, the student loaded."""
    export = _exported_student(sd3_dir, tmp_path_factory, "full")
    out = tmp_path / "eval"
    argv = ["eval", "--pipeline", str(sd3_dir), "--student", str(export), "--prompt", "a cat", "--prompt", "a dog",
            "--per-prompt", "2", "--teacher-steps", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["settings"]["kind"] == "full" and len(result["models"]) == 2
    student = result["models"][list(result["models"])[1]]
    assert student["fd_to_reference"] >= 0 and student["diversity_pixel"] > 0


def test_eval_pipeline_refuses_bad_arguments(
    sd3_dir: Path, sd3_lora_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    base = ["eval", "--pipeline", str(sd3_dir), "--prompt", "a cat", "--out", str(tmp_path / "e")]
    assert main(base) == 2
    assert "exactly one of --student" in capsys.readouterr().err
    assert main([*base, "--student", str(sd3_dir)]) == 2  # a pipeline folder, but not an export
    assert "dmdr_export.json" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="KIND=PATH"):
        main([*base, "--lora", str(sd3_lora_export), "--reward", "clip"])
    with pytest.raises(SystemExit, match="prompt"):
        main(
            ["eval", "--pipeline", str(sd3_dir), "--lora", str(sd3_lora_export), "--out", str(tmp_path / "e")]
        )


def test_ode_pairs_then_train_with_ode_init(sd3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na tree\n")
    pairs = tmp_path / "pairs"
    argv = ["ode-pairs", "--pipeline", str(sd3_dir), "--prompts", str(prompts), "--teacher-steps", "2",
            "--batch-size", "2", "--out", str(pairs), "--quiet", *TINY]  # fmt: skip
    assert main(argv) == 0
    meta = json.loads((pairs / "ode_pairs.json").read_text())
    assert (
        meta["count"] == 3 and meta["steps"] == 2 and meta["guidance"] == 7.0
    )  # sd3-medium's real-score CFG
    assert (pairs / "cache" / "cache.json").is_file()  # the prompts' encodings: no text encoder needed later
    run = tmp_path / "run"
    sets = [f"model.path={sd3_dir}", f"data.prompts={prompts}", "rewards=[]", "dmdr.cold_start_steps=0",
            "train.max_steps=1", "train.batch_size=2", "student.num_steps=2", "monitor.every=0",
            "monitor.samples_per_condition=2", f"student.ode_init={pairs}", "student.ode_steps=2"]  # fmt: skip
    flags = [x for s in sets for x in ("--set", s)]
    assert main(["train", "--preset", "sd3-medium-4step", *TINY, *flags, "--out", str(run), "--quiet"]) == 0
    assert "ODE init: 2 steps on 3 pairs" in (run / "notes.txt").read_text()
    # Pairs of another text length do not fit this model's prompt encodings.
    other = [
        a if a != "model.kwargs.max_sequence_length=4" else "model.kwargs.max_sequence_length=6" for a in TINY
    ]
    capsys.readouterr()
    argv = ["train", "--preset", "sd3-medium-4step", *other, *flags, "--out", str(tmp_path / "r2"), "--quiet"]
    assert main(argv) == 2  # a user's mistake (issue 17): one line naming the setting, exit 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dmdr-fast: ") and "max_sequence_length" in err, err


# FP8 sampling vs the unquantised student on the tiny SD3, in pixel space ([0, 1], so the mean carries
# most of the signal): 56 dB measured (torch 2.13, CPU); 45 dB leaves 11 dB for other versions. The
# second check (much nearer the student than the teacher is) is the one that needs no such margin.
FP8_IMAGE_SQNR_DB = 45.0


def _loud_lora(pipe) -> None:
    """Give the (one-step, near-zero) exported LoRA a visible effect, the same on every load."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_fp8_sampling_of_an_exported_lora(sd3_dir: Path, sd3_lora_export: Path, tmp_path: Path):
    """`sample --fp8` fuses the student LoRA, then quantises: its images stay near the unquantised
    student's, and much nearer to them than the bare teacher's (the LoRA was fused, not dropped)."""
    from dmdr_fast.pipelines.export import load_exported, sample_exported
    from dmdr_fast.pipelines.fp8 import quantize_pipeline

    prompts = ["a cat", "a dog"]
    pipe, info = load_exported(sd3_dir, lora=sd3_lora_export)
    _loud_lora(pipe)
    student = sample_exported(pipe, info, prompts, seed=0)
    pipe.unload_lora_weights()
    teacher = sample_exported(pipe, info, prompts, seed=0)  # the same few-step call, no LoRA
    pipe, info = load_exported(sd3_dir, lora=sd3_lora_export)
    _loud_lora(pipe)
    report = quantize_pipeline(pipe)
    assert report.quantized and not any(pipe.get_list_adapters().values())
    fp8 = sample_exported(pipe, info, prompts, seed=0)
    print(
        f"image SQNR fp8 vs student {sqnr_db(student, fp8):.1f} dB, teacher vs student {sqnr_db(student, teacher):.1f} dB"
    )
    assert sqnr_db(student, fp8) > FP8_IMAGE_SQNR_DB
    assert (fp8 - student).abs().mean() < 0.25 * (teacher - student).abs().mean()
    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--pipeline",
        str(sd3_dir),
        "--lora",
        str(sd3_lora_export),
        "--prompt",
        "a cat",
        "--fp8",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0


def test_bench_sample_fp8_side(sd3_dir: Path, tmp_path: Path):
    out = tmp_path / "sample.json"
    argv = ["bench", "sample", "--pipeline", str(sd3_dir), "--steps", "2", "--baseline-steps", "2", "--fp8"]
    assert main([*argv, "--reps", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fp8_linears"] > 0 and result["fp8_speedup"] > 0
    assert set(result["images_per_s"]) == {"baseline", "student", "student_fp8"}

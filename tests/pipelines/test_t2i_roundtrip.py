"""Text-to-image round trips: random pipeline folder → `dmdr-fast train` → export → plain diffusers.

Each case assembles a tiny random pipeline from configs, saves it, trains a few DMDR steps on it
through the CLI (the family's real preset with size overrides), and loads the export with the
diffusers pipeline class only (no dmdr_fast code in the loop): a pipeline folder for a full
fine-tune, or the teacher + ``load_lora_weights`` + the exported scheduler for a LoRA student. It
then generates with the exported call arguments and checks, for 1-step students, that the image
latents equal the student's own one-step sample x̂0 = ε − v(ε, 1) on the same noise, and for
multi-step students that the scheduler visits exactly the grid the student was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from dmdr_fast.cli import main
from dmdr_fast.pipelines.random import save_random_pipeline
from dmdr_fast.recipes.t2i import adapter_class

PROMPTS = ["a red cat", "a blue dog", "a green car", "an old tree", "a tall house"]
COMMON = [
    "model.kwargs.resolution=16",
    "model.weights_dtype=fp32",
    "model.gradient_checkpointing=false",
    "model.vae_slicing=false",
    "rewards=[]",
    "train.max_steps=2",
    "dmdr.cold_start_steps=0",
    "dmdr.ratio_update=2",
    "train.batch_size=2",
    "monitor.every=0",
    "train.device=cpu",
    "train.precision=fp32",
    "train.sample_every=0",
    "train.tensorboard=false",
    "optim.lr_generator=1e-3",  # big enough that two steps visibly move the student
]
CASES = {  # family, student kind, steps, preset, extra overrides, pipeline class, use the prompt cache
    "sd3-full": ("sd3", "full", 1, "sd3-medium-4step", ["model.kwargs.max_sequence_length=4"], "StableDiffusion3Pipeline", True),
    "sd3-lora": ("sd3", "lora", 2, "sd35-large-4step", ["model.kwargs.max_sequence_length=4"], "StableDiffusion3Pipeline", False),
    # bf16 frozen weights + bf16 autocast + a full fp32 student through our attention op
    "sd3-full-bf16": ("sd3", "full", 1, "sd3-medium-4step", ["model.kwargs.max_sequence_length=4", "model.weights_dtype=bf16", "train.precision=bf16"], "StableDiffusion3Pipeline", True),
    "zimage-full": ("zimage", "full", 1, "zimage-8step", ["model.kwargs.max_sequence_length=16"], "ZImagePipeline", True),
    "zimage-lora": ("zimage", "lora", 1, "zimage-8step", ["model.kwargs.max_sequence_length=16"], "ZImagePipeline", False),
    "flux-lora": ("flux", "lora", 2, "flux-4step", ["model.kwargs.max_sequence_length=8"], "FluxPipeline", True),
    "sdxl-full": ("sdxl", "full", 1, "sdxl-1step", [], "StableDiffusionXLPipeline", True),
    "sdxl-lora": ("sdxl", "lora", 1, "sdxl-1step", [], "StableDiffusionXLPipeline", False),
    # DMD2's conditioning timestep: plain diffusers samples it with LCMScheduler timesteps=[399]
    "sdxl-full-t399": ("sdxl", "full", 1, "sdxl-1step", ["student.noise_timestep=399"], "StableDiffusionXLPipeline", False),
}  # fmt: skip


def _train(tmp_path: Path, case: str) -> tuple[Path, Path, dict]:
    family, kind, steps, preset, extra, _, use_cache = CASES[case]
    pipe_dir = save_random_pipeline(family, "tiny", tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sets = [*COMMON, f"student.kind={kind}", f"student.num_steps={steps}", *extra]
    flags = [x for s in sets for x in ("--set", s)]
    if use_cache:
        cache = tmp_path / "cache"
        argv = ["cache-prompts", "--preset", preset, "--pipeline", str(pipe_dir), "--prompts", str(prompts)]
        assert main([*argv, "--out", str(cache), "--quiet", *flags]) == 0
        flags += ["--set", f"data.cache={cache}"]
    else:
        flags += ["--set", f"data.prompts={prompts}"]
    out = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        preset,
        "--set",
        f"model.path={pipe_dir}",
        *flags,
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    export = out / "export"
    info = json.loads((export / "dmdr_export.json").read_text())
    assert info["family"] == family and info["num_steps"] == steps and info["trained_steps"] == 2
    assert (out / "report.md").is_file() and (out / "teacher_vs_student.png").is_file()
    return pipe_dir, export, info


def _noise(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_export_load_with_plain_diffusers(tmp_path: Path, case: str):
    family, kind, steps, _, extra, pipeline_name, _ = CASES[case]
    teacher_dir, export, info = _train(tmp_path, case)
    cls = getattr(diffusers, pipeline_name)
    if kind == "full":
        assert info["kind"] == "pipeline"
        pipe = cls.from_pretrained(str(export))
        teacher = cls.from_pretrained(str(teacher_dir))
        net = info_attr = "unet" if family == "sdxl" else "transformer"
        moved = [
            not torch.equal(a, b)
            for a, b in zip(
                getattr(pipe, net).state_dict().values(), getattr(teacher, info_attr).state_dict().values()
            )
        ]
        assert any(moved), "the exported denoiser equals the teacher: training did not reach the export"
    else:
        assert info["kind"] == "lora"
        lora = load_file(str(export / "pytorch_lora_weights.safetensors"))
        prefix = "unet." if family == "sdxl" else "transformer."
        assert all(k.startswith(prefix) for k in lora)
        assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k), "LoRA B is still zero"
        pipe = cls.from_pretrained(str(teacher_dir))
        pipe.load_lora_weights(str(export))
        pipe.scheduler = getattr(diffusers, info["scheduler_class"]).from_pretrained(
            str(export), subfolder="scheduler"
        )
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(info["call_kwargs"])
    noise_timestep = _override(extra, "student.noise_timestep")
    if noise_timestep is None:
        assert kwargs["num_inference_steps"] == steps and kwargs["height"] == 16
    else:  # the student's first step is called at its own timestep, not at 999
        assert kwargs["timesteps"] == [int(noise_timestep)] and info["noise_timestep"] == int(noise_timestep)

    ours = adapter_class(family).from_pipeline(pipe, resolution=16, **_adapter_kwargs(extra))
    bf16 = "model.weights_dtype=bf16" in extra
    grid = ours.few_step_grid(steps, info["shift"])
    prompts = PROMPTS[:2]  # passed as copies: ZImagePipeline rewrites its prompt list in place
    if family == "flux":  # packed latents: check the grid and the images only
        images = pipe(
            prompt=prompts, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs
        ).images
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
        torch.testing.assert_close(pipe.scheduler.sigmas, grid, rtol=0, atol=0)
        return
    noise = _noise((2, *ours.sample_shape))
    latents = pipe(prompt=list(prompts), latents=noise.clone(), output_type="latent", **kwargs).images
    assert latents.shape == noise.shape and torch.isfinite(latents).all()
    if family != "sdxl":  # flow schedulers keep their sigmas; LCM has none (its grid is in timesteps)
        torch.testing.assert_close(pipe.scheduler.sigmas, grid, rtol=0, atol=0)
    if steps == 1 and not bf16:  # the exported pipeline's one step IS the trained student's sample
        student = _trained_student(tmp_path / "run", family, teacher_dir, extra)
        with torch.no_grad():
            v = student.velocity(noise, torch.ones(2), student.encode_condition(prompts))
        torch.testing.assert_close(latents, noise - v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["sdxl-full", "sdxl-lora"])
def test_a_new_run_starts_from_an_export(tmp_path: Path, case: str):
    """``student.init`` = an exported folder (full: a pipeline folder, LoRA: the LoRA folder)."""
    from dmdr_fast.configs import load_preset
    from dmdr_fast.recipes.t2i import bench_trainer
    from dmdr_fast.train import checkpoint as ckpt

    _, kind, steps, preset, extra, _, _ = CASES[case]
    teacher_dir, export, _ = _train(tmp_path, case)
    sets = [*COMMON, f"student.kind={kind}", f"student.num_steps={steps}", *extra]
    config = load_preset(preset, [*sets, f"model.path={teacher_dir}", f"student.init={export}"])
    trainer = bench_trainer(config, num_prompts=2)
    trained = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    state = trainer.student.network.state_dict()
    for name, value in trained["student"].items():  # what the first run trained, bit for bit
        torch.testing.assert_close(state[name], value.to(state[name].dtype), rtol=0, atol=0)
    assert trainer.fit(1, progress=False).gen_step == 1


def _trained_student(run: Path, family: str, teacher_dir: Path, extra: list[str]):
    """The student as the Trainer left it: teacher + the last checkpoint's trainable weights."""
    from dmdr_fast.config import DMDRTrainerConfig
    from dmdr_fast.models.roles import make_student
    from dmdr_fast.train import checkpoint as ckpt
    from dmdr_fast.train.components import lora_config

    sd = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    config = DMDRTrainerConfig.from_dict(sd["config"])
    teacher = adapter_class(family).from_pretrained(teacher_dir, resolution=16, **_adapter_kwargs(extra))
    s = config.student
    lora = lora_config(s.lora, "student", teacher.default_lora_targets) if s.kind == "lora" else None
    student = make_student(teacher, lora=lora)
    ckpt.load_trainable_state(student.network, sd["student"], "student")
    if s.noise_timestep is not None:
        student.set_noise_timestep(s.noise_timestep)
    return student


def _override(extra: list[str], key: str) -> str | None:
    return next((item.split("=", 1)[1] for item in extra if item.startswith(key + "=")), None)


def _adapter_kwargs(extra: list[str]) -> dict:
    out = {}
    for item in extra:
        key, value = item.split("=")
        if key.startswith("model.kwargs."):
            out[key.removeprefix("model.kwargs.")] = int(value)
    return out


def test_two_stages_with_a_clip_reward_monitor_and_exact_resume(tmp_path: Path):
    """Stage 2 scores decoded samples against the PROMPT TEXT (from the cache's PromptBatch); the
    monitor runs on held-out prompts; an interrupted run resumed from its checkpoint ends exactly
    where an uninterrupted one does."""
    from tests.rewards.test_clip_rewards import make_tiny_clip, write_tiny_tokenizer

    clip_dir = tmp_path / "clip"
    tokenizer = write_tiny_tokenizer(clip_dir)
    make_tiny_clip(tokenizer).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    teacher = save_random_pipeline("sd3", "tiny", tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sets = [
        *[s for s in COMMON if not s.startswith(("rewards=", "monitor.", "train.max_steps", "dmdr.cold"))],
        f"model.path={teacher}",
        "model.kwargs.max_sequence_length=4",
        f"data.prompts={prompts}",
        f"rewards=[{{kind: clip, name: clip, path: {clip_dir}, weight: 0.3, form: hinge, margin: 0.7, kwargs: {{text_cache_size: 0}}}}]",
        "dmdr.cold_start_steps=1",
        "monitor.every=1",
        "monitor.samples_per_condition=2",
        "train.checkpoint_every=1",
    ]

    def train(out: Path, steps: int, resume: bool = False) -> None:
        flags = [x for s in [*sets, f"train.max_steps={steps}"] for x in ("--set", s)]
        argv = ["train", "--preset", "sd3-medium-4step", *flags, "--out", str(out), "--quiet"]
        assert main([*argv, "--resume"] if resume else argv) == 0

    train(tmp_path / "straight", 3)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r.get("stage") == 2]
    assert stage2 and all("loss_reward" in r and "reward_cos/clip" in r for r in stage2)
    assert any("monitor/diversity" in r for r in rows)
    report = (tmp_path / "straight" / "report.md").read_text()
    assert "Reward-hacking monitor" in report
    assert "(DMDR)" in report and "generator steps of DMD only, then" in report  # says what ran
    for key in ("score/clip", "win_rate/clip", "diversity_pixel", "diversity_feat", "fd_to_reference"):
        assert key in report, key  # the teacher-vs-student comparison (CLIP features for diversity/FD)
    comparison = json.loads((tmp_path / "straight" / "metrics.json").read_text())["comparison"]
    assert comparison["per_prompt"] == 2 and comparison["features"] == "CLIP image"

    train(tmp_path / "resumed", 2)
    train(tmp_path / "resumed", 3, resume=True)
    from dmdr_fast.train import checkpoint as ckpt

    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "straight"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "resumed"))
    assert a["state"]["gen_step"] == b["state"]["gen_step"] == 3
    # Bit-exact with the CLIP text cache off (text_cache_size 0 above). With it on, the last bit
    # can differ: an embedding computed inside a batch of other prompts differs from one computed
    # alone (CPU GEMM blocking), and a resumed run starts with an empty cache.
    for key in a["student"]:
        torch.testing.assert_close(b["student"][key], a["student"][key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("family", "preset", "extra"),
    [
        ("sd3", "sd3-medium-4step", ["model.kwargs.max_sequence_length=4"]),
        ("flux", "flux-4step", ["model.kwargs.max_sequence_length=8"]),
        ("sdxl", "sdxl-1step", ["model.gradient_checkpointing=true"]),  # as the SDXL preset runs
        # Z-Image is left out: diffusers' own RoPE table (`with torch.device("cpu")`, built once per
        # model) breaks the graph there — not our code; it still trains compiled.
    ],
)
def test_compiled_t2i_training_has_no_graph_breaks_or_per_step_recompiles(
    tmp_path: Path, family: str, preset: str, extra: list[str]
):
    """``train.compile`` through the family adapters, our LoRA with per-sample scales and the
    attention op (aot_eager: graph capture without code generation)."""
    from torch._dynamo.utils import counters

    from dmdr_fast.configs import load_preset
    from dmdr_fast.recipes.t2i import bench_trainer

    folder = save_random_pipeline(family, "tiny", tmp_path / "pipe")
    sets = [*COMMON, "dmdr.ratio_update=1", "train.compile=true", "train.compile_backend=aot_eager", *extra]
    trainer = bench_trainer(load_preset(preset, [*sets, f"model.path={folder}"]), num_prompts=4)
    torch._dynamo.reset()
    counters.clear()
    trainer.fit(2, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    trainer.fit(4, progress=False)
    assert counters["stats"]["unique_graphs"] == graphs > 0
    assert not counters["graph_break"], dict(counters["graph_break"])

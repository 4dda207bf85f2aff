"""dmdr-fast plan: every preset prints, counts equal the built models, FSDP shards, bad input."""

from __future__ import annotations

import pytest
import torch

from dmdr_fast.cli import main
from dmdr_fast.configs import load_preset, preset_names
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.plan.architectures import build_meta_parts
from dmdr_fast.plan.command import parse_bytes
from dmdr_fast.plan.memory import per_rank
from dmdr_fast.plan.runs import preset_memory, run_memory


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_prints_per_rank_memory_for_ddp_and_fsdp(preset, capsys):
    assert main(["plan", "--preset", preset, "--gpus", "1,8,64", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "ddpx1" in line)
    assert header.split() == ["ddpx1", "ddpx8", "ddpx64", "fsdpx1", "fsdpx8", "fsdpx64"]
    totals = next(line for line in out.splitlines() if line.startswith("total per GPU")).split()[3:]
    assert len(totals) == 6 and all(float(t) > 0 for t in totals)
    assert float(totals[5]) <= float(totals[3])  # sharding over 64 never costs more than 1


def test_fsdp_divides_the_sharded_parts_by_the_gpu_count():
    run = preset_memory(load_preset("sd35-large-4step"))
    ddp, fsdp = per_rank(run, "ddp", 8), dict(per_rank(run, "fsdp", 8).rows)
    for part in run.parts:
        expected = -(-part.nbytes // 8) if part.sharded else part.nbytes
        assert fsdp[part.name] == expected, part.name
        if part.fsdp_only:  # a LoRA student's own base: under DDP it shares the teacher's
            assert part.name not in dict(ddp.rows) and part.nbytes == run.parts[0].nbytes
        else:
            assert dict(ddp.rows)[part.name] == part.nbytes
    assert any(p.fsdp_only for p in run.parts)  # sd35-large-4step has a LoRA student
    assert fsdp["FSDP gathered blocks (2)"] == 2 * run.block_bytes
    assert dict(ddp.rows)["DDP gradient buckets"] == 4 * run.trainable_params


def test_published_sizes_are_the_known_parameter_counts():
    counts = {
        name: sum(p.numel() for p in build_meta_parts(fam, None, name).denoiser.parameters())
        for fam, name in [("sd3", "sd3-medium"), ("sd3", "sd35-large-4step"), ("flux", "f"), ("zimage", "z"), ("sdxl", "s")]
    }  # fmt: skip
    assert round(counts["sd3-medium"] / 1e9, 2) == 2.03
    assert round(counts["sd35-large-4step"] / 1e9, 2) == 8.06
    assert round(counts["f"] / 1e9, 1) == 11.9
    assert round(counts["z"] / 1e9, 2) == 6.15
    assert round(counts["s"] / 1e9, 2) == 2.57


@pytest.mark.parametrize("student", ["full", "lora"])
def test_counts_equal_the_trainer_networks(student):
    from measured import ARCH, config  # tests/plan is on sys.path (pytest's rootdir-less import)

    from dmdr_fast.train import ClassLabelSampler, Trainer

    cfg = config(4, student=student, ema=0.9)
    tr = Trainer(cfg, DiTAdapter(tiny_dit(**ARCH, seed=0)), data=ClassLabelSampler(10))
    with torch.device("meta"):
        meta = tiny_dit(**ARCH, seed=None)
    run = run_memory(cfg, meta)
    parts = {p.name: p for p in run.parts}
    assert parts["teacher (frozen)"].params == sum(p.numel() for p in tiny_dit(**ARCH).parameters())
    trainable = [
        p for n in (tr.student.network, tr.guidance.network) for p in n.parameters() if p.requires_grad
    ]
    assert run.trainable_params == sum(p.numel() for p in {id(p): p for p in trainable}.values())
    assert parts["EMA (fp32)"].nbytes == sum(v.numel() * v.element_size() for v in tr.ema.values())


def test_a_local_pipeline_folder_is_counted_from_its_configs(tmp_path):
    from dmdr_fast.pipelines.random import save_random_pipeline

    folder = save_random_pipeline("sd3", "tiny", tmp_path / "p")
    pipe_parts = build_meta_parts("sd3", str(folder), "x")
    from diffusers import SD3Transformer2DModel

    real = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"))
    assert sum(p.numel() for p in pipe_parts.denoiser.parameters()) == sum(
        p.numel() for p in real.parameters()
    )
    assert len(pipe_parts.text_encoders) >= 2 and pipe_parts.source == str(folder)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "digits", "--gpus", "0"], "--gpus"),
        (["--preset", "digits", "--gpus", "a,b"], "--gpus"),
        (["--preset", "digits", "--gpu-memory", "lots"], "--gpu-memory"),
        (["--preset", "flux-4step", "--set", "model.path=/nonexistent"], "model.path"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, needle, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_parse_bytes_units():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141 GB") == 141 * 10**9
    assert parse_bytes("24g") == 24 * 2**30


def test_advice_when_it_does_not_fit(capsys):
    assert (
        main(["plan", "--preset", "sdxl-1step", "--gpus", "1", "--gpu-memory", "24GiB", "--parallel", "ddp"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "does not fit" in out and "--set student.kind=lora" in out and "--set model.weights_dtype=fp8" in out
    )


def test_fp8_weights_and_a_prompt_cache_shrink_what_they_should():
    def parts(*overrides):
        return {
            p.name: p.nbytes for p in preset_memory(load_preset("sd35-large-4step", list(overrides))).parts
        }

    base, fp8 = parts(), parts("model.weights_dtype=fp8")
    assert 0.45 < fp8["teacher (frozen)"] / base["teacher (frozen)"] < 0.6  # e4m3 linears + bf16 rest
    assert fp8["student LoRA (fp32)"] == base["student LoRA (fp32)"]
    cached = parts("data.cache=/tmp/cache")
    assert not any(name.startswith("text encoder") for name in cached)
    assert any(name.startswith("text encoder") for name in base)

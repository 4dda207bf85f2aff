"""Text-to-image `sample` / `eval` mistakes (issue 17): one line naming the argument, exit 2, before
any pipeline is loaded; pipeline folders saved without optional parts; grids in the format asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dmdr_fast.cli import main
from dmdr_fast.pipelines.export import EXPORT_INFO_NAME, sample_exported
from dmdr_fast.pipelines.random import save_random_pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {
        "sd3": save_random_pipeline("sd3", "tiny", root / "sd3"),
        "sdxl": save_random_pipeline("sdxl", "tiny", root / "sdxl"),
        "sd3_no_t5": save_random_pipeline("sd3", "tiny", root / "sd3_no_t5", t5=False),
    }


def refused(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    """Run ``dmdr-fast ARGV`` in this process: exit 2 and one stderr line holding ``needles``."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals exit from parse_args
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_pipeline_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a pipeline is loaded: the refusals must come before that (slow) work."""
    import diffusers

    def loaded(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", loaded)


def _sample(pipeline: Path | str, out: Path, *extra: str) -> list[str]:
    return ["sample", "--pipeline", str(pipeline), "--prompt", "a cat", "--out", str(out), *extra]


def test_sample_missing_pipeline_folder(tmp_path, capsys, no_pipeline_load):
    out = tmp_path / "g.png"
    # Before: diffusers' "Repo id must use alphanumeric chars" (a local path taken for a hub id).
    refused(_sample(tmp_path / "nope", out), capsys, f"--pipeline {tmp_path / 'nope'}", "no such folder")
    (tmp_path / "empty").mkdir()
    refused(_sample(tmp_path / "empty", out), capsys, "not a diffusers pipeline folder (no model_index.json")
    assert not out.exists()


def test_sample_missing_lora_folder(pipes, tmp_path, capsys, no_pipeline_load):
    out = tmp_path / "g.png"
    lora = tmp_path / "lora"
    refused(_sample(pipes["sd3"], out, "--lora", str(lora)), capsys, f"--lora {lora}", "no such folder")
    lora.mkdir()
    refused(_sample(pipes["sd3"], out, "--lora", str(lora)), capsys, "no *.safetensors")
    assert not out.exists()


def _lora_export(folder: Path, family: str) -> Path:
    """A LoRA folder as `export_student` writes it (weights file + dmdr_export.json), for ``family``."""
    folder.mkdir()
    save_file(
        {"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(folder / "pytorch_lora_weights.safetensors")
    )
    (folder / EXPORT_INFO_NAME).write_text(json.dumps({"format": 1, "kind": "lora", "family": family}))
    return folder


def test_sample_sd3_lora_on_an_sdxl_pipeline(pipes, tmp_path, capsys, no_pipeline_load):
    """Before: ``AttributeError: ... init_noise_sigma`` from inside diffusers, after loading both."""
    lora = _lora_export(tmp_path / "lora", "sd3")
    out = tmp_path / "g.png"
    err = refused(_sample(pipes["sdxl"], out, "--lora", str(lora)), capsys, "--lora", "sd3", "sdxl pipeline")
    assert str(pipes["sdxl"]) in err
    # eval checks the same, before the teacher's pass.
    argv = ["eval", "--pipeline", str(pipes["sdxl"]), "--lora", str(lora), "--prompt", "a cat"]
    refused([*argv, "--out", str(tmp_path / "e")], capsys, "trained on a sd3 pipeline")
    assert not out.exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--per-prompt", "0"), ("--steps", "0"), ("--height", "0"), ("--nrow", "-1")],
)
def test_sample_counts_below_one(pipes, tmp_path, capsys, flag, value):
    err = refused(_sample(pipes["sd3"], tmp_path / "g.png", flag, value), capsys, f"argument {flag}", ">= 1")
    assert err.startswith("dmdr-fast sample: error:")  # argparse's, before anything runs


def test_zero_steps_is_not_the_default(pipes, tmp_path, capsys):
    """``--steps 0`` used to run the default 4 steps (``steps or 4``): refused everywhere now."""
    argv = ["bench", "sample", "--pipeline", str(pipes["sd3"]), "--steps", "0", "--reps", "1"]
    refused(argv, capsys, "argument --steps: must be >= 1, got 0")
    argv = ["eval", "--pipeline", str(pipes["sd3"]), "--lora", "x", "--teacher-steps", "0", "--prompt", "a"]
    refused(argv, capsys, "argument --teacher-steps: must be >= 1, got 0")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample_exported(object(), {}, ["a cat"], steps=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_device_cuda_without_cuda(pipes, tmp_path, capsys, no_pipeline_load):
    refused(
        _sample(pipes["sd3"], tmp_path / "g.png", "--device", "cuda"),
        capsys,
        "--device cuda",
        "CUDA is not available",
    )


def test_sample_out_suffix_names_the_format(pipes, tmp_path, capsys):
    for suffix, fmt in ((".jpg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")):
        out = tmp_path / f"grid{suffix}"
        assert main(_sample(pipes["sd3"], out, "--steps", "1")) == 0
        assert Image.open(out).format == fmt  # before: PNG bytes whatever the name
    capsys.readouterr()
    refused(_sample(pipes["sd3"], tmp_path / "grid.gif", "--steps", "1"), capsys, "--out", ".png or .jpg")
    assert not (tmp_path / "grid.gif").exists()


def test_a_folder_saved_without_t5_samples_and_trains(pipes, tmp_path):
    """``model_index.json`` lists ``text_encoder_3: [null, null]``: plain ``from_pretrained`` refuses
    it unless the part is passed as None, which sampling, caching prompts and training now do."""
    folder = pipes["sd3_no_t5"]
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    out = tmp_path / "g.png"
    assert main(_sample(folder, out, "--steps", "1")) == 0 and Image.open(out).size[0] > 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    sets = [f"model.path={folder}", f"data.prompts={prompts}", "rewards=[]", "dmdr.cold_start_steps=0",
            "train.max_steps=1", "train.batch_size=2", "student.num_steps=2", "monitor.every=0",
            "monitor.samples_per_condition=2", "student.kind=lora", "model.kwargs.resolution=16",
            "model.kwargs.max_sequence_length=4", "model.weights_dtype=fp32",
            "model.gradient_checkpointing=false", "train.precision=fp32", "train.device=cpu"]  # fmt: skip
    run = tmp_path / "run"
    flags = [x for s in sets for x in ("--set", s)]
    assert main(["train", "--preset", "sd3-medium-4step", *flags, "--out", str(run), "--quiet"]) == 0
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    # ... and the exported LoRA samples on that same folder.
    out = tmp_path / "student.png"
    assert main(_sample(folder, out, "--lora", str(run / "export"))) == 0 and out.is_file()

"""``student.init``: start the student from given weights (a full state dict or a LoRA file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dmdr_fast.config import ConfigError, DMDRTrainerConfig
from dmdr_fast.models import DiTAdapter, tiny_dit
from dmdr_fast.models.lora_io import save_lora
from dmdr_fast.models.weights import load_network_weights, read_state_dict
from dmdr_fast.train import ClassLabelSampler, Trainer

ATTN = ["*attn1.to_q", "*attn1.to_k", "*attn1.to_v", "*attn1.to_out.0"]


def _config(**student) -> DMDRTrainerConfig:
    return DMDRTrainerConfig.from_dict(
        {
            "train": {
                "max_steps": 1,
                "batch_size": 2,
                "device": "cpu",
                "tensorboard": False,
                "sample_every": 0,
            },
            "dmdr": {"dynamic_horizon": 0, "real_scale0": 0.0, "ratio_update": 1},
            "critic": {"lora": {"rank": 4, "targets": ATTN}},
            "student": {"num_steps": 1, **student},
        }
    )


def _trainer(cfg: DMDRTrainerConfig) -> Trainer:
    return Trainer(cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10))


def _other_weights() -> dict[str, torch.Tensor]:
    """A state dict of the same architecture that differs from the teacher's (another seed)."""
    return {k: v.clone() for k, v in tiny_dit(num_layers=1, seed=1).state_dict().items()}


def _write(state: dict[str, torch.Tensor], path: Path, how: str) -> Path:
    if how == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "w.safetensors"))
        return path / "w.safetensors"
    if how == "pt-wrapped":  # a training checkpoint: {"state_dict": ...} with DDP's "module." prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "step": 3}, path / "w.pt")
        return path / "w.pt"
    if how == "sharded-folder":  # a diffusers model folder with an index and two shards
        keys = sorted(state)
        half = len(keys) // 2
        shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
        for name, part in shards.items():
            save_file({k: state[k].contiguous() for k in part}, str(path / name))
        weight_map = {k: name for name, part in shards.items() for k in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        (path / "config.json").write_text("{}")
        return path
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["safetensors", "pt-wrapped", "sharded-folder"])
def test_full_student_starts_from_the_given_weights(tmp_path: Path, how: str):
    state = _other_weights()
    path = _write(state, tmp_path, how)
    tr = _trainer(_config(init=str(path)))
    for name, value in tr.student.network.state_dict().items():
        torch.testing.assert_close(value, state[name].to(value.dtype), rtol=0, atol=0)
    teacher = tiny_dit(num_layers=1, seed=0).state_dict()
    base = {
        n.replace(".base_layer", ""): v
        for n, v in tr.guidance.network.state_dict().items()
        if "lora_" not in n
    }
    assert all(torch.equal(base[k], v) for k, v in teacher.items())  # the teacher is untouched
    assert any(not torch.equal(teacher[k], state[k]) for k in teacher)  # (the two really differ)
    assert tr.fit(progress=False).gen_step == 1  # and it trains from there


def test_lora_student_starts_from_a_saved_lora(tmp_path: Path):
    first = _trainer(_config(kind="lora", lora={"rank": 4, "alpha": 8.0, "targets": ATTN}))
    with torch.no_grad():  # a LoRA that is visibly not the fresh initialisation (B is zero there)
        for p in first.student.network.parameters():
            if p.requires_grad:
                p.normal_()
    save_lora(first.student.network, tmp_path, adapter="student", prefix="transformer")
    saved = {n: p.detach().clone() for n, p in first.student.network.named_parameters() if p.requires_grad}
    cfg = _config(kind="lora", lora={"rank": 4, "alpha": 8.0, "targets": ATTN}, init=str(tmp_path))
    second = _trainer(cfg)
    loaded = {n: p for n, p in second.student.network.named_parameters() if p.requires_grad}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
    with pytest.raises(ValueError, match="rank"):  # a LoRA of another rank does not fit
        _trainer(_config(kind="lora", lora={"rank": 2, "alpha": 8.0, "targets": ATTN}, init=str(tmp_path)))


def test_bad_init_weights_are_refused_with_the_keys_named(tmp_path: Path):
    state = _other_weights()
    with pytest.raises(FileNotFoundError, match="no weights"):
        _trainer(_config(init=str(tmp_path / "missing.safetensors")))
    partial = dict(state)
    dropped = sorted(partial)[0]
    del partial[dropped]
    save_file({k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=f"1 missing keys \\['{dropped}'\\]"):
        _trainer(_config(init=str(tmp_path / "partial.safetensors")))
    wider = {
        k: v.clone() for k, v in tiny_dit(num_layers=1, attention_head_dim=8, seed=1).state_dict().items()
    }
    save_file({k: v.contiguous() for k, v in wider.items()}, str(tmp_path / "wider.safetensors"))
    with pytest.raises(ValueError, match="shapes differ"):
        _trainer(_config(init=str(tmp_path / "wider.safetensors")))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="unsupported weights file"):
        _trainer(_config(init=str(tmp_path / "notes.txt")))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_pipeline_folder_reads_its_component(tmp_path: Path):
    state = _other_weights()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    save_file(
        {f"unet.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "unet" / "x.safetensors")
    )
    net = tiny_dit(num_layers=1, seed=0)
    assert load_network_weights(net, tmp_path, subfolder="unet") == len(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="pipeline folder without a 'transformer' component"):
        read_state_dict(tmp_path, subfolder="transformer")


def test_noise_timestep_is_for_sdxl_only():
    with pytest.raises(ConfigError, match=r"student\.noise_timestep"):
        _config(noise_timestep=399)  # the default family is 'dit'
    with pytest.raises(ConfigError, match="noise_timestep"):
        DMDRTrainerConfig.from_dict({"model": {"family": "sdxl"}, "student": {"noise_timestep": 0}})
    cfg = DMDRTrainerConfig.from_dict({"model": {"family": "sdxl"}, "student": {"noise_timestep": 399}})
    assert cfg.student.noise_timestep == 399


def test_folder_prefers_the_full_precision_file_over_variants(tmp_path):
    full, half = _other_weights(), tiny_dit(num_layers=1, seed=2).state_dict()
    save_file(
        {k: v.contiguous() for k, v in full.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors")
    )
    save_file(
        {k: v.half().contiguous() for k, v in half.items()},
        str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"),
    )
    state = read_state_dict(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in full.items())
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    save_file(
        {k: v.contiguous() for k, v in half.items()},
        str(tmp_path / "diffusion_pytorch_model.bf16.safetensors"),
    )
    with pytest.raises(ValueError, match="cannot tell which weights file"):
        read_state_dict(tmp_path)  # two variants and no standard file: ambiguous


def test_a_resume_does_not_need_the_init_file_any_more(tmp_path):
    path = _write(_other_weights(), tmp_path, "safetensors")
    cfg = _config(init=str(path))
    first = Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10), out_dir=tmp_path / "run"
    )
    first.fit(progress=False)  # writes the final checkpoint
    path.unlink()  # e.g. a multi-GB init checkpoint deleted after the run started
    with pytest.raises(FileNotFoundError):
        _trainer(cfg)
    second = Trainer(
        cfg, DiTAdapter(tiny_dit(num_layers=1, seed=0)), data=ClassLabelSampler(10), out_dir=tmp_path / "run",
        load_init=False,
    )  # fmt: skip
    assert second.resume()
    trained = dict(first.student.network.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in second.student.network.named_parameters())

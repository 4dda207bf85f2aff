"""Loading a file never runs code (README, "Loading files from others"): one test per loader.

Each test hands a loader a crafted file whose full unpickling would create a marker file (and
that is checked once, so the crafted files are known to be live); every loader must refuse it
with a message that names the file, and the marker must not exist afterwards.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dmdr_fast._io import UnsafeFileError, check_no_code, load_torch_file
from dmdr_fast.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def _plant(marker: str) -> str:
    """What the crafted files call when fully unpickled: leave a trace."""
    Path(marker).write_text("code from the file ran\n")
    return marker


class _Payload:
    """Unpickles as ``_plant(marker)``: the classic pickle code-execution gadget."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_plant, (self.marker,))


def _crafted(folder: Path, name: str, *, how: str = "torch.save") -> tuple[Path, Path]:
    """``folder/name``: a dict that looks like our files (checkpoint format, a state dict of
    tensors) plus one object that runs ``_plant``; and the marker it would create."""
    path, marker = folder / name, folder / f"{name}.ran"
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": ckpt.FORMAT,
        "state_dict": {"layers.0.weight": torch.zeros(2, 3)},
        "layers.0.weight": torch.zeros(2, 3),
        "extra": _Payload(marker),
    }
    if how == "torch.save":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle, not written by torch at all
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=int(how.removeprefix("pickle")))
    return path, marker


def _assert_refused(err: BaseException, path: Path, marker: Path) -> None:
    assert str(path) in str(err), f"the message does not name the file: {err}"
    assert not marker.exists(), "code from the file ran"


# ------------------------------------------------------------------------- the helper itself


def test_the_crafted_file_runs_code_when_fully_unpickled(tmp_path):
    # The control: without weights_only the same file does run its code, so the tests below
    # would fail if a loader unpickled it fully.
    path, marker = _crafted(tmp_path, "evil.pt")
    torch.load(path, weights_only=False)
    assert marker.is_file()


@pytest.mark.parametrize("how", ["torch.save", "legacy", "pickle2", "pickle4"])
def test_load_torch_file_refuses_and_says_how_to_convert(tmp_path, how):
    path, marker = _crafted(tmp_path, "evil.pt", how=how)
    with pytest.raises(UnsafeFileError) as err:
        load_torch_file(path, convert="Convert it like so.")
    _assert_refused(err.value, path, marker)
    text = str(err.value)
    assert "weights_only=True" in text and text.endswith("Convert it like so.")
    if how in ("torch.save", "legacy"):  # plain pickles stop earlier, at torch's storage or an opcode
        assert f"the global {_plant.__module__}._plant" in text, "the message should name the object"


def test_load_torch_file_reads_plain_data(tmp_path):
    obj = {"a": torch.arange(3), "b": [1, 2.5, "x", None, (True,)], "rng": torch.get_rng_state()}
    torch.save(obj, tmp_path / "ok.pt")
    back = load_torch_file(tmp_path / "ok.pt")
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"] and torch.equal(back["rng"], obj["rng"])


def test_a_file_that_is_no_torch_file_is_refused_without_naming_an_object(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(UnsafeFileError) as err:
        load_torch_file(path)
    assert str(path) in str(err.value) and "is not a file of tensors" in str(err.value)
    assert "the global" not in str(err.value)


# ------------------------------------------------------------------------- checkpoints


@pytest.fixture
def trainer(tmp_path):
    from tests.train.test_trainer import make_trainer, small_config

    return make_trainer(small_config(), tmp_path / "run")


def test_load_checkpoint_refuses(tmp_path):
    path, marker = _crafted(tmp_path, "step_0000002.pt")
    with pytest.raises(UnsafeFileError) as err:
        ckpt.load_checkpoint(path)
    _assert_refused(err.value, path, marker)
    assert "Checkpoints written by dmdr_fast" in str(err.value)


def test_trainer_resume_refuses_a_given_and_the_latest_checkpoint(trainer, tmp_path):
    path, marker = _crafted(tmp_path, "their.pt")
    with pytest.raises(UnsafeFileError) as err:
        trainer.resume(path)
    _assert_refused(err.value, path, marker)
    # resume() without a path picks the latest checkpoint of out_dir: the same rule applies.
    latest, marker = _crafted(trainer.out_dir / "checkpoints", "step_0000002.pt")
    (trainer.out_dir / "checkpoints" / "latest").write_text(latest.name + "\n")
    with pytest.raises(UnsafeFileError) as err:
        trainer.resume()
    _assert_refused(err.value, latest, marker)
    assert trainer.state.gen_step == 0


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_cli_refuses_a_crafted_checkpoint(tmp_path, capsys, command):
    from dmdr_fast.cli import main

    path, marker = _crafted(tmp_path, "their.pt")
    out = ["--out", str(tmp_path / "s.png")] if command == "sample" else []
    rc = main([command, "--checkpoint", str(path), "--cache-dir", str(tmp_path / "cache"), *out])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused to load" in err
    _assert_refused(Exception(err), path, marker)
    assert not (tmp_path / "cache").exists(), "nothing should have been built for a refused file"


def test_cli_subprocess_refuses_a_crafted_checkpoint(tmp_path):
    path, marker = _crafted(tmp_path, "their.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmdr_fast.cli",
            "sample",
            "--checkpoint",
            str(path),
            "--out",
            str(tmp_path / "s.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_refused(Exception(proc.stderr), path, marker)


# ------------------------------------------------------------------------- digits caches


def test_digits_teacher_cache_is_ignored_not_run(tmp_path):
    from dmdr_fast.recipes.digits.teacher import _try_load

    path, marker = _crafted(tmp_path, "digits_teacher-0123.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _try_load(path, "dmdr_fast.digits_teacher.v1", {}) is None  # retrained, then overwritten
    assert any(str(path) in str(w.message) and "refused" in str(w.message) for w in caught)
    assert not marker.exists()


def test_digits_classifier_file_refuses(tmp_path):
    from dmdr_fast.recipes.digits.classifier import load_classifier

    path, marker = _crafted(tmp_path, "classifier.pt")
    with pytest.raises(UnsafeFileError) as err:
        load_classifier(path)
    _assert_refused(err.value, path, marker)


# ------------------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_student_init_weights_refuse(tmp_path, suffix):
    from dmdr_fast.models.weights import read_state_dict

    path, marker = _crafted(tmp_path, f"student{suffix}")
    with pytest.raises(UnsafeFileError) as err:
        read_state_dict(path)
    _assert_refused(err.value, path, marker)
    assert "safetensors" in str(err.value)


def test_student_init_model_folder_refuses(tmp_path):
    from dmdr_fast.models.weights import read_state_dict

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    path, marker = _crafted(tmp_path / "unet", "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeFileError) as err:
        read_state_dict(tmp_path / "unet")
    _assert_refused(err.value, path, marker)


def test_aesthetic_head_refuses(tmp_path):
    from dmdr_fast.rewards.aesthetic import AestheticMLP

    path, marker = _crafted(tmp_path, "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(UnsafeFileError) as err:
        AestheticMLP.load(path)
    _assert_refused(err.value, path, marker)


def test_hps_checkpoint_refuses(tmp_path):
    from dmdr_fast.rewards.hps import load_open_clip_state_dict

    path, marker = _crafted(tmp_path, "HPS_v2.1_compressed.pt")
    with pytest.raises(UnsafeFileError) as err:
        load_open_clip_state_dict(path)
    _assert_refused(err.value, path, marker)


def test_image_reward_checkpoint_refuses(tmp_path):
    pytest.importorskip("transformers")
    from dmdr_fast.rewards.image_reward import ImageReward

    path, marker = _crafted(tmp_path, "ImageReward.pt")
    with pytest.raises(UnsafeFileError) as err:
        ImageReward.from_checkpoint(path, med_config={}, tokenizer=None)
    _assert_refused(err.value, path, marker)


# ------------------------------------------------------------------------- safetensors files


def _pickle_named(folder: Path, name: str) -> tuple[Path, Path]:
    """A crafted pickle under a safetensors name (what a swapped file would look like)."""
    return _crafted(folder, name)


def _assert_not_safetensors(err: BaseException, path: Path, marker: Path) -> None:
    _assert_refused(err, path, marker)
    assert "not a safetensors file" in str(err)


def test_safetensors_weights_that_are_a_pickle_are_refused(tmp_path):
    from dmdr_fast.models.weights import read_state_dict
    from dmdr_fast.rewards.aesthetic import AestheticMLP

    path, marker = _pickle_named(tmp_path, "model.safetensors")
    for load in (read_state_dict, AestheticMLP.load):
        with pytest.raises(ValueError) as err:
            load(path)
        _assert_not_safetensors(err.value, path, marker)


def test_exported_lora_that_is_a_pickle_is_refused(tmp_path):
    from dmdr_fast.models import tiny_dit
    from dmdr_fast.models.lora_io import LORA_WEIGHTS_NAME, load_lora

    path, marker = _pickle_named(tmp_path / "lora", LORA_WEIGHTS_NAME)
    with pytest.raises(ValueError) as err:
        load_lora(tiny_dit(num_layers=1, seed=0), tmp_path / "lora")
    _assert_not_safetensors(err.value, path, marker)


def test_ode_pair_shard_that_is_a_pickle_is_refused(tmp_path):
    from dmdr_fast.models import DiTAdapter, tiny_dit
    from dmdr_fast.train.ode_init import ODEPairs, generate_ode_pairs

    teacher = DiTAdapter(tiny_dit(num_layers=1, seed=0))
    out = tmp_path / "pairs"
    generate_ode_pairs(teacher, torch.tensor([1, 2]), out, steps=2, guidance=1.0, batch_size=2, shard_size=2)
    shard = out / json.loads((out / "ode_pairs.json").read_text())["shards"][0]["file"]
    shard.unlink()
    path, marker = _pickle_named(out, shard.name)
    pairs = ODEPairs.open(out, teacher)
    with pytest.raises(ValueError) as err:
        pairs.batch(torch.tensor([0]), teacher)
    _assert_not_safetensors(err.value, path, marker)


# ------------------------------------------------------------------------- prompt caches


def _fake_cache(folder: Path, module: str, qualname: str, *, shard: str = "shard_00000.safetensors") -> Path:
    """The JSON side of a one-prompt cache (``data/prompt_cache.py``'s layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "dmdr_fast.prompt_cache",
        "version": 1,
        "fingerprint": {},
        "condition_class": {"module": module, "qualname": qualname},
        "fields": {"prompt_embeds": {"shape": [2], "dtype": "float32"}},
        "shards": [{"file": shard, "count": 1}],
        "count": 1,
    }
    (folder / "cache.json").write_text(json.dumps(meta))
    (folder / "prompts.jsonl").write_text(json.dumps("a cat") + "\n")
    return folder


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module whose import leaves a marker; its name, and the marker."""
    name, marker = "dmdr_safe_load_gadget", tmp_path / "module.ran"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\nclass Cond:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield name, marker
    sys.modules.pop(name, None)


def test_prompt_cache_does_not_import_a_module_its_json_names(tmp_path, evil_module):
    from dmdr_fast.data.prompt_cache import PromptCache

    name, marker = evil_module
    folder = _fake_cache(tmp_path / "cache", name, "Cond")
    with pytest.raises(ValueError) as err:
        PromptCache.open(folder)
    _assert_refused(err.value, folder, marker)
    assert name not in sys.modules


def test_prompt_cache_takes_only_a_condition_dataclass(tmp_path):
    from dmdr_fast.data.prompt_cache import PromptCache

    folder = _fake_cache(tmp_path / "cache", "dmdr_fast._io", "atomic_write_text")
    with pytest.raises(ValueError, match="not a condition dataclass"):
        PromptCache.open(folder)


def test_prompt_cache_shards_that_are_a_pickle_are_refused(tmp_path):
    from dmdr_fast.data.prompt_cache import PromptCache

    folder = _fake_cache(tmp_path / "cache", "dmdr_fast.models.sd3", "SD3Condition")
    path, marker = _pickle_named(folder, "shard_00000.safetensors")
    cache = PromptCache.open(folder)
    with pytest.raises(ValueError) as err:
        cache.condition([0])
    _assert_not_safetensors(err.value, path, marker)
    null, marker = _pickle_named(folder, "null.safetensors")
    with pytest.raises(ValueError) as err:
        cache.null_condition()
    _assert_not_safetensors(err.value, null, marker)


def test_ode_pairs_with_a_crafted_prompt_cache_are_refused(tmp_path, evil_module):
    from dmdr_fast.train.ode_init import ODEPairs

    name, marker = evil_module
    out = tmp_path / "pairs"
    _fake_cache(out / "cache", name, "Cond")
    (out / "ode_pairs.json").write_text(
        json.dumps({"format": 1, "count": 0, "shards": [], "sample_shape": [1]})
    )
    with pytest.raises(ValueError) as err:
        ODEPairs.open(out)
    _assert_refused(err.value, out / "cache", marker)


# ------------------------------------------------------------------------- pipeline folders


def _folder_with_code(tmp_path: Path) -> tuple[Path, Path]:
    """A pipeline folder whose model_index.json points diffusers at the folder's own module."""
    folder, marker = tmp_path / "pipe", tmp_path / "pipe.ran"
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["my_transformer", "MyTransformer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    (folder / "transformer" / "my_transformer.py").write_text(code)
    return folder, marker


def test_pipeline_folder_with_python_files_is_refused(tmp_path):
    from dmdr_fast.models.sd3 import SD3Adapter
    from dmdr_fast.pipelines.export import load_exported

    folder, marker = _folder_with_code(tmp_path)
    for load in (check_no_code, SD3Adapter.from_pretrained, load_exported):
        with pytest.raises(UnsafeFileError) as err:
            load(folder)
        _assert_refused(err.value, folder, marker)
        assert "transformer/my_transformer.py" in str(err.value)


def test_lora_folder_with_python_files_is_refused(tmp_path):
    from dmdr_fast.pipelines.export import load_exported

    folder, marker = _folder_with_code(tmp_path)
    with pytest.raises(UnsafeFileError) as err:
        load_exported(tmp_path, lora=folder, pipe=object())
    _assert_refused(err.value, folder, marker)


class _StubPipe:
    scheduler = None

    def load_lora_weights(self, path: str) -> None:
        pass

    def to(self, device):
        return self


def test_export_info_names_only_a_diffusers_scheduler(tmp_path):
    from dmdr_fast.pipelines.export import EXPORT_INFO_NAME, load_exported

    lora = tmp_path / "lora"
    (lora / "scheduler").mkdir(parents=True)
    (lora / EXPORT_INFO_NAME).write_text(json.dumps({"scheduler_class": "DiffusionPipeline"}))
    with pytest.raises(ValueError, match="not a diffusers scheduler class"):
        load_exported(tmp_path, lora=lora, pipe=_StubPipe())


# ------------------------------------------------------------------------- YAML configs


def test_yaml_python_tags_are_refused(tmp_path):
    from dmdr_fast.config import ConfigError, DMDRTrainerConfig

    marker = tmp_path / "yaml.ran"
    path = tmp_path / "their.yaml"
    path.write_text(f"train: !!python/object/apply:tests.test_safe_load._plant [{str(marker)!r}]\n")
    with pytest.raises(ConfigError) as err:
        DMDRTrainerConfig.load_yaml(path)
    _assert_refused(err.value, path, marker)


# ------------------------------------------------------------------------- old checkpoints


def _old_format_checkpoint(trainer, path: Path) -> dict:
    """A checkpoint as every version of the Trainer so far has written it (the payload of
    ``Trainer.state_dict`` at 9ceabf9, spelled out here so that it stays the old format even if
    ``state_dict`` changes), with every optional part filled: EMA, evaluation history, monitor."""
    critic_owner = trainer.critic if trainer.critic is not None else trainer.guidance
    row = {"step": 2, "fd": 0.125, "accuracy": 0.5}  # evaluate() stores Python floats
    payload = {
        "format": "dmdr_fast.checkpoint.v1",
        "config": trainer.config.to_dict(),
        "state": {
            "step": trainer.state.step,
            "gen_step": trainer.state.gen_step,
            "history": [row],
            "ode_init_done": False,
        },
        "student": ckpt.trainable_state(trainer.student.network),
        "critic": ckpt.trainable_state(critic_owner.network),
        "opt_g": trainer.opt_g.state_dict(),
        "opt_c": trainer.opt_c.state_dict(),
        "ema": trainer.ema,
        "rng": {"gen": trainer.gen.get_state(), "torch": torch.get_rng_state()},
        "critic_losses": [0.25, 0.5],
        "monitor": {
            "history": [{"step": 2.0, "diversity": 0.3, "flag": 0.0}],
            "warnings": ["w"],
            "streak": 1,
        },
        "cosines": [0.1],
    }
    torch.save(payload, path)  # the old writer: _io.atomic_save, i.e. a plain torch.save
    return payload


def test_a_checkpoint_in_the_old_format_still_resumes(tmp_path):
    from tests.train.test_trainer import make_trainer, small_config

    cfg = small_config().with_overrides(["student.ema_decay=0.9"])
    trained = make_trainer(cfg)
    trained.fit(max_steps=2, progress=False)
    payload = _old_format_checkpoint(trained, tmp_path / "old.pt")
    resumed = make_trainer(cfg)
    assert resumed.resume(tmp_path / "old.pt")
    assert resumed.state.gen_step == 2 and resumed.state.history == payload["state"]["history"]
    again = resumed.state_dict()  # what was read back, through the public interface
    assert again["critic_losses"] == [0.25, 0.5] and again["cosines"] == [0.1]
    for (name, a), b in zip(trained.student.network.named_parameters(), resumed.student.network.parameters()):
        assert torch.equal(a, b), name
    assert resumed.ema is not None and all(torch.equal(v, trained.ema[k]) for k, v in resumed.ema.items())
    assert torch.equal(resumed.gen.get_state(), trained.gen.get_state())
    assert resumed.opt_g.state_dict()["param_groups"] == trained.opt_g.state_dict()["param_groups"]


def test_checkpoints_written_now_load_safely(tmp_path):
    from tests.train.test_trainer import make_trainer, small_config

    trainer = make_trainer(small_config(), tmp_path)
    trainer.fit(max_steps=2, progress=False)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None
    sd = ckpt.load_checkpoint(latest)
    assert sd["state"]["gen_step"] == 2 and isinstance(sd["rng"]["gen"], torch.Tensor)

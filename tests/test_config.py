"""Tests of the training configuration (dmdr_fast.config): the schema and its engine."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from typing import Literal

import pytest

from dmdr_fast.config import (
    ConfigError,
    CriticConfig,
    DMDRConfig,
    DMDRTrainerConfig,
    LoraSpec,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    StudentConfig,
    TrainConfig,
    apply_overrides,
    describe,
    from_dict,
    load_yaml,
    parse_override,
    read_yaml,
    replace_path,
    save_yaml,
    to_dict,
)

ROOT = DMDRTrainerConfig


def _custom_config() -> DMDRTrainerConfig:
    """A config that differs from the defaults in every kind of field."""
    return DMDRTrainerConfig(
        name="digits-4step",
        model=ModelConfig(kwargs={"num_layers": 2, "sizes": [8, 16], "nested": {"a": None}}, path="/tmp/t"),
        student=StudentConfig(kind="lora", num_steps=4, shift=3.0, lora=LoraSpec(targets=("a.*", "re:b"))),
        critic=CriticConfig(kind="full", fake_scale=1.5),
        dmdr=DMDRConfig(guidance=4.0, guidance_jitter=0.5, cold_start_steps=50, decoupled=True),
        optim=OptimConfig(lr_generator_stage2=1e-5, betas=(0.0, 0.99)),
        rewards=(RewardConfig(weight=0.1, name="cls"), RewardConfig(kind="none", weight=0.0)),
        train=TrainConfig(max_steps=100, precision="bf16", device="cuda:1", kernel_backend="torch"),
    )


def _all_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append((path, f))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _all_fields(type(default), path + ".")
        elif f.name == "rewards":
            out += _all_fields(RewardConfig, path + ".N.")
    return out


# --------------------------------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [DMDRTrainerConfig, _custom_config], ids=["default", "custom"])
def test_yaml_round_trip_is_exact(tmp_path, make):
    cfg = make()
    path = save_yaml(cfg, tmp_path / "run" / "config.yaml", header="written by a test")
    assert path.read_text().startswith("# written by a test\n")
    back = load_yaml(ROOT, path)
    assert back == cfg
    assert from_dict(ROOT, to_dict(cfg)) == cfg
    assert ROOT.load_yaml(path).to_dict() == cfg.to_dict()


def test_to_dict_is_plain_data():
    data = to_dict(_custom_config())
    assert data["student"]["lora"]["targets"] == ["a.*", "re:b"]
    assert data["optim"]["betas"] == [0.0, 0.99]
    assert data["rewards"][0]["name"] == "cls"
    assert list(data) == [
        "name",
        "model",
        "data",
        "student",
        "critic",
        "dmdr",
        "optim",
        "rewards",
        "rl",
        "monitor",
        "train",
    ]


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "config.yaml"
    save_yaml(DMDRTrainerConfig(), path)
    save_yaml(_custom_config(), path)
    assert load_yaml(ROOT, path) == _custom_config()
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_yaml_scientific_floats_and_partial_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "optim:\n  lr_generator: 2e-5\n  lr_critic: 1E-4\ndmdr:\n  eps: 1e-8\ntrain:\n  max_steps: 1e3\n"
    )
    cfg = load_yaml(ROOT, path)
    assert cfg.optim.lr_generator == 2e-5 and cfg.optim.lr_critic == 1e-4 and cfg.dmdr.eps == 1e-8
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.student == StudentConfig()  # untouched sections keep their defaults
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(ROOT, tmp_path / "empty.yaml") == DMDRTrainerConfig()


def test_load_yaml_applies_overrides_before_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n")
    cfg = load_yaml(ROOT, path, overrides=["dmdr.cold_start_steps=20", "train.max_steps=30"])
    assert (cfg.dmdr.cold_start_steps, cfg.train.max_steps) == (20, 30)


def test_config_pickles_and_copies():
    cfg = _custom_config()
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert dataclasses.replace(cfg, name="x").student == cfg.student


# --------------------------------------------------------------------------------------------------
# Overrides and replace_path.
# --------------------------------------------------------------------------------------------------


def test_overrides_of_scalars_tuples_optional_and_literals():
    cfg = DMDRTrainerConfig().with_overrides(
        [
            "student.num_steps=4",
            "student.shift=3",  # int accepted for a float field
            "optim.lr_generator=1e-5",
            "train.deterministic=true",
            "train.precision=bf16",
            "student.backward_sim=final",
            "student.lora.targets=[to_q, 'to_out.0']",
            "optim.betas=[0.5, 0.9]",
            "optim.lr_critic_stage2=5e-6",
            "model.path=/data/teacher",
            "model.kwargs.num_layers=4",
            "name=007",  # YAML reads an int; a str field keeps the text
        ]
    )
    assert cfg.student.num_steps == 4 and cfg.student.shift == 3.0 and isinstance(cfg.student.shift, float)
    assert cfg.optim.lr_generator == 1e-5
    assert cfg.train.deterministic is True and cfg.train.precision == "bf16"
    assert cfg.student.backward_sim == "final"
    assert cfg.student.lora.targets == ("to_q", "to_out.0")
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.optim.lr_critic_stage2 == 5e-6
    assert cfg.model.path == "/data/teacher" and cfg.model.kwargs == {"num_layers": 4}
    assert cfg.name == "007"
    # Optional back to null; untouched fields unchanged.
    back = cfg.with_overrides(["optim.lr_critic_stage2=null", "model.path="])
    assert back.optim.lr_critic_stage2 is None and back.model.path is None
    assert back.student == cfg.student


def test_override_appends_and_edits_list_items():
    cfg = apply_overrides(
        DMDRTrainerConfig(),
        ["rewards.0.kind=classifier", "rewards.0.weight=0.2", "rewards.1={kind: none, weight: 0}"],
    )
    assert cfg.rewards == (RewardConfig(weight=0.2), RewardConfig(kind="none", weight=0.0))
    assert cfg.active_rewards == (RewardConfig(weight=0.2),)
    cfg = apply_overrides(cfg, ["optim.betas.1=0.95", "student={num_steps: 2}"])
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.student == StudentConfig(num_steps=2)  # a mapping replaces the section


def test_overrides_on_plain_data():
    data = {"train": {"max_steps": 5}}
    out = apply_overrides(data, ["student.num_steps=2", "train.max_steps=7"], cls=ROOT)
    assert out == {"train": {"max_steps": 7}, "student": {"num_steps": 2}}
    assert data == {"train": {"max_steps": 5}}  # not mutated
    assert apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(
        ConfigError, match=r"^a\.bb: unknown key 'a\.bb' \(did you mean 'b'\?\); keys at a: b"
    ):
        apply_overrides({"a": {"b": 1}}, ["a.bb=1"])


def test_replace_path_revalidates():
    cfg = replace_path(DMDRTrainerConfig(), "student.lora", LoraSpec(rank=8))
    assert cfg.student.lora.rank == 8
    assert cfg.replace_path("optim.lr_generator", 3e-5).optim.lr_generator == 3e-5
    with pytest.raises(
        ConfigError, match=r"^dmdr\.cold_start_steps: stage 1 \(10 steps\) must fit in train\.max_steps \(9\)"
    ):
        replace_path(replace_path(cfg, "dmdr.cold_start_steps", 10), "train.max_steps", 9)


def test_parse_override():
    assert parse_override("a.b=c=d") == ("a.b", "c=d")
    for bad in ("novalue", "=3", "a..b=1", ".a=1"):
        with pytest.raises(ConfigError, match=r"not of the form key\.path=value"):
            parse_override(bad)


# --------------------------------------------------------------------------------------------------
# Errors name the dotted field.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("student.num_step=4", r"^student\.num_step: unknown config key .*did you mean 'student\.num_steps'"),
        ("num_steps=4", r"^num_steps: unknown config key .*'student\.num_steps'"),
        ("studnet.kind=lora", r"^studnet\.kind: unknown config key .*'student\.kind'"),
        ("student.num_steps.x=1", r"^student\.num_steps\.x: student\.num_steps is a int and has no sub-key"),
        ("student.num_steps=four", r"^student\.num_steps: expected int, got str 'four'"),
        ("student.num_steps=2.5", r"^student\.num_steps: expected int, got float 2\.5"),
        ("train.deterministic=1", r"^train\.deterministic: expected bool, got int 1"),
        ("optim.lr_generator=fast", r"^optim\.lr_generator: expected float, got str 'fast'"),
        ("optim.lr_generator=.inf", r"^optim\.lr_generator: expected a finite float"),
        ("train.precision=fp16", r"^train\.precision: expected one of 'fp32', 'bf16', got str 'fp16'"),
        ("student.lora.targets=to_q", r"^student\.lora\.targets: expected tuple\[str, \.\.\.\], got str"),
        ("student.lora.targets=[1, a]", r"^student\.lora\.targets\.0: expected str, got int 1"),
        ("optim.betas=[0.9]", r"^optim\.betas: expected tuple\[float, float\] \(2 items\)"),
        ("model.kwargs={1: a}", r"^model\.kwargs: mapping keys must be strings"),
        ("rewards.2.weight=1", r"^rewards\.2\.weight: index '2' is out of range"),
        ("rewards.x=1", r"^rewards\.x: rewards is a list; address an item by index"),
        ("student=3", r"^student: expected StudentConfig, got int 3"),
        ("student.num_steps=9", r"^student\.num_steps: must be >= 1 and <= 8, got 9"),
        ("student.shift=0", r"^student\.shift: must be > 0, got 0\.0"),
        ("student.ema_decay=1", r"^student\.ema_decay: must be >= 0 and < 1, got 1\.0"),
        ("dmdr.ratio_update=0", r"^dmdr\.ratio_update: must be >= 1"),
        ("optim.betas=[0.9, 1.0]", r"^optim\.betas: must be two values in \[0, 1\)"),
        ("optim.lr_generator_stage2=0", r"^optim\.lr_generator_stage2: must be > 0 or null"),
        ("train.device=gpu", r"^train\.device: must be 'auto', 'cpu', 'cuda'"),
        ("student.lora.alpha=-1", r"^student\.lora\.alpha: must be > 0 or null"),
        ("model.pixel_range=[1, 0]", r"^model\.pixel_range: must be \[low, high\] with low < high"),
        ("rewards.0.kind=none", r"^rewards\.0\.weight: a reward of kind 'none' must have weight 0"),
    ],
)
def test_override_errors_name_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        DMDRTrainerConfig().with_overrides([override])
    assert isinstance(info.value, ValueError)
    assert info.value.field.split(".")[0] == override.split("=", 1)[0].split(".")[0]


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["dmdr.cold_start_steps=30", "train.max_steps=20"],
            r"^dmdr\.cold_start_steps: stage 1 \(30 steps\)",
        ),
        (["dmdr.dmd_weight=0"], r"^dmdr\.dmd_weight: is 0 and no reward is active"),
        (
            ["dmdr.dmd_weight=0", "rewards.0.kind=classifier", "dmdr.cold_start_steps=5"],
            r"^dmdr\.dmd_weight: is 0 but dmdr\.cold_start_steps = 5",
        ),
        (["dmdr.real_scale0=3"], r"^dmdr\.real_scale0: \(3\.0\) must not exceed critic\.fake_scale"),
        (
            ["dmdr.decoupled=true", "dmdr.dmd_weight=0", "rewards.0.weight=1"],
            r"^dmdr\.decoupled: needs dmdr\.dmd_weight > 0",
        ),
        (["rewards.0.name=a", "rewards.1.name=a"], r"^rewards: reward names must be unique"),
    ],
)
def test_cross_field_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DMDRTrainerConfig().with_overrides(overrides)


def test_cross_field_valid_combinations():
    # Reward-only baseline; stage 1 equal to the whole run; a full critic ignores the LoRA scales.
    ROOT().with_overrides(["dmdr.dmd_weight=0", "rewards.0.kind=classifier"])
    ROOT().with_overrides(["dmdr.cold_start_steps=10", "train.max_steps=10"])
    ROOT().with_overrides(["critic.kind=full", "dmdr.real_scale0=3"])


def test_from_dict_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^studnt: unknown key 'studnt' \(did you mean 'student'\?\); valid"
    ):
        from_dict(ROOT, {"studnt": {}})
    with pytest.raises(
        ConfigError, match=r"^student\.lora\.rnk: unknown key .*valid keys of student\.lora: rank"
    ):
        from_dict(ROOT, {"student": {"lora": {"rnk": 3}}})
    with pytest.raises(ConfigError, match=r"^student\.lora\.rank: must be >= 1, got 0"):
        from_dict(ROOT, {"student": {"lora": {"rank": 0}}})
    with pytest.raises(ConfigError, match=r"^model\.kwargs\.f: must be plain data"):
        from_dict(ROOT, {"model": {"kwargs": {"f": object()}}})
    with pytest.raises(ConfigError, match=r"^expected a mapping of DMDRTrainerConfig fields, got list"):
        from_dict(ROOT, [1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {num_steps: 0}\n")
    with pytest.raises(ConfigError, match=r"^student\.num_steps: must be >= 1 .*\(config file .*bad\.yaml\)"):
        load_yaml(ROOT, bad)
    bad.write_text("student: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        read_yaml(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_yaml(tmp_path / "missing.yaml")


def test_direct_construction_validates_and_normalises():
    with pytest.raises(ConfigError, match=r"^StudentConfig\.num_steps: expected int, got str '4'"):
        StudentConfig(num_steps="4")
    with pytest.raises(ConfigError, match=r"^StudentConfig\.num_steps: expected int, got bool True"):
        StudentConfig(num_steps=True)
    with pytest.raises(ConfigError, match=r"^DMDRTrainerConfig\.student\.num_steps: must be >= 1"):
        DMDRTrainerConfig(student={"num_steps": 0})
    spec = LoraSpec(targets=["a", "b"], alpha=8)
    assert spec.targets == ("a", "b") and spec.alpha == 8.0 and isinstance(spec.alpha, float)
    assert DMDRTrainerConfig(student={"num_steps": 2}).student == StudentConfig(num_steps=2)
    kwargs = {"x": (1, 2)}
    model = ModelConfig(kwargs=kwargs)
    assert model.kwargs == {"x": [1, 2]} and model.kwargs is not kwargs  # copied, YAML-shaped


@dataclass(frozen=True)
class Inner:
    """A plain dataclass (no ConfigBase) with its own validation."""

    mode: Literal["a", "b"] = "a"
    size: int | None = None

    def __post_init__(self):
        if self.size is not None and self.size < 0:
            raise ValueError("size must be >= 0")


@dataclass(frozen=True)
class Outer:
    """Nests Inner directly, in a tuple, and beside fixed tuples and unions."""

    inner: Inner = dataclasses.field(default_factory=Inner)
    items: tuple[Inner, ...] = ()
    pair: tuple[int, str] = (1, "x")
    either: int | str = 0


def test_generic_engine_on_plain_dataclasses():
    out = from_dict(Outer, {"inner": {"size": 3}, "items": [{"mode": "b"}], "pair": [2, "y"], "either": "s"})
    assert out == Outer(Inner(size=3), (Inner(mode="b"),), (2, "y"), "s")
    assert from_dict(Outer, to_dict(out)) == out
    with pytest.raises(ConfigError, match=r"^items\.0: size must be >= 0"):
        from_dict(Outer, {"items": [{"size": -1}]})
    with pytest.raises(ConfigError, match=r"^either: expected int \| str, got float 1\.5"):
        from_dict(Outer, {"either": 1.5})
    with pytest.raises(ConfigError, match=r"^inner\.mode: expected one of 'a', 'b', got str 'c'"):
        apply_overrides(out, ["inner.mode=c"])


# --------------------------------------------------------------------------------------------------
# Frozen, help, describe.
# --------------------------------------------------------------------------------------------------


def test_configs_are_frozen():
    cfg = DMDRTrainerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.student.num_steps = 4


def test_every_field_has_help_and_describe_lists_it():
    text = describe(ROOT)
    assert text == ROOT.describe()
    fields = _all_fields(ROOT)
    assert len(fields) > 60
    for path, f in fields:
        help_text = f.metadata.get("help", "")
        assert help_text.strip(), f"{path} has no help text"
        assert f"\n{path}: " in text, f"describe() does not list {path}"
    assert "\nstudent.lora.rank: int = 64\n" in text  # nested defaults come from the parent's default
    assert "\ncritic.lora.rank: int = 32\n" in text
    assert "\noptim.betas: tuple[float, float] = [0.9, 0.999]\n" in text
    assert "\ntrain.precision: 'fp32' | 'bf16' = \"fp32\"\n" in text


# --------------------------------------------------------------------------------------------------
# Defaults and helpers.
# --------------------------------------------------------------------------------------------------


def test_paper_defaults():
    cfg = DMDRTrainerConfig()
    assert (cfg.student.kind, cfg.student.num_steps, cfg.student.shift, cfg.student.ema_decay) == (
        "full",
        1,
        1.0,
        0,
    )
    assert (cfg.critic.kind, cfg.critic.lora.rank, cfg.critic.fake_scale) == ("lora", 32, 2.0)
    d = cfg.dmdr
    assert (d.guidance, d.real_scale0, d.dynamic_horizon, d.dynars_a, d.dynars_b) == (
        1.0,
        0.75,
        10_000,
        4.0,
        1.5,
    )
    assert (d.ratio_update, d.dmd_weight, d.eps, d.renoise, d.decoupled) == (5, 1.0, 1e-8, "beta", False)
    o = cfg.optim
    assert (o.lr_generator, o.betas, o.adam_eps, o.grad_clip) == (2e-5, (0.9, 0.999), 1e-8, 1.0)
    assert (o.weight_decay_generator, o.weight_decay_critic) == (0.01, 0.0)
    assert o.lr_critic == pytest.approx(10 * o.lr_generator)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.rewards) == (20_000, 30, ())


def test_helpers():
    cfg = _custom_config()
    assert cfg.optim.learning_rates(stage2=False) == (2e-5, 2e-4)
    assert cfg.optim.learning_rates(stage2=True) == (1e-5, 2e-4)
    assert (cfg.stage(49), cfg.stage(50)) == (1, 2)
    assert [r.name for r in cfg.active_rewards] == ["cls"]
    assert cfg.dmdr.cfg_enabled and not DMDRConfig().cfg_enabled

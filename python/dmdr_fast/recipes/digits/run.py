"""The digits recipe: DMDR end to end on scikit-learn's 8×8 handwritten digits, on a CPU.

``dmdr-fast train --preset digits --out DIR`` runs :func:`run_digits`:

1. train (or reuse from the cache) a class-conditional flow-matching DiT teacher on the digits,
   and two classifiers on disjoint splits — the *reward* classifier and a separate *evaluation*
   network whose features define Fréchet distance, precision and recall;
2. DMDR: stage 1 (DMD only) then stage 2 (DMD + ReFL classifier reward) to a 1-step student;
3. evaluate the teacher (50-step Euler) and the student on the same metrics and write
   ``report.md``, ``metrics.json``, PNG grids (teacher vs student, per class) and a metrics plot.

The experiment comparing DMD-only, DMDR and reward-only students is in
:mod:`dmdr_fast.recipes.digits.experiment`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dmdr_fast.algo import euler_sample, uses_cfg
from dmdr_fast.config import DMDRTrainerConfig, RewardConfig
from dmdr_fast.eval.metrics import RealReference, compute_features, evaluate_features
from dmdr_fast.train import checkpoint as ckpt
from dmdr_fast.train import interrupt, run_dir
from dmdr_fast.train.monitor import RewardHackingMonitor
from dmdr_fast.train.trainer import ClassLabelSampler, Trainer

if TYPE_CHECKING:
    from dmdr_fast.recipes.digits.classifier import DigitClassifier

__all__ = [
    "DigitsAssets",
    "bench_trainer",
    "default_cache_dir",
    "evaluate_images",
    "make_evaluator",
    "make_monitor",
    "make_reward",
    "prepare_assets",
    "run_digits",
    "sampling_sides",
    "train_student",
]

NUM_CLASSES = 10


def default_cache_dir() -> Path:
    """``$DMDR_FAST_CACHE`` or ``~/.cache/dmdr_fast``: where teachers and classifiers are kept."""
    return Path(os.environ.get("DMDR_FAST_CACHE", Path.home() / ".cache" / "dmdr_fast"))


@dataclass
class DigitsAssets:
    """Everything a digits run needs besides its own config (shared by the experiment's runs)."""

    teacher_state: dict[str, torch.Tensor]
    teacher_config: dict[str, Any]
    reward_classifier: torch.nn.Module
    eval_network: DigitClassifier
    images: torch.Tensor  # (N, 1, 8, 8) in [0, 1]
    labels: torch.Tensor  # (N,)
    reference: RealReference  # eval-network statistics of the real digits
    info: dict[str, Any] = field(default_factory=dict)

    def fresh_teacher(self):
        """A new teacher adapter with the trained weights (the Trainer modifies its teacher)."""
        from dmdr_fast.models import DiTAdapter, dit_from_config

        net = dit_from_config(self.teacher_config["model"], seed=0)
        net.load_state_dict(self.teacher_state)
        return DiTAdapter(net).eval()


def prepare_assets(
    cache_dir: str | os.PathLike[str] | None,
    teacher_config: dict[str, Any] | None = None,
    classifier_config: dict[str, Any] | None = None,
    *,
    progress: bool = True,
) -> DigitsAssets:
    """Train or load the teacher and the two classifiers, and the real-data reference statistics."""
    from dmdr_fast.recipes.digits.data import load_digits_tensors, to_unit_range
    from dmdr_fast.recipes.digits.teacher import get_or_train_digits_classifiers, get_or_train_digits_teacher

    teacher, t_info = get_or_train_digits_teacher(cache_dir, teacher_config, progress=progress)
    reward_clf, eval_net, c_info = get_or_train_digits_classifiers(
        cache_dir, classifier_config, progress=progress
    )
    images, labels = load_digits_tensors()
    images = to_unit_range(images)
    feats = compute_features(images, eval_net.features)
    reference = RealReference.from_features(feats, labels)
    halves = c_info["splits"].reference_halves(labels)
    floor = evaluate_features(
        feats[halves[0]], labels[halves[0]], RealReference.from_features(feats[halves[1]], labels[halves[1]])
    )
    return DigitsAssets(
        teacher_state={k: v.detach().clone() for k, v in teacher.transformer.state_dict().items()},
        teacher_config=t_info["config"],
        reward_classifier=reward_clf.eval(),
        eval_network=eval_net.eval(),
        images=images,
        labels=labels,
        reference=reference,
        info={
            "teacher": {k: v for k, v in t_info.items() if k in ("config_hash", "cache_path", "cache_hit")},
            "classifiers": {"metrics": c_info["metrics"], "cache_hit": c_info["cache_hit"]},
            "real_vs_real_fd": floor["fd"],
            "real_vs_real": floor,
        },
    )


def make_reward(assets: DigitsAssets, configs: Sequence[RewardConfig]):
    """The CompositeReward for the config's rewards, or None.

    ``classifier`` entries wrap the digits reward classifier (``kwargs.mode``: ``ce`` — the ReFL
    default —, ``logprob``, ``prob`` or ``correct``, the 0/1 verdict for ``rl.algorithm``); every
    other kind (``ink``, ``jpeg``, ``callable``, ...) is built from its entry by the registry. Each
    entry's loss definition becomes the reward's ``RewardSpec`` (``RewardSpec.from_config``); its
    combination policy stays in the config, where the Trainer reads it.
    """
    from dmdr_fast.rewards import ClassifierReward, CompositeReward, RewardSpec, reward_from_config

    active = [r for r in configs if r.active]
    if not active:
        return None
    rewards = []
    for r in active:
        if r.kind != "classifier":
            rewards.append(reward_from_config(r))
            continue
        rewards.append(
            ClassifierReward(
                copy.deepcopy(assets.reward_classifier),
                spec=RewardSpec.from_config(r),
                num_classes=NUM_CLASSES,
                in_channels=1,
                **dict(r.kwargs),
            )
        )
    return CompositeReward(rewards)


def make_monitor(assets: DigitsAssets, config: DMDRTrainerConfig) -> RewardHackingMonitor | None:
    """The reward-hacking monitor of a digits run (None when ``monitor.every`` is 0).

    Held-out conditions: every class twice. Held-out judge: the *evaluation* network's
    log-probability of the label (trained on a split disjoint from the reward classifier's, never
    used in training). Diversity: mean pairwise distance of evaluation-network features among the
    samples of one condition.
    """
    from dmdr_fast.rewards import ClassifierReward, RewardSpec

    if not config.monitor.every:
        return None
    heldout = ClassifierReward(
        copy.deepcopy(assets.eval_network), spec=RewardSpec("heldout"), num_classes=NUM_CLASSES, in_channels=1
    )
    features = assets.eval_network.features
    return RewardHackingMonitor(
        torch.arange(NUM_CLASSES).repeat(2), heldout=heldout, features=lambda x: features(x.cpu())
    )


def balanced_labels(num: int) -> torch.Tensor:
    """``num`` labels cycling over the classes (the same for every evaluation)."""
    return torch.arange(num) % NUM_CLASSES


@torch.no_grad()
def evaluate_images(assets: DigitsAssets, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of generated images in [0, 1]: FD/precision/recall/accuracy/diversity on the
    evaluation network, the training reward (mean log-probability of the label under the reward
    classifier) with the reward classifier's accuracy, and the ink coverage (fraction of pixels
    > 0.5: the reward of the digits-grpo preset)."""
    images = images.clamp(0, 1).cpu()
    feats = compute_features(images, assets.eval_network.features)
    logits = compute_features(images, assets.eval_network)
    out = evaluate_features(feats, labels, assets.reference, logits=logits)
    r_logits = compute_features(images, assets.reward_classifier)
    logp = torch.log_softmax(r_logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    out["reward"] = float(logp.mean())
    out["reward_accuracy"] = float((r_logits.argmax(1) == labels).double().mean())
    out["ink"] = float((images.mean(1) > 0.5).flatten(1).float().mean())  # the digits-grpo reward
    return out


def make_evaluator(
    assets: DigitsAssets, num_samples: int, seed: int = 4321
) -> Callable[[Trainer], dict[str, float]]:
    """``evaluator(trainer)``: metrics of ``num_samples`` student samples for fixed noise and labels."""
    labels = balanced_labels(num_samples)

    def evaluator(trainer: Trainer) -> dict[str, float]:
        x = trainer.sample(labels, generator=torch.Generator().manual_seed(seed), use_ema=False)
        return evaluate_images(assets, trainer.student.decode(x), labels)

    return evaluator


@torch.no_grad()
def teacher_samples(
    assets: DigitsAssets, labels: torch.Tensor, *, steps: int = 50, guidance: float = 1.0, seed: int = 4321
):
    """Multi-step Euler samples of the teacher, decoded to [0, 1]."""
    teacher = assets.fresh_teacher()
    noise = torch.randn(
        (labels.numel(), *teacher.sample_shape), generator=torch.Generator().manual_seed(seed)
    )
    null = teacher.null_condition(labels.numel()) if uses_cfg(guidance) else None
    x = euler_sample(teacher.velocity, noise, labels, num_steps=steps, guidance=guidance, null_cond=null)
    return teacher.decode(x)


def sampling_sides(
    trainer: Trainer, assets: DigitsAssets, *, batch: int, steps: int | None = None, fp8: bool = False
) -> dict[str, Callable[[], torch.Tensor]]:
    """``bench sample --checkpoint``: callables that each sample ``batch`` digits — the teacher
    (50 Euler steps at the report's CFG), the student (its N steps) and, with ``fp8``, a copy of
    the student with FP8 linears and attention (:func:`dmdr_fast.models.fp8.quantize_for_inference`)."""
    from dmdr_fast.models.fp8 import quantize_for_inference

    labels = balanced_labels(batch)
    w = float(trainer.config.model.kwargs.get("teacher_eval_guidance", 1.0))
    teacher = assets.fresh_teacher()  # built once: the copy is not part of what is timed
    null = teacher.null_condition(batch) if uses_cfg(w) else None

    @torch.no_grad()
    def sample_teacher() -> torch.Tensor:
        noise = torch.randn((batch, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
        return euler_sample(teacher.velocity, noise, labels, num_steps=50, guidance=w, null_cond=null)

    sides: dict[str, Callable[[], torch.Tensor]] = {
        f"teacher-50-cfg{w:g}": sample_teacher,
        "student": lambda: trainer.sample(labels, num_steps=steps),
    }
    if fp8:
        with trainer.ema_weights():  # the weights trainer.sample uses
            student8 = copy.deepcopy(trainer.student)
        quantize_for_inference(student8.network)

        def sample_fp8() -> torch.Tensor:
            original, trainer.student = trainer.student, student8
            try:
                return trainer.sample(
                    labels, num_steps=steps, use_ema=False
                )  # the copy holds the EMA weights
            finally:
                trainer.student = original

        sides["student-fp8"] = sample_fp8
    return sides


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def bench_trainer(config: DMDRTrainerConfig) -> Trainer:
    """A Trainer on a randomly initialised teacher of the preset's size (``bench step``: timing does
    not depend on the weights, so no teacher is trained or read from the cache). With
    ``rl.algorithm`` set it gets the config's rewards (kinds built from the config alone, e.g. ``ink``;
    the ``classifier`` kind needs the trained assets and is refused by the registry)."""
    from dmdr_fast.models import DiTAdapter, dit_from_config
    from dmdr_fast.recipes.digits.teacher import DEFAULT_DIGITS_TEACHER_CONFIG, resolve_config
    from dmdr_fast.rewards import rewards_from_config

    arch = resolve_config(config.model.kwargs.get("teacher"), DEFAULT_DIGITS_TEACHER_CONFIG, "teacher")[
        "model"
    ]
    reward = rewards_from_config(config.rewards) if config.rl.enabled else None
    return Trainer(
        config, DiTAdapter(dit_from_config(arch, seed=0)), reward=reward, data=ClassLabelSampler(NUM_CLASSES)
    )


def train_student(
    config: DMDRTrainerConfig,
    assets: DigitsAssets,
    out_dir: Path,
    *,
    resume: bool = False,
    start_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Trainer:
    """One DMDR run of the digits preset (logs, checkpoints, sample grids under ``out_dir``).

    ``resume``: continue from ``out_dir``'s latest checkpoint if there is one. ``start_from``: else
    start from this checkpoint of another run with the same networks (the experiments branch their
    rows from one shared stage 1); its weights, optimisers, RNG and step counter are taken.
    """
    own = ckpt.latest_checkpoint(Path(out_dir)) if resume else None
    resuming = own is not None or start_from is not None
    trainer = Trainer(
        config,
        assets.fresh_teacher(),
        reward=make_reward(assets, config.rewards),
        data=ClassLabelSampler(NUM_CLASSES),
        out_dir=out_dir,
        evaluator=make_evaluator(assets, config.train.num_eval_samples),
        monitor=make_monitor(assets, config),
        load_init=not resuming,  # the checkpoint holds the student
    )
    if own is not None or start_from is None:
        if own is not None:
            trainer.resume(own)
        if resume:
            run_dir.say_resumed(trainer.rank, own, trainer.state.gen_step, out_dir, quiet=not progress)
    else:
        trainer.resume(start_from, same_config=False)  # a branch: its rows differ by design
    interrupt.fit(trainer, progress=progress)  # a signal: checkpoint, then TrainingInterrupted
    return trainer


def run_digits(
    config: DMDRTrainerConfig,
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The main job: assets → DMDR (stage 1 + 2) → evaluation → report. Returns the metrics."""
    from dmdr_fast.eval.plots import plot_metric_curves, plot_monitor, save_class_grid, save_comparison_grid
    from dmdr_fast.eval.report import format_metrics_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    from dmdr_fast.train.distributed import rank0_first

    with rank0_first():  # under torchrun: rank 0 trains/caches the teacher, the others load it
        assets = prepare_assets(
            cache_dir if cache_dir is not None else default_cache_dir(),
            config.model.kwargs.get("teacher"),
            config.model.kwargs.get("classifiers"),
            progress=progress,
        )
    t_assets = time.perf_counter() - t_start
    trainer = train_student(config, assets, out, resume=resume, progress=progress)
    t_train = time.perf_counter() - t_start - t_assets
    # Under FSDP every forward is a collective (train/parallel.py): all ranks draw the student's
    # evaluation samples; rank 0 alone evaluates and reports. Under DDP the other ranks are done.
    if trainer.rank != 0 and not trainer.collective:
        return {"rank": trainer.rank}

    n = config.train.num_eval_samples
    labels = balanced_labels(n)
    s_img = trainer.student.decode(trainer.sample(labels, generator=torch.Generator().manual_seed(4321)))
    if trainer.rank != 0:
        return {"rank": trainer.rank}
    teacher_w = float(config.model.kwargs.get("teacher_eval_guidance", 1.0))
    t_img = teacher_samples(assets, labels, steps=50, guidance=teacher_w)
    results = {
        f"teacher (50-step Euler, CFG {teacher_w:g})": evaluate_images(assets, t_img, labels),
        f"student ({config.student.num_steps}-step {config.method_name})": evaluate_images(
            assets, s_img, labels
        ),
    }
    save_comparison_grid(
        {"teacher 50 steps": t_img[:80], f"student {config.student.num_steps} step": s_img[:80]},
        out / "teacher_vs_student.png",
        nrow=10,
    )
    save_class_grid(s_img, labels, out / "student_per_class.png", per_class=10, num_classes=NUM_CLASSES)
    history = trainer.state.history
    if history:
        plot_metric_curves(
            {config.name: history},
            out / "metrics_over_steps.png",
            metrics=["fd", "precision", "recall", "accuracy", "diversity_ratio", "reward", "ink"],
        )
    monitor_lines: list[str] = []
    if trainer.monitor is not None and trainer.monitor.history:
        plot_monitor({config.name: trainer.monitor.history}, out / "monitor.png")
        monitor_lines = [
            "## Reward-hacking monitor",
            "",
            f"Every {config.monitor.every} generator steps: training reward, held-out score (the evaluation "
            "network's log-probability of the label) and within-class diversity on fixed noise; verdict: "
            f"**{trainer.monitor.verdict()}**.",
            "",
            *[f"- {w}" for w in trainer.monitor.warnings[:5]],
            "",
            "![monitor](monitor.png)",
        ]
    elapsed = time.perf_counter() - t_start
    metrics = {
        "results": results,
        "history": history,
        "monitor": trainer.monitor.history if trainer.monitor is not None else [],
        "monitor_warnings": trainer.monitor.warnings if trainer.monitor is not None else [],
        "real_vs_real": assets.info["real_vs_real"],
        "assets": assets.info,
        "timing_s": {"assets": t_assets, "train": t_train, "total": elapsed},
        "config": config.to_dict(),
    }
    write_json(out / "metrics.json", metrics)
    report = [
        f"# Digits report — {config.name} ({config.method_name})",
        "",
        f"{config.student.num_steps}-step student distilled from a 50-step flow-matching DiT teacher on "
        f"scikit-learn digits. {config.training_summary()}. "
        f"Metrics on {n} samples with an evaluation network trained on a split disjoint from the reward "
        f"classifier's. Real-vs-real Fréchet distance (two halves of the data): {assets.info['real_vs_real_fd']:.2f}.",
        "",
        format_metrics_table(results),
        "",
        "![teacher vs student](teacher_vs_student.png)",
        "",
        "![student per class](student_per_class.png)",
        "",
        "![metrics over training](metrics_over_steps.png)" if history else "",
        "",
        *monitor_lines,
        "",
        f"Time: assets {t_assets:.0f} s (teacher cache hit: {assets.info['teacher']['cache_hit']}), "
        f"training {t_train:.0f} s, total {elapsed:.0f} s.",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    return metrics

"""A digits checkpoint opened for ``dmdr-fast sample`` / ``eval``: nothing is trained.

Sampling needs only the student: its architecture is in the checkpoint's config
(``model.kwargs.teacher``'s ``model`` section, merged over the defaults) and its weights in the
checkpoint, so a network of that architecture is built and the weights loaded into it — the
teacher does not have to be in the cache (training one takes minutes). A LoRA student is the
exception: its frozen base *is* the teacher, so that one must be cached.

Evaluation needs the two classifiers (the evaluation network's features and logits, the reward
classifier's log-probability). They are the one thing built when missing, and a note on stderr
says so: both train in about 20 s on one shared CPU core (measured 2026-12-06), against minutes
for the teacher, and are cached for the next run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from dmdr_fast._errors import UserError
from dmdr_fast.config import DMDRTrainerConfig

if TYPE_CHECKING:
    from dmdr_fast.train.trainer import Trainer

__all__ = ["evaluation_assets", "load_student"]


def load_student(
    checkpoint: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None, *, device: str = "cpu"
) -> Trainer:
    """A Trainer holding a digits checkpoint's student (and EMA), ready to ``sample``.

    Args:
        checkpoint: A checkpoint file, or a sharded (FSDP) checkpoint folder.
        cache_dir: The teacher cache; read only for a LoRA student (whose base is the teacher).
        device: Where the student runs (``train.device`` of the returned Trainer).

    Raises:
        UserError: An unreadable checkpoint (:func:`~dmdr_fast.train.checkpoint.open_checkpoint`),
            or a LoRA student whose teacher is not in ``cache_dir``.
    """
    from dmdr_fast.train.checkpoint import is_sharded_checkpoint, open_checkpoint

    # First, before the (slow) imports of the model code: a wrong path costs nothing.
    sd = open_checkpoint(checkpoint)  # weights_only: a downloaded checkpoint runs no code
    from dmdr_fast.models import DiTAdapter, dit_from_config
    from dmdr_fast.recipes.digits.teacher import (
        DEFAULT_DIGITS_TEACHER_CONFIG,
        cached_digits_teacher,
        resolve_config,
    )
    from dmdr_fast.train.trainer import ClassLabelSampler, Trainer

    # Its weights come from the checkpoint (no student.init to read again), nothing is worth
    # compiling, and no reward is scored: the Trainer only samples.
    overrides = [f"train.device={device}", "student.init=null", "train.compile=false", "rewards=[]"]
    if sd["config"].get("rl", {}).get("algorithm", "none") != "none":
        overrides.append("rl.algorithm=none")  # a group-relative mode needs its reward; sampling does not
    config = DMDRTrainerConfig.from_dict(sd["config"]).with_overrides(overrides)
    teacher_config = config.model.kwargs.get("teacher")
    if config.student.kind == "lora":
        teacher = cached_digits_teacher(cache_dir, teacher_config)
        if teacher is None:
            raise UserError(
                f"--checkpoint {checkpoint}: its student is a LoRA on the digits teacher, which is not "
                f"in the cache {cache_dir}; pass --cache-dir of the run that trained it (or rebuild the "
                "teacher with `dmdr-fast train` on the same model.kwargs.teacher)"
            )
    else:  # a full student: the teacher's architecture, its own weights loaded below
        arch = resolve_config(teacher_config, DEFAULT_DIGITS_TEACHER_CONFIG, "teacher")["model"]
        teacher = DiTAdapter(dit_from_config(arch, seed=0)).eval()
    trainer = Trainer(config, teacher, data=ClassLabelSampler(10))
    if is_sharded_checkpoint(checkpoint):  # an FSDP run's folder: DCP reads it into 1 process
        trainer.resume(checkpoint, same_config=False)  # the overrides above change nothing trained
    else:
        trainer.load_state_dict(sd)
    return trainer


def evaluation_assets(
    config: DMDRTrainerConfig, cache_dir: str | os.PathLike[str] | None, *, progress: bool = False
) -> Any:
    """The classifiers and real-data statistics :func:`~dmdr_fast.recipes.digits.evaluate_images`
    reads (``eval_network``, ``reward_classifier``, ``reference``), for ``config``'s classifiers.

    Taken from ``cache_dir`` if they were trained before; else trained now (seconds) and cached.
    """
    from dmdr_fast.eval.metrics import RealReference, compute_features
    from dmdr_fast.recipes.digits.data import load_digits_tensors, to_unit_range
    from dmdr_fast.recipes.digits.teacher import get_or_train_digits_classifiers

    spec = config.model.kwargs.get("classifiers")
    if not _classifiers_cached(cache_dir, spec):
        where = f"cache {cache_dir}" if cache_dir is not None else "no cache"
        print(f"note: training the digits classifiers (about 20 s on a CPU; {where})", file=sys.stderr)
    reward_clf, eval_net, _ = get_or_train_digits_classifiers(cache_dir, spec, progress=progress)
    images, labels = load_digits_tensors()
    feats = compute_features(to_unit_range(images), eval_net.features)
    return SimpleNamespace(
        reward_classifier=reward_clf.eval(),
        eval_network=eval_net.eval(),
        reference=RealReference.from_features(feats, labels),
    )


def _classifiers_cached(cache_dir: str | os.PathLike[str] | None, spec: Any) -> bool:
    from dmdr_fast.recipes.digits.teacher import classifiers_cache_path

    path = classifiers_cache_path(cache_dir, spec)
    return path is not None and Path(path).is_file()

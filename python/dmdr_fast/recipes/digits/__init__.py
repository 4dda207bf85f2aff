"""The digits demo, all in one place: DMDR end to end on scikit-learn's 8×8 digits, on a CPU.

- :mod:`~dmdr_fast.recipes.digits.data` — the data set, its splits and value ranges;
- :mod:`~dmdr_fast.recipes.digits.classifier` — the reward classifier and the evaluation network
  (a small CNN) and their training;
- :mod:`~dmdr_fast.recipes.digits.teacher` — the flow-matching DiT teacher's training and the cache
  of trained teachers and classifiers;
- :mod:`~dmdr_fast.recipes.digits.run` — the main job (``dmdr-fast train --preset digits``);
- :mod:`~dmdr_fast.recipes.digits.experiment` — ``dmdr-fast experiment digits``.
"""

from dmdr_fast.recipes.digits.run import (
    NUM_CLASSES,
    DigitsAssets,
    balanced_labels,
    default_cache_dir,
    evaluate_images,
    make_evaluator,
    make_monitor,
    make_reward,
    prepare_assets,
    run_digits,
    teacher_samples,
    train_student,
)

__all__ = [
    "NUM_CLASSES",
    "DigitsAssets",
    "balanced_labels",
    "default_cache_dir",
    "evaluate_images",
    "make_evaluator",
    "make_monitor",
    "make_reward",
    "prepare_assets",
    "run_digits",
    "teacher_samples",
    "train_student",
]

"""Evaluation: sample-quality metrics on an evaluation network's features, and report figures/tables.

``metrics`` (torch only) is imported eagerly; ``plots`` imports Pillow and matplotlib only when a
figure is drawn, so ``import dmdr_fast.eval`` stays light.
"""

from dmdr_fast.eval.metrics import (
    FeatureFn,
    LogitsFn,
    RealReference,
    class_accuracy,
    compute_features,
    evaluate_features,
    evaluate_samples,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    knn_radii,
    mmd_rbf,
    precision_recall,
    within_class_diversity,
)
from dmdr_fast.eval.plots import (
    arrange_by_class,
    make_image_grid,
    plot_metric_curves,
    save_class_grid,
    save_comparison_grid,
    save_image_grid,
)
from dmdr_fast.eval.report import DEFAULT_DIRECTIONS, format_metrics_table, write_metrics_table

__all__ = [
    "DEFAULT_DIRECTIONS",
    "FeatureFn",
    "LogitsFn",
    "RealReference",
    "arrange_by_class",
    "class_accuracy",
    "compute_features",
    "evaluate_features",
    "evaluate_samples",
    "format_metrics_table",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "knn_radii",
    "make_image_grid",
    "mmd_rbf",
    "plot_metric_curves",
    "precision_recall",
    "save_class_grid",
    "save_comparison_grid",
    "save_image_grid",
    "within_class_diversity",
    "write_metrics_table",
]

"""Figures for reports (PNG; a grid also as JPEG or WebP): sample grids, per-class grids, side-by-side comparisons, metric curves.

Images are tensors ``(N, C, H, W)`` with values in [0, 1] and C = 1 (grayscale) or 3 (RGB). Small
images (8×8 digits) are upscaled by an integer factor with nearest-neighbour repetition, so pixels stay
sharp squares and nothing is smoothed that is not in the sample.

Pillow and matplotlib are imported inside the functions: importing ``dmdr_fast`` must stay cheap and
must not need either. Matplotlib is driven through its Agg canvas directly (no ``pyplot``), so these
functions never need a display and never change the caller's global backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "arrange_by_class",
    "make_image_grid",
    "plot_mean_std_curves",
    "plot_metric_curves",
    "plot_monitor",
    "save_class_grid",
    "save_comparison_grid",
    "save_image_grid",
]

#: The file endings a grid can be written as, and the Pillow format each names.
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
IMAGE_SUFFIXES = tuple(_FORMATS)

_FONT_SIZE = 12
_GAP = 8  # pixels between comparison panels


def _check_images(images: Tensor, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor of shape (N, C, H, W), got {shape}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected C = 1 or 3 channels, got C = {images.shape[1]}")
    if images.shape[0] < 1:
        raise ValueError(f"{name}: need at least one image")
    return images.detach().to("cpu", torch.float32)


def make_image_grid(images: Tensor, nrow: int = 8, padding: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tiles images into one image, row by row.

    Args:
        images: ``(N, C, H, W)`` images.
        nrow: Images per grid row (the last row may be partial; its empty cells get ``pad_value``).
        padding: Pixels between cells and around the border.
        pad_value: Value of the padding, in [0, 1] (1 = white separates dark digits best).

    Returns:
        ``(C, rows·(H + padding) + padding, nrow·(W + padding) + padding)`` float32 grid on the CPU.

    Raises:
        ValueError: on a bad shape or ``nrow < 1``.
    """
    x = _check_images(images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = torch.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value))
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def _upscale(images: Tensor, scale: int) -> Tensor:
    """Nearest-neighbour upscaling ``(N, C, H, W)`` -> ``(N, C, H·scale, W·scale)``."""
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    return images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def _to_pil(grid: Tensor) -> Image.Image:
    """``(C, H, W)`` in [0, 1] -> 8-bit PIL image ("L" for C = 1, "RGB" for C = 3)."""
    from PIL import Image

    # Values outside [0, 1] (a generator's raw output) are clamped for display only.
    arr = (grid.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy())  # 2-D uint8 -> "L"
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3) uint8 -> "RGB"


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=_FONT_SIZE)


def _text_size(text: str, font: Any) -> tuple[int, int]:
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    return int(box[2] - box[0]), int(box[3] - box[1])  # Pillow types the box as floats; it holds ints


def _save_panels(
    panels: Sequence[tuple[str | None, Tensor]],
    path: str | os.PathLike[str],
    nrow: int,
    scale: int,
    padding: int,
    pad_value: float,
    row_labels: Sequence[str] | None,
) -> Path:
    """Renders image grids side by side, optional titles above and row labels to the left."""
    checked = [(title, _upscale(_check_images(imgs, f"panel {title!r}"), scale)) for title, imgs in panels]
    shapes = {tuple(imgs.shape[1:]) for _, imgs in checked}
    if len(shapes) > 1:
        raise ValueError(f"all panels need the same (C, H, W); got {sorted(shapes)} (after upscaling)")
    c, cell_h, _ = checked[0][1].shape[1:]
    grids = [_to_pil(make_image_grid(imgs, nrow, padding, pad_value)) for _, imgs in checked]

    font = _font()
    titles = [t for t, _ in checked]
    title_h = max((_text_size(t, font)[1] for t in titles if t), default=0)
    title_h = title_h + 4 if title_h else 0
    labels = list(row_labels or [])
    label_w = max((_text_size(s, font)[0] for s in labels), default=0)
    label_w = label_w + 6 if label_w else 0

    width = label_w + sum(g.width for g in grids) + _GAP * (len(grids) - 1)
    height = title_h + max(g.height for g in grids)
    from PIL import Image, ImageDraw

    mode, white, black = ("L", 255, 0) if c == 1 else ("RGB", (255, 255, 255), (0, 0, 0))
    canvas = Image.new(mode, (width, height), white)
    draw = ImageDraw.Draw(canvas)
    left = label_w
    for title, grid in zip(titles, grids, strict=True):
        canvas.paste(grid, (left, title_h))
        if title:
            tw, _ = _text_size(title, font)
            draw.text((left + max(0, (grid.width - tw) // 2), 0), title, fill=black, font=font)
        left += grid.width + _GAP
    for r, text in enumerate(labels):
        _, th = _text_size(text, font)
        centre = title_h + padding + r * (cell_h + padding) + cell_h // 2
        draw.text((2, centre - th // 2), text, fill=black, font=font)

    out = Path(path)
    # The format the name says (a .jpg file of PNG bytes confuses viewers and upload checks).
    fmt = _FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"{out}: cannot tell the image format; end the name in {', '.join(IMAGE_SUFFIXES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "WEBP" and canvas.mode == "L":
        canvas = canvas.convert("RGB")  # WebP holds colour images only
    canvas.save(out, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    return out


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    nrow: int = 8,
    scale: int = 4,
    padding: int = 1,
    pad_value: float = 1.0,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Saves images as one grid: PNG, or JPEG / WebP when the name ends so (:data:`IMAGE_SUFFIXES`).

    Args:
        images: ``(N, C, H, W)`` images in [0, 1] (clamped), C = 1 or 3.
        path: Output file; parent directories are created.
        nrow: Images per row.
        scale: Integer nearest-neighbour upscaling factor (8×8 digits need ~4–8 to be visible).
        padding: Pixels between cells (after upscaling).
        pad_value: Padding value in [0, 1].
        row_labels: Optional text per grid row, drawn to the left of the grid.

    Returns:
        The path written. The PNG is ``(rows·(H·scale + padding) + padding)`` pixels high and
        ``(min(nrow, N)·(W·scale + padding) + padding)`` wide, plus the label margin if any.
    """
    return _save_panels([(None, images)], path, nrow, scale, padding, pad_value, row_labels)


def arrange_by_class(
    images: Tensor, labels: Tensor, per_class: int = 8, num_classes: int | None = None, fill: float = 1.0
) -> Tensor:
    """Reorders images into class-major order, ``per_class`` per class, for grids with one class per row.

    Args:
        images: ``(N, C, H, W)`` images.
        labels: ``(N,)`` integer class labels.
        per_class: Images kept per class (the first ones in input order).
        num_classes: Number of classes (rows); default ``labels.max() + 1``.
        fill: Value of the blank images that stand in for missing samples of a class.

    Returns:
        ``(num_classes·per_class, C, H, W)`` images; row c of a grid with ``nrow=per_class`` is class c.
    """
    x = _check_images(images)
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    y = labels.detach().cpu().long()
    k = int(y.max()) + 1 if num_classes is None else num_classes
    out = torch.full((k * per_class, *x.shape[1:]), float(fill))
    for c in range(k):
        members = x[y == c][:per_class]
        out[c * per_class : c * per_class + members.shape[0]] = members
    return out


def save_class_grid(
    images: Tensor,
    labels: Tensor,
    path: str | os.PathLike[str],
    per_class: int = 8,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    scale: int = 4,
) -> Path:
    """Saves a grid with one row per class (row c = the first ``per_class`` samples labelled c).

    Args:
        images: ``(N, C, H, W)`` images in [0, 1].
        labels: ``(N,)`` integer class labels.
        path: Output PNG.
        per_class: Columns (samples per class); missing samples are left blank.
        num_classes: Rows; default ``labels.max() + 1``.
        class_names: Row labels; default ``"0"``, ``"1"``, ...
        scale: Integer upscaling factor.

    Returns:
        The path written.
    """
    grid_images = arrange_by_class(images, labels, per_class, num_classes)
    k = grid_images.shape[0] // per_class
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names: expected {k} names, got {len(names)}")
    return save_image_grid(grid_images, path, nrow=per_class, scale=scale, row_labels=names)


def save_comparison_grid(
    panels: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    nrow: int = 8,
    scale: int = 4,
    padding: int = 1,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Saves several image sets side by side, one titled panel each (e.g. teacher | DMDR | DMD-only).

    Samples generated with the same labels (and, where possible, the same noise) then sit in the same
    cell of every panel. For a per-class comparison, pass each set through :func:`arrange_by_class`
    and use ``nrow=per_class`` with the class names as ``row_labels``.

    Args:
        panels: Title -> ``(N_i, C, H, W)`` images in [0, 1]; all with the same C, H, W.
        path: Output PNG.
        nrow: Images per row within a panel.
        scale: Integer upscaling factor.
        padding: Pixels between cells.
        row_labels: Optional text per grid row, drawn once to the left of the first panel.

    Returns:
        The path written.

    Raises:
        ValueError: if ``panels`` is empty or the panels' image shapes differ.
    """
    if not panels:
        raise ValueError("panels: need at least one titled image set")
    return _save_panels(list(panels.items()), path, nrow, scale, padding, 1.0, row_labels)


def plot_metric_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    step_key: str = "step",
    ncols: int = 3,
    log_scale: Sequence[str] = (),
) -> Path:
    """Plots metrics against training steps, one subplot per metric, runs overlaid.

    Args:
        runs: Run name -> list of records, each a dict with ``step_key`` and metric values (e.g. the
            output of ``evaluate_samples`` plus ``{"step": s}``). Missing or NaN values are skipped.
        path: Output PNG.
        metrics: Metrics to plot, in order; default every numeric key other than ``step_key``, in
            first-seen order.
        step_key: Key of the x-axis value.
        ncols: Subplots per figure row.
        log_scale: Metrics whose y-axis is logarithmic (e.g. ``("fd",)``).

    Returns:
        The path written.

    Raises:
        ValueError: if there is nothing to plot or a record lacks ``step_key``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metrics is None:
        seen: dict[str, None] = {}
        for records in runs.values():
            for rec in records:
                for key, val in rec.items():
                    if key != step_key and isinstance(val, (int, float)):
                        seen.setdefault(key, None)
        metrics = list(seen)
    if not metrics:
        raise ValueError("no metrics to plot: runs are empty or hold no numeric values")
    ncols = max(1, min(ncols, len(metrics)))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for name, records in runs.items():
            pts = []
            for i, rec in enumerate(records):
                if step_key not in rec:
                    raise ValueError(f"run {name!r}, record {i}: missing {step_key!r}")
                value = rec.get(metric)
                if value is not None and math.isfinite(float(value)):
                    pts.append((float(rec[step_key]), float(value)))
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(metric)
        ax.set_xlabel(step_key)
        if metric in log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def plot_monitor(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike[str],
    metrics: Sequence[str] = ("train_reward", "heldout", "diversity", "cosine"),
    titles: Mapping[str, str] | None = None,
) -> Path:
    """The reward-hacking monitor's curves, runs overlaid; flagged evaluations marked with a red ×.

    Args:
        runs: Run name → :attr:`RewardHackingMonitor.history` (records with ``step``, the
            metrics, and ``flag``).
        path: Output PNG.
        metrics: Which monitor values to plot, one panel each.
        titles: Optional panel titles per metric.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(runs.values()):
        raise ValueError("no monitor history to plot")
    default_titles = {
        "train_reward": "training reward (↑ = optimised)",
        "heldout": "held-out score",
        "diversity": "within-condition diversity",
        "cosine": "cos(g_DMD, g_reward)",
    }
    titles = {**default_titles, **(titles or {})}
    fig = Figure(figsize=(4.0 * len(metrics), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per run in every panel
    for ax, metric in zip(axes, metrics, strict=True):
        for name, records in runs.items():
            pts = [
                (float(r["step"]), float(r[metric]), bool(r.get("flag", 0)), bool(r.get("collapsed", 0)))
                for r in records
                if metric in r and math.isfinite(float(r[metric]))
            ]
            if not pts:
                continue
            xs, ys, flags, collapsed = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=2, color=colors[name])
            fx = [x for x, f in zip(xs, flags, strict=True) if f]
            fy = [y for y, f in zip(ys, flags, strict=True) if f]
            if fx:
                ax.scatter(fx, fy, marker="x", color="red", s=40, zorder=3)
            # After a warning: the evaluations that still look collapsed (RewardHackingMonitor).
            cx = [x for x, f, c in zip(xs, flags, collapsed, strict=True) if c and not f]
            cy = [y for y, f, c in zip(ys, flags, collapsed, strict=True) if c and not f]
            if cx:
                ax.scatter(cx, cy, marker="o", facecolors="none", edgecolors="red", s=25, zorder=3)
        ax.set_title(titles.get(metric, metric), fontsize="medium")
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    # One legend for all runs (a run without a metric, e.g. DMD-only's training reward, keeps its colour).
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", markersize=3, label=n) for n, c in colors.items()]
    handles.append(Line2D([], [], color="red", marker="x", linestyle="none", label="monitor warning"))
    handles.append(
        Line2D(
            [], [], color="red", marker="o", markerfacecolor="none", linestyle="none", label="still collapsed"
        )
    )
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def plot_mean_std_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, Sequence[float]]]]],
    path: str | os.PathLike[str],
    metrics: Sequence[str],
    *,
    titles: Mapping[str, str] | None = None,
    xlabel: str = "generator step",
) -> Path:
    """One panel per metric, one line per run: the mean over seeds with a ± std band.

    Args:
        curves: Run name → metric → ``[(step, values over seeds), ...]``; NaN values are skipped,
            a step with one value has no band.
        path: Output PNG.
        metrics: The panels, in order.
        titles: Optional panel titles per metric.
        xlabel: The x-axis label.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(metrics), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=True):
        for i, (name, per_metric) in enumerate(curves.items()):
            xs, means, stds = [], [], []
            for step, values in sorted(per_metric.get(metric, []), key=lambda p: p[0]):
                vals = [float(v) for v in values if math.isfinite(float(v))]
                if not vals:
                    continue
                m = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                xs.append(float(step))
                means.append(m)
                stds.append(sd)
            if not xs:
                continue
            ax.plot(xs, means, marker="o", markersize=3, color=f"C{i}", label=name)
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
        ax.set_title((titles or {}).get(metric, metric), fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out

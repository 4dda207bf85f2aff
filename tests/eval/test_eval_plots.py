"""Tests for dmdr_fast.eval.plots and dmdr_fast.eval.report: valid PNG/markdown files of the right size."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dmdr_fast.eval import (
    arrange_by_class,
    format_metrics_table,
    make_image_grid,
    plot_metric_curves,
    save_class_grid,
    save_comparison_grid,
    save_image_grid,
    write_metrics_table,
)


def _digits(n: int, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def _open_png(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    return img


def test_make_image_grid_layout():
    images = torch.zeros(10, 1, 8, 8)
    images[5] = 0.5
    grid = make_image_grid(images, nrow=4, padding=1, pad_value=1.0)
    assert grid.shape == (1, 3 * 9 + 1, 4 * 9 + 1)
    assert grid[0, 0, 0] == 1.0  # border
    assert grid[0, 1, 1] == 0.0  # first cell
    assert grid[0, 1 + 9, 1 + 9] == 0.5  # image 5 = row 1, column 1
    assert grid[0, 1 + 18, 1 + 27] == 1.0  # empty cell 11 of the partial last row


def test_save_image_grid_sizes_and_pixels(tmp_path):
    images = torch.zeros(10, 1, 8, 8)
    images[0] = 1.0
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=4, scale=4, padding=1)
    img = _open_png(path)
    assert img.mode == "L"
    assert img.size == (4 * (8 * 4 + 1) + 1, 3 * (8 * 4 + 1) + 1)
    assert img.getpixel((1, 1)) == 255 and img.getpixel((32, 32)) == 255  # all of upscaled image 0
    assert img.getpixel((34, 1)) == 0  # image 1 starts after one pixel of padding

    rgb = _open_png(save_image_grid(_digits(6, c=3), tmp_path / "rgb.png", nrow=3, scale=2))
    assert rgb.mode == "RGB" and rgb.size == (3 * 17 + 1, 2 * 17 + 1)


def test_save_image_grid_row_labels_add_left_margin(tmp_path):
    plain = _open_png(save_image_grid(_digits(8), tmp_path / "a.png", nrow=4))
    labelled = _open_png(save_image_grid(_digits(8), tmp_path / "b.png", nrow=4, row_labels=["one", "two"]))
    assert labelled.height == plain.height and labelled.width > plain.width


def test_arrange_by_class_and_class_grid(tmp_path):
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 8, 8) / 10
    arranged = arrange_by_class(images, labels, per_class=2, num_classes=4, fill=1.0)
    assert arranged.shape == (8, 1, 8, 8)
    firsts = arranged[:, 0, 0, 0].tolist()
    assert firsts == pytest.approx([0.1, 0.5, 0.3, 1.0, 0.0, 0.2, 1.0, 1.0])  # class 3 is empty

    scale = 3
    img = _open_png(
        save_class_grid(images, labels, tmp_path / "cls.png", per_class=2, num_classes=4, scale=scale)
    )
    cell = 8 * scale + 1
    assert img.height == 4 * cell + 1 and img.width > 2 * cell + 1
    with pytest.raises(ValueError, match="class_names"):
        save_class_grid(images, labels, tmp_path / "x.png", per_class=2, class_names=["a"])


def test_save_comparison_grid(tmp_path):
    teacher, student = _digits(8, seed=1), _digits(8, seed=2)
    single = _open_png(save_image_grid(teacher, tmp_path / "t.png", nrow=4, scale=4))
    img = _open_png(
        save_comparison_grid({"teacher": teacher, "DMDR": student}, tmp_path / "cmp.png", nrow=4, scale=4)
    )
    assert img.width >= 2 * single.width and img.height > single.height  # titles on top
    with pytest.raises(ValueError, match="same"):
        save_comparison_grid({"a": teacher, "b": torch.rand(8, 1, 7, 7)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one"):
        save_comparison_grid({}, tmp_path / "empty.png")


def test_image_input_errors(tmp_path):
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_image_grid(torch.rand(4, 2, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        save_image_grid(torch.rand(4, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(torch.rand(4, 1, 8, 8), tmp_path / "x.png", scale=0)


def test_plot_metric_curves(tmp_path):
    def run(offset: float) -> list[dict[str, float]]:
        return [
            {"step": s, "fd": 10.0 / (s + 1) + offset, "recall": 0.1 * s, "precision": math.nan}
            for s in range(0, 600, 100)
        ]

    runs = {"dmdr": run(0.0), "dmd": run(1.0), "reward_only": run(2.0)[:2]}
    runs["dmd"][3].pop("recall")  # missing values are skipped, not fatal
    img = _open_png(plot_metric_curves(runs, tmp_path / "curves.png", ncols=2, log_scale=("fd",)))
    assert img.size == (800, 600)  # 2 × 2 subplots of 4 × 3 inches at 100 dpi
    img1 = _open_png(plot_metric_curves(runs, tmp_path / "one.png", metrics=["fd"]))
    assert img1.size == (400, 300)
    with pytest.raises(ValueError, match="missing 'step'"):
        plot_metric_curves({"r": [{"fd": 1.0}]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no metrics"):
        plot_metric_curves({"r": []}, tmp_path / "empty.png")


def test_metrics_table(tmp_path):
    results = {
        "teacher": {"fd": 1.5, "recall": 0.6, "accuracy": 0.9},
        "dmdr": {"fd": 2.25, "recall": 0.5, "accuracy": 0.98},
        "dmd": {"fd": 1.5, "recall": math.nan},
    }
    text = format_metrics_table(results, digits=2)
    lines = text.strip().split("\n")
    assert lines[0] == "| run | fd ↓ | recall ↑ | accuracy ↑ |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| teacher | **1.50** | **0.60** | 0.90 |"
    assert lines[3] == "| dmdr | 2.25 | 0.50 | **0.98** |"
    assert lines[4] == "| dmd | **1.50** | – | – |"  # tie bolded; NaN and missing as –
    plain = format_metrics_table(results, metrics=["recall"], bold_best=False)
    assert "**" not in plain and "fd" not in plain

    written = write_metrics_table(results, tmp_path / "out" / "table.md", title="Digits")
    assert written.startswith("# Digits\n\n| run |")
    assert (tmp_path / "out" / "table.md").read_text(encoding="utf-8") == written


def test_import_is_lean():
    # Importing the eval package must not pull in matplotlib or Pillow (they load on first figure).
    code = "import sys, dmdr_fast.eval; print('matplotlib' in sys.modules, 'PIL' in sys.modules)"
    python_dir = str(Path(__file__).resolve().parents[2] / "python")
    env = {**os.environ, "PYTHONPATH": python_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]

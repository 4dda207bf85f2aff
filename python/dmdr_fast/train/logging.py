"""Run logging: JSON lines (always), TensorBoard (optional), and a plain notes file."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "read_jsonl", "write_sample_grid"]


class RunLogger:
    """Appends ``{"step": s, "time": ..., **metrics}`` to ``out_dir/metrics.jsonl`` and TensorBoard.

    With ``out_dir=None`` (e.g. ranks other than 0) every call is a no-op, so the training loop
    does not branch on the rank.
    """

    def __init__(self, out_dir: Path | None, *, tensorboard: bool = True) -> None:
        self.out_dir = out_dir
        self._tb = None
        self._tb_wanted = tensorboard
        self._t0 = time.time()

    def _writer(self):
        if self._tb is None and self._tb_wanted and self.out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb_wanted = False
        return self._tb

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` at generator step ``step``."""
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        row = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        row.update(
            {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items() if k != "step"}
        )
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        writer = self._writer()
        if writer is not None:
            for k, v in row.items():
                if k not in ("step",) and isinstance(v, float) and math.isfinite(v):
                    writer.add_scalar(k, v, step)

    def note(self, text: str) -> None:
        """Append a line to ``out_dir/notes.txt`` (resumes, warnings)."""
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "notes.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (skipping a torn last line after a kill)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_sample_grid(trainer: Any, path: str | os.PathLike[str] | None = None) -> Path | None:
    """:meth:`dmdr_fast.train.Trainer.save_sample_grid` after its rank check: sample the fixed grid
    (labels/prompts from seed 1234, noise from ``train.seed``) and, on rank 0, write the PNG."""
    import torch

    from dmdr_fast.eval.plots import save_image_grid

    n = trainer.config.train.num_grid_samples
    raw = trainer.data.sample(n, torch.Generator().manual_seed(1234))
    images = trainer.student.decode(trainer.sample(raw)).cpu()
    if trainer.rank != 0:
        return None
    if path is None:
        path = trainer.out_dir / "samples" / f"step_{trainer.state.gen_step:07d}.png"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image_grid(images, path, nrow=int(math.sqrt(n)) or 1)

"""`--tensorboard`: the run's metrics as TensorBoard event files in RUN_DIR/tensorboard, written by rank 0.

The same numbers as metrics.jsonl, under tags grouped for TensorBoard's dashboard (train/, eval/, health/, speed/),
at the optimizer step; F's eigenvalues as a histogram at every spectrum record. metrics.jsonl stays the record of
the run: this is a view of it. A resumed run purges the events past its checkpoint's step, as it drops those
lines of metrics.jsonl, so a curve never doubles back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: metrics.jsonl key -> TensorBoard tag.
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "pred_lr": "train/pred_lr",
    "online_probe_acc": "eval/online_probe_acc",
    "knn_acc": "eval/knn_acc",
    "output_std": "health/output_std",
    "effective_rank": "health/effective_rank",
    "images_per_sec": "speed/images_per_sec",
    "data_wait_share": "speed/data_wait_share",
    "linear_probe_acc": "eval/linear_probe_acc",
    "linear_probe_acc_random_init": "eval/linear_probe_acc_random_init",
}


class TensorBoardLog:
    def __init__(self, folder: str | Path, *, purge_from: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs tensorboard: `check` in config.py says so first
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_from)  # a resumed run's later events go

    def log(self, record: dict) -> None:
        """Every known numeric value of a metrics.jsonl record (or of summary.json, with its "step")."""
        step = int(record["step"])
        for key, tag in TAGS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def spectrum(self, step: int, f_eigs: np.ndarray) -> None:
        self.writer.add_histogram("spectrum/F_eigenvalues", np.asarray(f_eigs, dtype=np.float64), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

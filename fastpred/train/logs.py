"""Where the trainer's numbers go: metrics.jsonl in the run folder (the record of the run, rank 0), its TensorBoard
view with --tensorboard (`fastpred.train.tensorboard`), and the terminal: a progress bar on a terminal, or one plain
line per log interval (--progress).
"""

from __future__ import annotations

import json
import sys

from fastpred.train.config import Config
from fastpred.train.run_dir import RunDir
from fastpred.train.spectrum import SpectrumRecorder
from fastpred.train.tensorboard import TensorBoardLog


def compile_counts() -> dict[str, int]:
    """torch.compile's graphs and graph breaks so far in this process: a graph break runs its code eagerly between
    compiled pieces (with DDP, also a bucket boundary), so the step is fully compiled only while breaks stay 0."""
    from torch._dynamo.utils import counters

    return {"compile_graphs": int(counters["stats"]["unique_graphs"]),
            "compile_graph_breaks": int(sum(counters["graph_break"].values()))}


class RunLog:
    def __init__(self, cfg: Config, run: RunDir, *, rank: int, spectrum: SpectrumRecorder, total_steps: int):
        self.cfg, self.run, self.rank, self.spectrum, self.total_steps = cfg, run, rank, spectrum, total_steps
        self.tensorboard: TensorBoardLog | None = None  # opened by `open` on rank 0 with --tensorboard
        self._spectrum_logged = 0  # spectrum records already in TensorBoard
        self._bar = None

    def open(self, step: int) -> None:
        """TensorBoard (rank 0, --tensorboard), at `step`: after any resume, events past the checkpoint's step are
        purged and its spectrum records were logged."""
        if self.cfg.tensorboard and self.rank == 0:
            self.tensorboard = TensorBoardLog(self.run.path / "tensorboard", purge_from=step + 1 if step else None)
            self._spectrum_logged = len(self.spectrum)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def start_progress(self, step: int) -> None:
        """The progress bar from `step` (rank 0, with --progress bar, or auto on a terminal)."""
        cfg = self.cfg
        wanted = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
        if self.rank != 0 or not wanted:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self.total_steps if not cfg.max_steps else min(cfg.max_steps, self.total_steps),
                         initial=step, unit="step", dynamic_ncols=True)

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def append(self, record: dict) -> None:
        """A metrics.jsonl line (rank 0 writes), and its TensorBoard view with --tensorboard."""
        self.run.append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)
            for step, f_eigs in self.spectrum.records_since(self._spectrum_logged):
                self.tensorboard.spectrum(step, f_eigs)
            self._spectrum_logged = len(self.spectrum)

    def interval(self, record: dict) -> None:
        """A log interval's record: its metrics.jsonl line, and the bar's position or one line on the terminal."""
        self.append(record)
        if self.rank != 0:
            return
        bar = self._bar
        if bar is not None:
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}",
                            data=f"{record['data_wait_share']:.0%}", refresh=False)
        else:
            probe = record["online_probe_acc"]
            print(f"step {record['step']:>7}  epoch {record['epoch']:7.2f}  loss {record['loss']:.4f}  "
                  f"lr {record['lr']:.4g}  {record['images_per_sec']:8.0f} img/s  "
                  f"data {record['data_wait_share']:4.0%}  std {record['output_std']:.3f}"
                  + (f"  probe {probe:.3f}" if probe is not None else ""), flush=True)

    def say(self, message: str) -> None:
        """A line on the terminal from rank 0, above the bar if there is one."""
        if self.rank == 0:
            print(message, flush=True) if self._bar is None else self._bar.write(message)

    def summary(self, summary: dict, step: int) -> None:
        self.run.write_summary(summary)
        if self.tensorboard is not None:
            self.tensorboard.log({**summary, "step": step})

    def last_train_record(self) -> dict:
        """The last "train" line of metrics.jsonl (rank 0; {} elsewhere or before any)."""
        path = self.run.path / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return {}
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [r for r in lines if r.get("kind") == "train"]
        return train[-1] if train else {}

"""`python -m fastpred.plot RUN_DIR [RUN_DIR ...] [--out DIR]`: figures of one or several training runs.

For each run: ``<name>-overview.png`` (loss, accuracies, throughput, output std, effective rank, results)
and ``<name>-spectrum.png`` (eigenvalues of F and W over training, alignment cos(u_j, W u_j), asymmetry
of W: the paper's Fig. 2). With several runs also ``compare-overview.png`` and ``compare-spectrum.png``,
one colour per run. A run folder holds ``config.json``, ``metrics.jsonl`` and, where recorded,
``spectrum.npz`` and ``summary.json``; what a folder lacks is drawn as "not recorded".

Accuracies are fractions in [0, 1] in the files and drawn as percentages.

The package has one module per figure family (`overview`, `spectrum`), the reading of run folders (`runs`), what
the families share (`figure`) and the command (`cli`).
"""

from fastpred.plot.cli import main, plot_runs
from fastpred.plot.overview import overview_figure
from fastpred.plot.runs import Run, RunError, load_run
from fastpred.plot.spectrum import compare_spectrum_figure, spectrum_figure

__all__ = ["Run", "RunError", "compare_spectrum_figure", "load_run", "main", "overview_figure", "plot_runs",
           "spectrum_figure"]

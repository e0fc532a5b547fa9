"""Speed comparisons of every DirectPred formulation, side by side, with accuracy (`pytest bench/`).

Suites: `test_corr.py` (the correlation EMA update), `test_eigh.py` (eigensolve + construction of W on a
realistic stream of F), `test_step.py` (the whole predictor update of one training step). Shared pieces:
`harness` (device, size grids, timing, extra_info), `ceiling` (measured FLOP/s and GB/s), `stream`
(features with a decaying spectrum), `oracle` (float64 evaluation of the contract), `formulations`
(the providers). `python -m bench.report` turns pytest-benchmark JSON into `bench/RESULTS.md`.
"""

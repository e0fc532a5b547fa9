"""`python -m fastpred.train`: the BYOL/SimSiam trainer.

The step lives in `step.py` (`Learner.optimize`, top to bottom) and the loop around it in `loop.py` (`Trainer`). Each
concern at the loop's edges has a module of its own: the divergence guard (`guard.py`), stop requests (`stops.py`),
checkpoints and resumes (`checkpoint.py`), the evaluation calendar (`evaluation.py`), the logs (`logs.py`); and so
do the pieces the step uses: config and presets (`config.py`), optimizers and schedules (`optim.py`), data
(`data.py`), the online probe (`probes.py`), spectra (`spectrum.py`), the run folder (`run_dir.py`). The backbones,
LARS and the process groups are `fastpred.core`'s, shared with `fastpred.eval`."""

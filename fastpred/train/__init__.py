"""`python -m fastpred.train`: the BYOL/SimSiam trainer. The step lives in `loop.py`; each piece around it
(config and presets, models, optimizers and schedules, data, probes, the run folder) has a module here."""

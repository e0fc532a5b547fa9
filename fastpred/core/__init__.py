"""The layer that the trainer (`fastpred.train`) and the evaluation (`fastpred.eval`) both stand on, and that
imports neither: process groups and collectives (`distributed`), atomic writes and safe loading of files from
elsewhere (`files`), backbones, projectors and predictor heads built by name (`models`), and the LARS optimizer
(`lars`). What belongs to one of them alone (the training step, schedules, the run folder; the protocols) stays
in its own package."""

"""The papers' dynamics, simulated: `python -m fastpred.dynamics`."""

"""fastpred: DirectPred and its family of non-contrastive self-supervised predictors.

`DirectPredictor` sets a linear predictor directly from the statistics of its inputs; the trained
heads it is compared against live in `fastpred.trained`. Data loading (`fastpred.data`) needs FFCV
and is imported on demand, so the predictors work with torch alone.
"""

from fastpred.direct import DirectPredictor
from fastpred.trained import LinearPredictor, MLPPredictor, OffDiagonalPredictor

__all__ = ["DirectPredictor", "LinearPredictor", "MLPPredictor", "OffDiagonalPredictor"]
__version__ = "0.1.0"

"""Evaluation of frozen backbones on every rank: sharded feature extraction (`features`), the weighted kNN with a
sharded bank (`knn`), the cached-feature linear probe trained data-parallel (`probe`), the augmented linear
evaluation of the BYOL / SimSiam papers (`linear`), and `python -m fastpred.eval` (`__main__`). The trainer's kNN
monitor and final probes use the same functions."""

from fastpred.eval.features import ProbeSets, extract_features, shard_range
from fastpred.eval.knn import knn_accuracy
from fastpred.eval.probe import linear_probe_accuracy, linear_probe_scores

__all__ = ["ProbeSets", "extract_features", "knn_accuracy", "linear_probe_accuracy", "linear_probe_scores",
           "shard_range"]

"""Data pipeline: .beton writer, two-view FFCV loader with one JPEG decode, per-sample batch augmentations.

Names are resolved lazily (PEP 562), so `python -m fastpred.data.write` starts without torch, and FFCV is only
imported when a loader is built: the augmentations work on machines without FFCV's system libraries.
"""

import importlib

_EXPORTS = {
    "BYOLAugment": "augment",
    "ColorAugment": "augment",
    "byol_augment_ref": "augment",
    "sample_params": "augment",
    "DataError": "errors",
    "EvalLoader": "loader",
    "TwoViewLoader": "loader",
    "write_beton": "write",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastpred.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fastpred.data.{_EXPORTS[name]}"), name)

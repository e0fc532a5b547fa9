"""One exception type for user errors, so the CLIs can print one line and exit non-zero."""

from __future__ import annotations

import importlib
import sys


class DataError(Exception):
    """A user-facing data problem (missing path, not a .beton, missing field, empty dataset, missing FFCV)."""


def require_ffcv() -> None:
    # ffcv pulls in numba, OpenCV and libturbojpeg at import; its absence must read as one line, not a traceback.
    if "ffcv" in sys.modules:
        return
    import torch

    # Importing ffcv sets torch's thread count to 1 (ffcv.pipeline.compiler calls Compiler.set_num_threads(1) at
    # import): a run that only reads a .beton (the device-resident path) then trained on one core of two.
    threads = torch.get_num_threads()
    try:
        importlib.import_module("ffcv")
    except ImportError as e:
        raise DataError(
            f"FFCV is not installed ({e}); install it with `pip install 'fastpred[data]'` "
            "after `apt-get install libopencv-dev libturbojpeg0-dev pkg-config`"
        ) from None
    finally:
        torch.set_num_threads(threads)

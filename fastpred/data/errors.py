"""One exception type for user errors, so the CLIs can print one line and exit non-zero."""

from __future__ import annotations

import importlib


class DataError(Exception):
    """A user-facing data problem (missing path, not a .beton, missing field, empty dataset, missing FFCV)."""


def require_ffcv() -> None:
    # ffcv pulls in numba, OpenCV and libturbojpeg at import; its absence must read as one line, not a traceback.
    try:
        importlib.import_module("ffcv")
    except ImportError as e:
        raise DataError(
            f"FFCV is not installed ({e}); install it with `pip install 'fastpred[data]'` "
            "after `apt-get install libopencv-dev libturbojpeg0-dev pkg-config`"
        ) from None

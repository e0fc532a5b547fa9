"""A .beton's tables read with numpy alone: header, field descriptors, per-sample metadata, allocation table.

FFCV's own `Reader` does the same, but `import ffcv` costs seconds (numba compiles some of its functions at import:
3.8 s of CPU here) and FFCV is not installed everywhere a .beton is read (a GPU machine without its system
libraries). Validation and the device-resident path need only these tables; FFCV is imported when a pipeline is.
The layout is FFCV 1.0's (format version 2), little-endian: a header, one descriptor per field, the metadata table
(one aligned record per sample, a column per field), and at the header's `alloc_table_ptr` the allocation table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fastpred.data.errors import DataError

FORMAT_VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESCRIPTOR = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOCATION = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
#: FFCV's type ids of the fields whose metadata does not depend on their arguments: (class name, metadata dtype).
FIELD_KINDS = {
    0: ("FloatField", np.dtype("<f8")),
    1: ("IntField", np.dtype("<i8")),
    2: ("RGBImageField", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
}
#: The other ids FFCV knows (their metadata layout depends on arguments this reader does not parse).
OTHER_KINDS = {3: "BytesField", 4: "NDArrayField", 5: "JSONField", 6: "TorchTensorField", 255: "a custom field"}


@dataclass(frozen=True)
class BetonTables:
    """What a .beton says about its samples. `metadata` has a column per field, named f0, f1, ... in field order
    (FFCV's naming); `kinds` maps each field name to its FFCV class name."""

    path: str
    num_samples: int
    page_size: int
    kinds: dict[str, str]
    metadata: np.ndarray
    alloc_table: np.ndarray

    def column(self, field: str) -> str:
        return f"f{list(self.kinds).index(field)}"


def read_tables(path: str | os.PathLike) -> BetonTables:
    """The tables of the .beton at `path`; DataError (one line) when it is not one, or is cut short or damaged."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    not_beton = f"not a .beton file (bad header): {path}"
    if size < HEADER.itemsize:
        raise DataError(not_beton)
    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    page, n_fields = int(header["page_size"]), int(header["num_fields"])
    n, alloc_ptr = int(header["num_samples"]), int(header["alloc_table_ptr"])
    if (int(header["version"]) != FORMAT_VERSION or not 1 <= n_fields <= 255 or page < 1 << 21
            or page & (page - 1) or not 0 < alloc_ptr <= size):
        raise DataError(not_beton)
    descriptors_end = HEADER.itemsize + n_fields * FIELD_DESCRIPTOR.itemsize
    if descriptors_end > alloc_ptr:
        raise DataError(f"corrupt .beton {path}: its field descriptors run past its allocation table")
    descriptors = np.fromfile(path, dtype=FIELD_DESCRIPTOR, count=n_fields, offset=HEADER.itemsize)
    kinds, columns = {}, []
    for d in descriptors:
        name = d["name"].tobytes().split(b"\x00")[0].decode("ascii", "replace")
        type_id = int(d["type_id"])
        if type_id not in FIELD_KINDS:
            kind = OTHER_KINDS.get(type_id, f"type id {type_id}")
            raise DataError(f"field {name!r} of {path} is {kind}, which fastpred does not read (it reads "
                            f"{', '.join(k for k, _ in FIELD_KINDS.values())})")
        kinds[name], dtype = FIELD_KINDS[type_id]
        columns.append(("", dtype))
    metadata_type = np.dtype(columns, align=True)
    if descriptors_end + n * metadata_type.itemsize > alloc_ptr:
        raise DataError(f"corrupt .beton {path}: its metadata for {n} samples runs past its allocation table")
    if (size - alloc_ptr) % ALLOCATION.itemsize:
        raise DataError(f"corrupt .beton {path}: its allocation table is cut short")
    metadata = np.fromfile(path, dtype=metadata_type, count=n, offset=descriptors_end)
    alloc_table = np.fromfile(path, dtype=ALLOCATION, offset=alloc_ptr)
    for table in (metadata, alloc_table):
        table.setflags(write=False)
    return BetonTables(path, n, page, kinds, metadata, alloc_table)

"""Safetensors files, read through a memory map and written incrementally. Never unpickles anything.

The format is 8 bytes of little-endian header length, a JSON header, then raw little-endian tensor data.
Headers are validated before any data is touched; BF16 tensors come back as uint16 views (see `bf16`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import EdgecError
from .jsonio import loads, regular_file

DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1, "U32": 4, "I32": 4, "I64": 8, "F64": 8, "U16": 2,
              "BOOL": 1, "I16": 2, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
NP_DTYPE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8,
            "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32, "I32": np.int32, "I64": np.int64,
            "U64": np.uint64, "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}
MAX_HEADER = 100 * 1024 * 1024
_sync_file_range = None
if sys.platform == "linux":  # starts write-back of a range without waiting; a hint (the os module lacks it)
    try:
        _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):  # a libc without it: writes still work, write-back just starts later
        _sync_file_range = None
SYNC_FILE_RANGE_WRITE = 2


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `raw(name)` is a zero-copy numpy view."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = regular_file(self.path, "shard file").st_size
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise EdgecError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise EdgecError(f"{self.path}: header length {n} is larger than the file ({size} bytes)")
                if n > MAX_HEADER:
                    raise EdgecError(f"{self.path}: header of {n} bytes is over edgec's {MAX_HEADER >> 20} MiB "
                                     "limit (not a safetensors file?)")
                raw = f.read(n)
        except OSError as e:
            raise EdgecError(f"{self.path}: cannot read ({e.strerror})") from None
        header = loads(raw, f"{self.path}: corrupt safetensors header")
        if not isinstance(header, dict):
            raise EdgecError(f"{self.path}: corrupt safetensors header (not an object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, dict[str, Any]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (b, end) = e["dtype"], list(e["shape"]), e["data_offsets"]
                if not isinstance(dtype, str) or not all(type(v) is int for v in (*shape, b, end)):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise EdgecError(f"{self.path}: tensor {name}: malformed header entry") from None
            if dtype not in DTYPE_SIZE:
                raise EdgecError(f"{self.path}: tensor {name}: unsupported dtype {dtype}")
            if min(shape, default=0) < 0 or not (0 <= b <= end) or end - b != math.prod(shape) * DTYPE_SIZE[dtype]:
                raise EdgecError(f"{self.path}: tensor {name}: data_offsets [{b}, {end}] do not match "
                                 f"{dtype} {shape}")
            if end > data_size:
                raise EdgecError(f"{self.path}: tensor {name}: truncated file (data ends at byte "
                                 f"{self.data_start + end}, file has {size})")
            self.entries[name] = {"dtype": dtype, "shape": tuple(shape), "offsets": (b, end)}
        # as the safetensors library: tensors tile the data area exactly, no overlap, no gap, nothing after
        at, prev = 0, None
        for name, e in sorted(self.entries.items(), key=lambda kv: kv[1]["offsets"]):
            b, end = e["offsets"]
            if b != at:
                what = f"overlaps {prev}" if b < at else f"leaves {b - at} unused bytes after {prev or 'the header'}"
                raise EdgecError(f"{self.path}: tensor {name}: data_offsets [{b}, {end}] {what}")
            at, prev = end, name
        if at != data_size:
            raise EdgecError(f"{self.path}: {data_size - at} bytes after the last tensor (file not fully covered)")
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._file = open(self.path, "rb")  # kept open for `file_range`
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._base = np.frombuffer(self._mm, np.uint8).ctypes.data
        return self._mm

    def file_range(self, arr: np.ndarray) -> tuple[int, int] | None:
        """(fd, byte offset) of `arr` in this file if it is a contiguous view into the map, else None."""
        if self._mm is None or not arr.flags.c_contiguous:
            return None
        off = arr.ctypes.data - self._base
        return (self._file.fileno(), off) if 0 <= off <= len(self._mm) - arr.nbytes else None

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor (BF16 as uint16)."""
        e = self.entries[name]
        b, end = e["offsets"]
        arr = np.frombuffer(self._map(), dtype=NP_DTYPE[e["dtype"]], count=(end - b) // DTYPE_SIZE[e["dtype"]],
                            offset=self.data_start + b)
        return arr.reshape(e["shape"])

    def release_pages(self) -> None:
        """Tell the kernel we are done with the mapped pages so they leave our RSS (the page cache keeps them)."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
            self._mm = None
            self._file.close()


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor (or chunk by chunk) in a declared order.

    The header is written first from the declared (name, dtype, shape) list, so data can stream straight
    to disk; `write(name, array)` or several `write(name, chunk)` calls fill each tensor in order.
    The whole file is allocated up front and write-back starts after every write, so the disk works while
    the caller produces the rest and `close()` (which fsyncs) finds little left to flush.
    """

    def __init__(self, path: Path, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = metadata
        self.order: list[tuple[str, int]] = []
        off = 0
        for name, dtype, shape in entries:
            nb = math.prod(shape) * DTYPE_SIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
            self.order.append((name, nb))
            off += nb
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.header = struct.pack("<Q", len(blob)) + blob
        self.total = len(self.header) + off
        self.f: BinaryIO = open(self.path, "wb", buffering=0)
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(self.f.fileno(), 0, self.total)  # one extent, and a full disk fails now
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without it: just write
                    self.f.close()
                    raise
        self.pos = 0  # bytes written so far (the file is already full size)
        self._put(self.header)
        self._i = 0
        self._left = self.order[0][1] if self.order else 0

    def write(self, name: str, data: np.ndarray, source: tuple[int, int] | None = None) -> None:
        """Append `data` (all or the next chunk of tensor `name`). `source`: (fd, offset) of a file holding
        exactly these bytes (see `SafetensorsFile.file_range`); they are then copied inside the kernel."""
        if np.size(data) == 0 and any(n == name and nb == 0 for n, nb in self.order):
            return  # zero-size tensors have no bytes; they are skipped automatically
        while self._i < len(self.order) and self._left == 0 and self.order[self._i][1] == 0:
            self._advance()
        if self._i >= len(self.order) or self.order[self._i][0] != name:
            expected = self.order[self._i][0] if self._i < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path}: wrote {name} but {expected} was expected next")
        buf = np.ascontiguousarray(data)
        if buf.dtype.byteorder == ">":
            buf = buf.astype(buf.dtype.newbyteorder("<"))
        nb = buf.nbytes
        if nb > self._left:
            raise RuntimeError(f"{self.path}: {name}: {nb} bytes written, only {self._left} left")
        done = self._copy(*source, nb) if source is not None else 0
        self._put(memoryview(buf).cast("B")[done:])
        self._left -= nb
        if self._left == 0:
            self._advance()

    def _copy(self, fd: int, offset: int, nbytes: int) -> int:
        """copy_file_range as far as the platform and file systems allow; returns the bytes copied."""
        if not hasattr(os, "copy_file_range"):
            return 0
        done = 0
        try:
            while done < nbytes and (n := os.copy_file_range(fd, self.f.fileno(), nbytes - done, offset + done)):
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        self._written(done)
        return done

    def _put(self, b: memoryview | bytes) -> None:
        done = 0
        while done < len(b):
            done += self.f.write(b[done:])
        self._written(done)

    def _written(self, n: int) -> None:
        if _sync_file_range is not None and n:
            _sync_file_range(self.f.fileno(), self.pos, n, SYNC_FILE_RANGE_WRITE)
        self.pos += n

    def _advance(self) -> None:
        self._i += 1
        self._left = self.order[self._i][1] if self._i < len(self.order) else 0

    def close(self) -> None:
        while self._i < len(self.order) and self.order[self._i][1] == 0:
            self._advance()
        os.fsync(self.f.fileno())
        self.f.close()
        if self._i != len(self.order):
            raise RuntimeError(f"{self.path}: closed before {self.order[self._i][0]} was written")

    def abort(self) -> None:
        self.f.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---- bf16 without ml_dtypes ----------------------------------------------------------------------------
def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (NaN kept NaN)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded

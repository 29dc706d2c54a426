"""Safetensors reader/writer against the `safetensors` library, and bf16 conversion against torch."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgec.errors import EdgecError
from edgec.safetensors_io import SafetensorsFile, SafetensorsWriter, bf16_to_f32, f32_to_bf16


def tensors(rng):
    return {
        "a.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "b.blocks": rng.integers(0, 256, size=(3, 2, 16), dtype=np.uint8),
        "c.ids": rng.integers(-5, 5, size=(11,), dtype=np.int64),
        "d.empty": np.zeros((0, 4), dtype=np.float16),
        "e.half": rng.standard_normal((4, 3)).astype(np.float16),
    }
DT = {np.float32: "F32", np.uint8: "U8", np.int64: "I64", np.float16: "F16"}


def test_writer_output_reads_in_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    ts = tensors(rng)
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [(n, DT[a.dtype.type], a.shape) for n, a in ts.items()], {"format": "pt"}) as w:
        for n, a in ts.items():
            if a.shape[0] > 2:  # chunked along rows
                w.write(n, a[:2])
                w.write(n, a[2:])
            else:
                w.write(n, a)
    back = load_file(path)
    assert back.keys() == ts.keys()
    for n, a in ts.items():
        assert back[n].dtype == a.dtype and np.array_equal(back[n], a)
    (hlen,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert hlen % 8 == 0  # data starts 8-byte aligned, as the published files do
    assert json.loads(path.read_bytes()[8 : 8 + hlen])["__metadata__"] == {"format": "pt"}


def test_reader_reads_safetensors_library_output_zero_copy(tmp_path):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(1)
    ts = {k: v for k, v in tensors(rng).items() if v.size}
    bf = torch.randn(6, 10, dtype=torch.float32).to(torch.bfloat16)
    save_file({**{k: torch.from_numpy(v) for k, v in ts.items()}, "z.bf16": bf}, tmp_path / "y.safetensors",
              metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "y.safetensors")
    assert f.metadata == {"format": "pt"}
    for n, a in ts.items():
        got = f.raw(n)
        assert got.dtype == a.dtype and np.array_equal(got, a)
        assert not got.flags.writeable and not got.flags.owndata  # a view on the read-only map
    z = f.raw("z.bf16")
    assert f.entries["z.bf16"]["dtype"] == "BF16" and z.dtype == np.uint16
    assert np.array_equal(bf16_to_f32(z), bf.float().numpy())
    f.close()


def test_writer_enforces_declared_order_and_sizes(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (2,)), ("b", "U8", (3,))])
    with pytest.raises(RuntimeError, match="b was written but|a was expected"):
        w.write("b", np.zeros(3, np.uint8))
    with pytest.raises(RuntimeError, match="only 8 left"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="closed before b"):
        w.close()


@pytest.mark.parametrize("in_kernel", [True, False])
def test_writer_copies_views_of_a_source_file(tmp_path, monkeypatch, in_kernel):
    if not in_kernel:  # platforms without copy_file_range write the same bytes from the view
        monkeypatch.delattr("os.copy_file_range", raising=False)
    ts = {k: v for k, v in tensors(np.random.default_rng(3)).items() if v.size}
    src = tmp_path / "src.safetensors"
    with SafetensorsWriter(src, [(n, DT[a.dtype.type], a.shape) for n, a in ts.items()]) as w:
        for n, a in ts.items():
            w.write(n, a)
    f = SafetensorsFile(src)
    views = {n: f.raw(n) for n in ts}
    assert f.file_range(views["b.blocks"]) == (f._file.fileno(), f.data_start + f.entries["b.blocks"]["offsets"][0])
    assert f.file_range(views["a.weight"][:, 1:]) is None and f.file_range(ts["a.weight"]) is None
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, [(n, DT[a.dtype.type], a.shape) for n, a in reversed(ts.items())]) as w:
        for n in reversed(ts):
            w.write(n, views[n][:1], source=f.file_range(views[n][:1]))  # chunks: first row, then the rest
            w.write(n, views[n][1:], source=f.file_range(views[n][1:]))
    back = SafetensorsFile(out)
    assert all(np.array_equal(back.raw(n), a) for n, a in ts.items())
    f.close()
    back.close()


def test_bf16_conversion_matches_torch():
    import torch

    rng = np.random.default_rng(2)
    x = np.concatenate([
        (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32),
        # exact ties (low 16 bits 0x8000) with even and odd kept mantissas: round half to even
        (rng.integers(0, 2**31, 2000, dtype=np.uint32) & 0xFFFF0000 | 0x8000).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, -1e-45, 1.0, 65504.0], np.float32),
    ])
    x = x[np.isfinite(x) | np.isinf(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16(x), want)
    assert np.array_equal(bf16_to_f32(want), torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float()
                          .numpy())
    nan = f32_to_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(bf16_to_f32(nan)).all()


def header_file(tmp_path, header: dict, data: bytes = b"", claimed: int | None = None):
    blob = json.dumps(header).encode()
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(blob) if claimed is None else claimed) + blob + data)
    return p


@pytest.mark.parametrize("header,data,claimed,message", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated file"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "header length 1000000000 is "
     "larger than the file"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None, "data_offsets .* do not match"),
    ({"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype Q7"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, b"\0" * 8, None, "malformed header entry"),
    ({"t": {"dtype": "F32"}}, b"", None, "malformed header entry"),
    ({"t": "nonsense"}, b"", None, "malformed header entry"),
])
def test_bad_headers_are_one_line_errors(tmp_path, header, data, claimed, message):
    p = header_file(tmp_path, header, data, claimed)
    with pytest.raises(EdgecError, match=message) as e:
        SafetensorsFile(p)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_garbage_and_tiny_files(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes(b"\x05\0\0\0\0\0\0\0{abc}")
    with pytest.raises(EdgecError, match="corrupt safetensors header"):
        SafetensorsFile(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(EdgecError, match="truncated safetensors file"):
        SafetensorsFile(p)

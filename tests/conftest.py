"""Shared fixtures: synthetic checkpoints made once per session, and transformers as the oracle (fp32)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(SHARED / "data"))
# Tests (and the commands they run in subprocesses) write no cache into the user's home: edgec's cache and the
# Hugging Face cache live in a temporary folder removed at exit, and nothing is downloaded.
_CACHES = Path(tempfile.mkdtemp(prefix="edgec-tests-"))
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ["EDGEC_CACHE_DIR"] = str(_CACHES / "edgec")
os.environ["HF_HOME"] = str(_CACHES / "huggingface")
os.environ["HF_HUB_CACHE"] = str(_CACHES / "huggingface" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"


def make_ckpt(root: Path, preset: str = "tiny", layout: str = "both", seed: int = 0, scale_spread: int | None = None,
              **overrides) -> Path:
    from edgec.spec import preset as make
    from edgec.synth import SCALE_SPREAD, synthesize

    return synthesize(make(preset, **overrides), root, seed=seed, layout=layout,
                      scale_spread=SCALE_SPREAD if scale_spread is None else scale_spread)


def record_progress(monkeypatch, module) -> list[tuple[int, int]]:
    """Replace `module.byte_progress` by a bar that asserts it never passes its total; the returned list gets each
    finished bar's (done, total)."""
    from contextlib import contextmanager

    seen: list[tuple[int, int]] = []

    @contextmanager
    def progress(total, description, enabled=True):
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            assert done[0] <= total, (done[0], total)

        yield advance
        seen.append((done[0], total))

    monkeypatch.setattr(module, "byte_progress", progress)
    return seen


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The shared test model: tiny preset with 3 layers (odd), 8 heads / 2 kv heads, top-4 of 8 experts, both
    layouts (HF at the root, OpenAI's in original/), real o200k_harmony vocabulary."""
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny3", num_hidden_layers=3)


@pytest.fixture(scope="session")
def wide(tmp_path_factory) -> Path:
    """A checkpoint from tests/independent_ckpt.py (not `edgec synth`): heavy-tailed real values encoded to MXFP4
    with block scales spanning 10+ binades within every expert row, odd shapes (3 layers, hidden 160, intermediate
    96, 5 q heads on 1 kv head, 6 experts, top 3), real vocabulary; HF layout written by the safetensors library."""
    from independent_ckpt import write

    return write(tmp_path_factory.mktemp("ckpt") / "wide", seed=0)


@pytest.fixture(scope="session")
def tiny_mlx(tiny, tmp_path_factory) -> Path:
    """`tiny` converted with `edgec convert -t mlx` (read-only: copy it before damaging it)."""
    from edgec.convert import run_convert

    return Path(run_convert(tiny, "mlx", tmp_path_factory.mktemp("conv") / "tiny-mlx", progress=False)["out"])


@pytest.fixture(scope="module")
def slice120_mlx(tmp_path_factory) -> Iterator[Path]:
    """A 2-layer slice of the 120b shapes (`edgec synth --preset 120b --layers 2`, 5.8 GB, about a minute to
    write here) converted to mlx; the HF source is removed once converted, the output when the module ends (disk:
    11.6 GB at the peak). Read-only."""
    from edgec.convert import run_convert

    src = make_ckpt(tmp_path_factory.mktemp("ckpt") / "s120", "120b", layout="hf", num_hidden_layers=2)
    try:
        out = Path(run_convert(src, "mlx", tmp_path_factory.mktemp("conv") / "s120-mlx", progress=False)["out"])
    finally:
        shutil.rmtree(src)
    yield out
    shutil.rmtree(out)


@pytest.fixture(scope="session")
def tiny_onnx(tiny, tmp_path_factory) -> Path:
    """`tiny` converted with `edgec convert -t onnx-cpu` (MXFP4 experts as stored, fp32 dense; read-only)."""
    from edgec.convert import run_convert

    return Path(run_convert(tiny, "onnx-cpu", tmp_path_factory.mktemp("conv") / "tiny-onnx", progress=False)["out"])


@pytest.fixture(scope="session")
def ids300() -> list[int]:
    """300 token ids: a Harmony-looking prefix, then random ordinary and special tokens."""
    rng = np.random.default_rng(1)
    head = [200006, 17360, 200008, 3575, 553, 261, 200007, 200006, 1428, 200008]
    return head + [int(t) for t in rng.integers(0, 199998, size=290)]


@pytest.fixture(scope="session")
def ids_long() -> list[int]:
    """4,501 token ids, for checks at positions 4,200-4,500 (past the 4,096 YaRN original context)."""
    rng = np.random.default_rng(2)
    return [int(t) for t in rng.integers(0, 199998, size=4501)]


@lru_cache(maxsize=8)
def _hf_logits_cached(path: str, ids: tuple[int, ...]) -> np.ndarray:
    import torch
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """transformers' GptOssForCausalLM logits in float32 (eager attention): the independent oracle."""
    return _hf_logits_cached(str(path), tuple(ids))


def pytest_report_header(config) -> str:
    """Which BLAS kernel numpy's float32 sums ran on (OPENBLAS_CORETYPE picks another; README "Tolerances")."""
    import numpy  # noqa: F401  (loads the BLAS threadpoolctl reports)
    from threadpoolctl import threadpool_info

    return "blas: " + ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
                                for i in threadpool_info())

"""GPU check (issue 15): one prepared script that proves edgec's GPU paths on a lent CUDA machine.

What it does, in order, each step under its own time limit (a failed step is recorded with its error and the next
step still runs; the report is rewritten after every step, so even a killed run leaves one):
  install   onnxruntime-gpu + onnxruntime-genai-cuda and mlx + mlx-cuda-13 + mlx-lm into a --target folder
  synth     the tiny model, and a 2-layer slice of the 20b shape
  convert   tiny: onnx-cuda (mxfp4 experts, the default, and exact), onnx-trt-rtx (only when onnxruntime has its
            provider), mlx; slice: onnx-cuda (mxfp4), mlx, and the onnxruntime-genai builder's `-e cuda -p int4`
  parity    `edgec parity` on each tiny output; ONNX folders twice: edgec's own loop, and onnxruntime-genai's
            generator (the same `edgec parity` with the backend swapped for a generator adapter); on the slice,
            onnx-cuda mxfp4 (both runtimes) and mlx
  bench     prefill and decode tok/s and peak GPU memory on the slice, each measurement in its own process:
            edgec's loop and onnxruntime-genai on edgec's onnx-cuda folder, onnxruntime-genai on the builder's;
            edgec's MLX runtime and mlx-lm on edgec's MLX folder
  report    gpu-check.json, gpu-check.md (and the step logs, gpu-check-logs.tar.gz) under $OUT or out/gpu-check/

The lent machine reaches NO package registry (device README, KINDS.md: "nothing outside it can be reached"), and a
call carries at most 64 MiB. Its image already has python3 3.12, torch (CUDA 13), transformers, onnx, onnx-ir,
safetensors, click, rich, numpy and the CUDA 13 / cuDNN 9 libraries as pip packages (nvidia-*), which is what the
pinned wheels below need. The wheels themselves (~350 MiB: onnxruntime-gpu alone is 244 MiB) travel in parts:

  here, once, in the checkout the device tool sends (the lead's):
      make gpu-wheels          # = .venv/bin/python bench/gpu_check.py prepare; 6 parts; prints the call plan
  then one device `run` per part, back to back (the machine is given back 30 s after a call ends):
      command: python3 bench/gpu_check.py stash      carry: [".cache/gpu-check/parts/part-01.tar"]  timeout_s: 90
      ...                                            (part-02 ... part-05, each with its own call)
  and the check itself with the last part:
      command: PYTHONUNBUFFERED=1 python3 bench/gpu_check.py run --budget 420
      carry: [".cache/gpu-check/parts/part-06.tar"]  timeout_s: 540
  Each `stash` prints the parts still missing ("carry next: ..."): if earlier parts show up missing again, the machine
  was given back in between and the parts must be carried again. Device time: a start (1-2 min) + 5 short calls
  + at most 7 minutes of check = about 11-13 of the 15 minutes; no room for a second full run.

`stash` unpacks a part into /var/tmp/edgec-gpu-check (outside the repository copy), joins finished wheels and checks
their sha256; the first `stash` also starts the CPU-only preparation (synth, edgec conversions, and, once the ONNX
wheels are whole, their install and the builder) in the background, so that it runs while the other parts travel.
`run` waits for that background work, reuses what it finished, and does the rest. A rerun on the same warm machine
reuses the install, the checkpoints and the conversions and measures again (`--only parity` etc. narrows it).
Where a machine does reach the registries, `run` downloads missing wheels with pip itself (cached in
.cache/gpu-check/wheels/).

Time budget on an H100 machine (16 cores), seconds: limit per step / expected. The expected figures are estimates
from the team's 2-core machine (slice: synth 20 s, onnx-cuda convert 14 s, mlx 7 s, builder `-e cuda -p int4` 152 s
at 13.7 GB peak RSS) until the first GPU run replaces them. `--budget` (default 420) caps the whole run: a step
that would pass it gets the time that is left and, below 5 s, is skipped as "out of time budget"; the report is
always written.
  install (pip --target from local wheels)       120 / 25      done in the background when possible
  runtimes (providers, devices, versions)        60 / 10
  synth tiny / slice                             30 / 2,  90 / 15      background
  convert tiny x4                                30 each / 2           background
  convert slice onnx-cuda, mlx                   90 / 15, 60 / 7       background
  builder slice -e cuda -p int4                  240 / 90              background once the ONNX wheels are whole
  parity tiny x7                                 60 each / 8
  bench slice x5 (warm-up, prefill 512, decode 128)  90 each / 15
  parity slice x3                                120 each / 30
  total expected in the final call: ~25 + 10 + 56 + 75 + 90 = ~260 s (+ the builder if it did not finish before)

`--dry-run` (CPU, what the test suite runs): no installs; the tiny model plays the slice too; every ONNX graph runs
on onnxruntime's CPU provider where it has kernels (fp16 GQA, int8/int4 QMoE do), the onnx-cuda mxfp4 graph is
recorded as an expected skip (onnxruntime's CPU fp4 QMoE kernel runs onnx-cpu's row-major fp32 graphs, not onnx-cuda's
N-packed fp16 one); MLX runs on mlx[cpu]. Exit code: 0 when every step passed or was skipped with a reason, 1 when a
parity bound failed (a finding, in the report), 2 when a step broke.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PY = sys.executable

# ---- what gets installed on the GPU machine (PyPI names, checked 2026-11; see README "GPU check") -------------------
# onnxruntime-gpu 1.31.1: CUDA 13.0 build (capi/build_and_package_info.py), needs nvidia-cuda-runtime 13, cufft 12,
#   curand 10, nvrtc 13, cudnn-cu13 9 (its [cuda,cudnn] extras), all in the machine's image
# onnxruntime-genai-cuda 0.18.0: requires onnxruntime-gpu>=1.31.0; ships the builder (onnxruntime_genai.models.builder)
# mlx-cuda-13 0.32.4: libmlx.so for CUDA 13 (cublas 13, cufft 12, cusolver 12, nvrtc 13, cudnn-cu13 9, nccl-cu13);
#   `mlx[cuda13]` = mlx + mlx-cuda-13 (`mlx[cuda]` means mlx-cuda-12, which the CUDA 13 image cannot feed)
# mlx-lm 0.32.2: the MLX peer (pure python)
# Order matters: the ONNX group comes first in the parts, so it is whole (and the builder can start) one call earlier.
PINS = {"onnx": ["onnxruntime-genai-cuda==0.18.0", "onnxruntime-gpu==1.31.1"],
        "mlx": ["mlx==0.32.4", "mlx-cuda-13==0.32.4", "mlx-lm==0.32.2"]}
PY_TAG = "3.12"  # the image's python3 (KINDS.md: Python 3.12.3)
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]
PART_MIB = 61  # + the repository (~2 MiB) stays under the device tool's 64 MiB per call
LOCAL_CACHE = REPO / ".cache" / "gpu-check"  # gitignored: wheels/ and parts/ made by `prepare`
DEVICE_HOME = Path(os.environ.get("EDGEC_GPU_HOME", "/var/tmp/edgec-gpu-check"))  # outside the repository copy

# ---- every edgec CLI call the check makes, in one place (other branches are changing the CLI: adjust here) ----------
EDGEC = ["-m", "edgec"]
CLI = {
    "synth": lambda out, preset, layers: ["synth", out, "--preset", preset, *(["--layers", layers] if layers else [])],
    "convert": lambda src, target, experts, out: ["convert", src, "-t", target, "-o", out, "--json",
                                                  *(["--experts", experts] if experts else [])],
    "parity": lambda src, out, report, extra: ["parity", src, out, "--report", report, *extra],
}
# dry run: edgec's loop on the CPU provider whatever the folder's target (the CLI has no provider option)
FORCE_CPU = ("import functools, edgec.runtime.onnx_backend as b; b.OnnxBackend.__init__ = functools.partialmethod("
             "b.OnnxBackend.__init__, provider='CPUExecutionProvider'); from edgec.cli import main; main()")
# `edgec parity` with onnxruntime-genai's generator as the runtime under test (GenaiBackend below)
WITH_GENAI = ("import sys; sys.path.insert(0, {here!r}); import gpu_check; gpu_check.use_genai_backend(cpu={cpu})"
              "; from edgec.cli import main; main()")

NO_FP4_CPU = ("onnx-cuda's fp4 QMoE (N-packed, fp16) needs the CUDA provider: onnxruntime's CPU fp4 kernel runs only "
              "onnx-cpu's row-major fp32 layout")

# ---- sizes -------------------------------------------------------------------------------------------------------
GPU_SIZES = {"prompt": 512, "tokens": 128}
DRY_SIZES = {"prompt": 32, "tokens": 8}


# =====================================================================================================================
# wheels: prepare (here) -> parts -> stash (device) -> install
# =====================================================================================================================
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def wheel_name(pin: str) -> str:
    return pin.split("==")[0].replace("-", "_").lower()


def find_wheel(folder: Path, pin: str) -> Path | None:
    name, version = wheel_name(pin), pin.split("==")[1]
    return next((p for p in sorted(folder.glob("*.whl")) if p.name.lower().startswith(f"{name}-{version}-")), None)


def pip_download(pins: list[str], dest: Path, timeout: int = 600, quick: bool = False) -> subprocess.CompletedProcess:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PY_TAG,
           "--implementation", "cp", "-d", str(dest), *[a for p in PLATFORMS for a in ("--platform", p)], *pins]
    if quick:  # on a machine that may reach no registry: fail fast
        cmd[4:4] = ["--timeout", "5", "--retries", "0"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def split_parts(wheels: list[tuple[str, Path]], parts_dir: Path, part_bytes: int) -> dict:
    """Cut the wheels (in order) into tar parts of at most part_bytes; every part also holds the manifest."""
    room = part_bytes - (1 << 20)  # tar headers and the manifest
    plan: list[list[tuple[str, Path, int, int]]] = [[]]  # per part: (chunk name, wheel, offset, length)
    manifest: dict[str, Any] = {"wheels": [], "chunk_part": {}}
    for group, w in wheels:
        size, off, chunks = w.stat().st_size, 0, []
        while off < size:
            if sum(ch[3] for ch in plan[-1]) >= room:
                plan.append([])
            n = min(size - off, room - sum(ch[3] for ch in plan[-1]))
            name = f"{w.name}.{len(chunks):03d}"
            plan[-1].append((name, w, off, n))
            manifest["chunk_part"][name] = f"part-{len(plan):02d}.tar"
            chunks.append(name)
            off += n
        manifest["wheels"].append({"file": w.name, "group": group, "size": size, "sha256": sha256(w),
                                   "chunks": chunks})
    manifest["parts"] = [f"part-{i + 1:02d}.tar" for i in range(len(plan))]
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part-*.tar"):
        old.unlink()
    blob = json.dumps(manifest, indent=1).encode()
    for pname, chunks in zip(manifest["parts"], plan, strict=True):
        with tarfile.open(parts_dir / pname, "w") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            for cname, w, off, n in chunks:
                with open(w, "rb") as f:
                    f.seek(off)
                    info = tarfile.TarInfo(f"chunks/{cname}")
                    info.size = n
                    tar.addfile(info, io.BytesIO(f.read(n)))
    return manifest


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (the stash is touched by `stash` calls and the background prep at once)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def stash_parts(parts: list[Path], stash: Path) -> dict:
    """Unpack carried parts into the stash; join every wheel whose chunks are all there (sha256 checked)."""
    with locked(stash / ".lock"):
        unpack(parts, stash)
    return stash_status(stash)


def unpack(parts: list[Path], stash: Path) -> None:
    chunks_dir, done = stash / "chunks", stash / "parts-done.json"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    for p in parts:
        with tarfile.open(p) as tar:
            manifest = tar.extractfile("manifest.json").read()
            if (stash / "manifest.json").is_file() and (stash / "manifest.json").read_bytes() != manifest:
                shutil.rmtree(chunks_dir)  # parts of another `prepare`: start over
                chunks_dir.mkdir()
                done.unlink(missing_ok=True)
            seen = json.loads(done.read_text()) if done.is_file() else {}
            if seen.get(p.name) == p.stat().st_size:  # still in the repository copy from an earlier call
                continue
            for m in tar.getmembers():
                name = Path(m.name).name
                if not m.isfile() or m.name not in ("manifest.json", f"chunks/{name}"):
                    continue
                dest = stash / name if name == "manifest.json" else chunks_dir / name
                tmp = dest.with_name(dest.name + ".tmp")
                with tar.extractfile(m) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                tmp.replace(dest)
            seen[p.name] = p.stat().st_size
            done.write_text(json.dumps(seen))


def stash_status(stash: Path) -> dict:
    """Join the wheels whose chunks are all in the stash; say which groups are whole and which parts are missing."""
    with locked(stash / ".lock"):
        return join_wheels(stash)


def join_wheels(stash: Path) -> dict:
    mf = stash / "manifest.json"
    if not mf.is_file():
        return {"groups": {}, "missing_parts": None, "errors": [], "complete": []}
    manifest = json.loads(mf.read_text())
    chunks_dir, wheels_dir = stash / "chunks", stash / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    complete, errors, missing = [], [], set()
    for w in manifest["wheels"]:
        target = wheels_dir / w["file"]
        if not (target.is_file() and target.stat().st_size == w["size"]):
            absent = [ch for ch in w["chunks"] if not (chunks_dir / ch).is_file()]
            if absent:
                missing.update(manifest["chunk_part"][ch] for ch in absent)
                continue
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as out:
                for ch in w["chunks"]:
                    with open(chunks_dir / ch, "rb") as f:
                        shutil.copyfileobj(f, out)
            if sha256(tmp) != w["sha256"]:
                errors.append(f"{w['file']}: sha256 differs after joining its chunks")
                tmp.unlink()
                continue
            tmp.replace(target)
        for ch in w["chunks"]:  # joined (a part carried twice brings them back)
            (chunks_dir / ch).unlink(missing_ok=True)
        complete.append(w["file"])
    groups = {g: all(w["file"] in complete for w in manifest["wheels"] if w["group"] == g)
              for g in dict.fromkeys(w["group"] for w in manifest["wheels"])}
    return {"groups": groups, "missing_parts": sorted(missing), "errors": errors, "complete": complete}


def carried_parts() -> list[Path]:
    return sorted((LOCAL_CACHE / "parts").glob("part-*.tar"))


def cmd_prepare(a: argparse.Namespace) -> int:
    """Here (a machine that reaches PyPI): download the pinned wheels and cut them into parts for the device tool."""
    wheels_dir = LOCAL_CACHE / "wheels"
    wheels = []
    for group, pins in PINS.items():
        for pin in pins:
            w = find_wheel(wheels_dir, pin)
            if w is None:
                r = pip_download([pin], wheels_dir)
                w = find_wheel(wheels_dir, pin)
                if r.returncode != 0 or w is None:
                    print(f"pip download {pin} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                    return 1
            wheels.append((group, w))
            print(f"{w.stat().st_size / 2**20:8.1f} MiB  {w.name}")
    manifest = split_parts(wheels, LOCAL_CACHE / "parts", a.part_mib << 20)
    travel = repo_travel_bytes()
    parts = manifest["parts"]
    biggest = max((LOCAL_CACHE / "parts" / p).stat().st_size for p in parts)
    print(f"\n{len(parts)} parts in {LOCAL_CACHE / 'parts'}; the repository sends {travel / 2**20:.1f} MiB, "
          f"+ the largest part {biggest / 2**20:.1f} MiB = {(travel + biggest) / 2**20:.1f} MiB per call (limit 64)")
    if travel + biggest > 63 << 20:
        print("too large for one call: rerun with a smaller --part-mib", file=sys.stderr)
        return 1
    rel = (LOCAL_CACHE / "parts").relative_to(REPO)
    print("\ndevice calls, back to back on one warm machine:")
    for p in parts[:-1]:
        print(f'  run  command="python3 bench/gpu_check.py stash"  carry=["{rel}/{p}"]  timeout_s=90')
    print(f'  run  command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py run --budget 420"  '
          f'carry=["{rel}/{parts[-1]}"]  timeout_s=540')
    return 0


def repo_travel_bytes() -> int:
    """Bytes the device tool sends without carry: tracked files and untracked files git does not ignore."""
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True)
    names = [n for n in r.stdout.decode().split("\0") if n]
    return sum((REPO / n).stat().st_size for n in names if (REPO / n).is_file())


def cmd_stash(a: argparse.Namespace) -> int:
    """Device: keep the carried part(s); print what is whole and what to carry next; start the background prep."""
    status = stash_parts(carried_parts(), DEVICE_HOME / "stash")
    print(json.dumps({k: status[k] for k in ("groups", "missing_parts", "errors") if k in status}))
    missing = status["missing_parts"]
    print("nothing carried yet" if missing is None else f"carry next: {missing[0]}" if missing else
          "every part is here: run the check (python3 bench/gpu_check.py run)")
    print(env_line())
    if not a.no_prep:
        start_background_prep()
    return 0 if not status.get("errors") else 1


def env_line() -> str:
    r = run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    return f"python {platform.python_version()} ({PY}); GPU: {r or 'none'}"


def run_quiet(cmd: list[str], timeout: int = 20, env: dict | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def start_background_prep() -> None:
    work = DEVICE_HOME / "work"
    work.mkdir(parents=True, exist_ok=True)
    pidfile = work / "prep.pid"
    if pidfile.is_file():
        with suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text()), 0)
            print("background prep already running")
            return
    log = open(work / "prep.log", "a")
    p = subprocess.Popen([PY, str(Path(__file__).resolve()), "run", "--stage", "prep", "--budget", "1500"], stdout=log,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    pidfile.write_text(str(p.pid))
    print(f"background prep started (pid {p.pid}, log {work / 'prep.log'})")


# =====================================================================================================================
# runtime probes (run in child processes; the parent never imports onnxruntime or mlx)
# =====================================================================================================================
class GenaiBackend:
    """onnxruntime-genai's generator behind edgec's Backend calls that `edgec parity` makes (reset, forward)."""

    name = "onnxruntime-genai"

    def __init__(self, folder: str | Path, max_context: int | None = None, cpu: bool = False):
        import onnxruntime_genai as og

        from edgec import manifest

        self.og, self.folder = og, Path(folder)
        self.config = manifest.read(self.folder).config
        cfg = og.Config(str(self.folder))
        if cpu:
            cfg.clear_providers()
        self.model = og.Model(cfg)
        self.max_length = max(int(max_context or 512), 256)  # GQA's sliding cache needs >= window 128
        self.reset()

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.gen, self.length = self.og.Generator(self.model, params), 0

    def forward(self, ids, all_logits: bool = False):
        import numpy as np

        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        self.gen.append_tokens(ids)
        self.length += ids.shape[1]
        logits = np.asarray(self.gen.get_output("logits"), dtype=np.float32).reshape(ids.shape[1], -1)
        return logits if all_logits else logits[-1:]

    def truncate(self, n: int) -> None:
        raise NotImplementedError("onnxruntime-genai's generator cannot roll back")


def use_genai_backend(cpu: bool) -> None:
    """Make `edgec parity` (run_parity's load_backend) open ONNX folders with onnxruntime-genai's generator."""
    import edgec.runtime.base as base

    plain = base.load_backend

    def load(folder, max_context=None, **kw):
        if base.target_of(Path(folder)).startswith("onnx"):
            return GenaiBackend(folder, max_context, cpu=cpu)
        return plain(folder, max_context, **kw)

    base.load_backend = load


def probe_runtimes() -> dict:
    """Versions, providers and devices as the child processes will see them."""
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version(), "versions": {}}
    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-genai-cuda", "onnxruntime-genai", "mlx",
                 "mlx-cuda-13", "mlx-cpu", "mlx-lm", "onnx", "onnx-ir", "torch", "transformers", "numpy",
                 "safetensors", "click", "rich", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cublas"):
        with suppress(metadata.PackageNotFoundError):
            out["versions"][dist] = metadata.version(dist)
    try:
        import onnxruntime as ort  # CUDA libraries: found through LD_LIBRARY_PATH, as in every other child

        out["onnxruntime"] = {"file": ort.__file__, "version": ort.__version__,
                              "providers": ort.get_available_providers(), "device": ort.get_device()}
    except Exception as e:
        out["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
    try:  # a provider that is listed may still not load (missing CUDA libraries): open a session on it
        from onnx import TensorProto, helper

        x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in "xy")
        m = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "t", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
        out["onnxruntime"]["cuda_session"] = sess.get_providers()
    except Exception as e:
        out["onnxruntime"]["cuda_session"] = f"{type(e).__name__}: {e}"
    try:
        import onnxruntime_genai as og

        out["onnxruntime_genai"] = {"version": og.__version__, "cuda": bool(og.is_cuda_available())}
    except Exception as e:
        out["onnxruntime_genai"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import mlx.core as mx

        out["mlx"] = {"version": mx.__version__, "device": str(mx.default_device()),
                      "gpu": "gpu" in str(mx.default_device())}
        out["mlx"]["sum"] = float(mx.sum(mx.ones((256, 256)) @ mx.ones((256, 256))).item())  # runs a kernel
    except Exception as e:
        out["mlx"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def probe_bench(kind: str, folder: str, prompt: int, tokens: int, cpu: bool) -> dict:
    """One measurement: load, warm-up, timed prefill of `prompt` tokens, `tokens` greedy decode steps."""
    import numpy as np

    ids = [int(t) for t in np.random.default_rng(0).integers(0, 199998, size=prompt)]
    warm = ids[:16]
    res: dict[str, Any] = {"kind": kind, "prompt": prompt, "tokens": tokens}
    t0 = time.perf_counter()
    if kind == "edgec":
        from edgec.runtime.base import load_backend, target_of

        kw = {"provider": "CPUExecutionProvider"} if cpu and target_of(Path(folder)).startswith("onnx") else {}
        b = load_backend(folder, max_context=prompt + tokens + 16, **kw)
        t1 = time.perf_counter()
        b.forward(warm)
        b.forward([int(warm[0])])
        b.reset()
        t2 = time.perf_counter()
        nxt = int(b.forward(ids)[-1].argmax())
        t3 = time.perf_counter()
        out = [nxt]
        for _ in range(tokens - 1):
            nxt = int(b.forward([nxt])[-1].argmax())
            out.append(nxt)
        t4 = time.perf_counter()
        res.update(backend=type(b).__name__, kv_bytes=int(b.kv_bytes()))
        if hasattr(b, "session"):  # the ONNX loop: the providers its session got, whether its KV shares buffers
            res.update(providers=b.session.get_providers(), kv_shared=getattr(b, "share", None))
    elif kind == "genai":
        import onnxruntime_genai as og

        cfg = og.Config(folder)
        if cpu:
            cfg.clear_providers()
        model = og.Model(cfg)

        def generator():
            p = og.GeneratorParams(model)
            p.set_search_options(max_length=max(prompt + tokens + 16, 256), do_sample=False)
            return og.Generator(model, p)

        t1 = time.perf_counter()
        g = generator()
        g.append_tokens(np.array([warm], dtype=np.int32))
        g.generate_next_token()
        del g
        g = generator()
        t2 = time.perf_counter()
        g.append_tokens(np.array([ids], dtype=np.int32))  # the prefill (a synchronous session run)
        g.generate_next_token()  # picks the first token and runs it: counted as prefill (time to first token)
        t3 = time.perf_counter()
        for _ in range(tokens - 1):
            g.generate_next_token()
        out = [int(t) for t in g.get_sequence(0)[prompt:]]
        t4 = time.perf_counter()
    elif kind == "mlx_lm":
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model

        model = load_model(Path(folder))[0]
        t1 = time.perf_counter()
        for _ in zip(range(2), generate_step(mx.array(warm), model, max_tokens=2), strict=False):
            pass
        t2 = time.perf_counter()
        gen = generate_step(mx.array(ids), model, max_tokens=tokens)
        out = [int(next(gen)[0])]
        t3 = time.perf_counter()
        out += [int(t) for t, _ in gen]
        t4 = time.perf_counter()
    else:
        raise SystemExit(f"unknown probe kind {kind}")
    if kind in ("mlx_lm",) or (kind == "edgec" and res.get("backend", "").startswith("Mlx")):
        import mlx.core as mx

        res["mlx_peak_bytes"] = int(mx.get_peak_memory())
        res["mlx_device"] = str(mx.default_device())
    decoded = len(out) - 1
    res.update(load_s=t1 - t0, warmup_s=t2 - t1, ttft_s=t3 - t2, prefill_tok_s=prompt / (t3 - t2),
               decode_tok_s=decoded / (t4 - t3) if decoded > 0 else None, out_tokens=out[:16])
    return res


# =====================================================================================================================
# steps
# =====================================================================================================================
class Skip(Exception):
    pass


class StepError(Exception):
    pass


class GpuPoll:
    """Peak GPU memory while a child runs: the device's used memory (minus the baseline before the child started)
    and, where NVML lists processes, the child's own. NVML (nvidia-ml-py, in the image) or nvidia-smi polling."""

    def __init__(self, pid: int, baseline: int | None):
        self.pid, self.baseline, self.device_peak, self.process_peak = pid, baseline, None, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop.wait(0.1):
            used, procs = gpu_memory()
            if used is not None:
                self.device_peak = max(self.device_peak or 0, used)
            mine = procs.get(self.pid)
            if mine is not None:
                self.process_peak = max(self.process_peak or 0, mine)

    def result(self) -> dict:
        self.stop.set()
        self.thread.join(1)
        if self.device_peak is None:
            return {}
        out = {"gpu_peak_device_mib": round((self.device_peak - (self.baseline or 0)) / 2**20, 1)}
        if self.process_peak is not None:
            out["gpu_peak_process_mib"] = round(self.process_peak / 2**20, 1)
        return out


_NVML: Any = None


def gpu_memory() -> tuple[int | None, dict[int, int]]:
    """(bytes used on GPU 0, {pid: bytes}) or (None, {}) without a GPU."""
    global _NVML
    if _NVML is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception:
            _NVML = False
    if _NVML:
        nv, h = _NVML
        procs = {}
        with suppress(Exception):
            procs = {p.pid: int(p.usedGpuMemory or 0) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)}
        return int(nv.nvmlDeviceGetMemoryInfo(h).used), procs
    r = run_quiet(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"], timeout=5)
    return (int(float(r.splitlines()[0])) << 20, {}) if r else (None, {})


class Check:
    def __init__(self, a: argparse.Namespace):
        self.dry, self.stage, self.quick = a.dry_run, a.stage, a.quick
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.budget
        self.only = a.only
        self.out = Path(a.out or os.environ.get("OUT") or REPO / "out" / "gpu-check")
        self.work = Path(a.work) if a.work else (Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if self.dry
                                                   else DEVICE_HOME / "work")
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        (self.work / "steps").mkdir(exist_ok=True)
        self.sizes = DRY_SIZES if self.dry else GPU_SIZES
        self.steps: list[dict] = []
        self.info: dict[str, Any] = {}
        self.site = DEVICE_HOME / "site"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false")
        if self.dry:  # onnxruntime's CPU block-wise INT8 QMoE (onnx-cuda exact) otherwise rounds activations to int8:
            self.env["ORT_QMOE_CPU_QNBIT_GEMM"] = "fp32"  # the CPU proxy then computes what the graph says
        self.set_paths()

    def set_paths(self) -> None:
        paths = [str(REPO)]
        if not self.dry and self.site.is_dir():
            paths.insert(0, str(self.site))
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if not self.dry:
            libs = nvidia_lib_dirs()
            self.env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p])

    # ---- running one step ------------------------------------------------------------------------------------------
    def step(self, name: str, limit: float, fn, reuse: Path | None = None) -> dict | None:
        if self.only and not any(o in name for o in self.only):
            return None
        rec: dict[str, Any] = {"name": name, "limit_s": limit}
        saved = self.work / "steps" / (name.replace("/", "__") + ".json")
        left = self.deadline - time.monotonic() - 5
        t = time.monotonic()
        try:
            if reuse is not None and reuse.exists() and saved.is_file():
                rec.update(json.loads(saved.read_text()), reused=True)
                rec["status"] = "ok"
            elif left < 5:
                raise Skip("out of time budget")
            else:
                rec["limit_s"] = round(min(limit, left), 1)
                rec["result"] = fn(rec["limit_s"])
                rec["status"] = rec["result"].pop("_status", "ok") if isinstance(rec["result"], dict) else "ok"
        except Skip as e:
            rec.update(status="skip", reason=str(e))
        except subprocess.TimeoutExpired:
            rec.update(status="timeout", error=f"over its {rec['limit_s']} s limit")
        except StepError as e:
            rec.update(status="error", error=str(e))
        except Exception as e:
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
        if not rec.get("reused"):
            rec["seconds"] = round(time.monotonic() - t, 2)
            if reuse is not None and rec["status"] == "ok":
                saved.write_text(json.dumps(rec, default=str))
        self.steps.append(rec)
        what = rec.get("reason") or rec.get("error") or ("reused" if rec.get("reused") else "")
        print(f"[{time.monotonic() - self.t0:6.1f}s] {rec['status']:7s} {name} ({rec.get('seconds', 0):.1f} s)"
              f"{' ' + what[:300] if what else ''}", flush=True)
        if self.stage != "prep":
            self.write_report()
        return rec

    def sh(self, name: str, cmd: list[str], limit: float, gpu: bool = False, ok_rcs: tuple = (0,),
           probe: bool = False) -> dict:
        """Run cmd (a child in its own session) with the check's environment; its output goes to a log. A child
        whose onnxruntime could not load a provider and went on on CPU failed (unless it is the probe)."""
        log = self.work / "logs" / (name.replace("/", "__") + ".log")
        baseline = gpu_memory()[0] if gpu else None
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(map(str, cmd)) + "\n")
            f.flush()
            p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=f, env=self.env, cwd=REPO,
                                 start_new_session=True)
            poll = GpuPoll(p.pid, baseline) if gpu else None
            out: list[bytes] = []
            reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
            reader.start()
            try:
                _, status, ru = wait4_timeout(p, limit)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise
            finally:
                mem = poll.result() if poll else {}
            reader.join(5)
        stdout = (out[0] if out else b"").decode(errors="replace")
        with open(log, "a") as f:
            f.write("\n--- stdout ---\n" + stdout)
        rc = os.waitstatus_to_exitcode(status)
        stderr = ANSI.sub("", log.read_text(errors="replace").split("\n--- stdout ---\n")[0])
        res = {"rc": rc, "wall_s": round(time.monotonic() - t0, 2), "peak_rss_mib": round(ru.ru_maxrss / 1024),
               "stdout": stdout, "stderr_tail": tail(stderr), **mem}
        if fell := re.search(r"Failed to create (\w+ExecutionProvider)[^\n]*", stderr):
            res["provider_fallback"] = fell.group(0)[:600]
            if not probe:
                raise StepError(f"{fell.group(1)} did not load and onnxruntime fell back to CPU: {fell.group(0)[:600]}")
        if rc not in ok_rcs:
            raise StepError(f"exit {rc}: {res['stderr_tail']}")
        return res

    def python(self, *args: str) -> list[str]:
        return [PY, *args]

    def edgec(self, *args: str, cpu: bool = False, genai: bool = False) -> list[str]:
        if genai:
            return [PY, "-c", WITH_GENAI.format(here=str(HERE), cpu=cpu), *args]
        if cpu:
            return [PY, "-c", FORCE_CPU, *args]
        return [PY, *EDGEC, *args]

    # ---- report ------------------------------------------------------------------------------------------------
    def write_report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        counts = {s: sum(r["status"] == s for r in self.steps) for s in ("ok", "fail", "error", "timeout", "skip")}
        doc = {"schema": 1, "mode": "dry-run" if self.dry else "gpu", "started": self.info.get("started"),
               "elapsed_s": round(time.monotonic() - self.t0, 1), "budget_s": round(self.deadline - self.t0),
               "counts": counts, "info": self.info, "steps": [strip(r) for r in self.steps]}
        tmp = self.out / "gpu-check.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(self.out / "gpu-check.json")
        (self.out / "gpu-check.md").write_text(markdown(doc))


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tail(text: str, n: int = 4) -> str:
    """The last lines of a child's stderr that say something (not a traceback's ^^^ markers)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip(" ^~")]
    return " | ".join(lines[-n:])[-1200:]


def strip(rec: dict) -> dict:
    """The JSON keeps figures, not children's full output."""
    r = dict(rec)
    if isinstance(r.get("result"), dict):
        r["result"] = {k: v for k, v in r["result"].items() if k not in ("stdout", "stderr_tail")}
    return r


def wait4_timeout(p: subprocess.Popen, limit: float) -> tuple[int, int, Any]:
    end = time.monotonic() + limit
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, ru
        if time.monotonic() > end:
            raise subprocess.TimeoutExpired(p.args, limit)
        time.sleep(0.05)


def nvidia_lib_dirs() -> list[str]:
    """The image's CUDA/cuDNN libraries (pip packages under site-packages/nvidia/): the wheels installed with
    --target look for them beside themselves (RPATH) and would not find them otherwise."""
    import site

    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        root = Path(sp) / "nvidia"
        if root.is_dir():
            dirs += sorted({str(p.parent) for p in root.glob("**/lib/*.so*")})
    return dirs


def last_json(text: str) -> Any:
    """The JSON document a child printed last on stdout (edgec --json prints an indented one)."""
    text = text.strip()
    with suppress(ValueError):
        return json.loads(text)
    for line in reversed(text.splitlines()):
        with suppress(ValueError):
            return json.loads(line)
    raise StepError("no JSON on stdout")


# =====================================================================================================================
# the check
# =====================================================================================================================
def run_check(a: argparse.Namespace) -> int:
    c = Check(a)
    c.info["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    c.info["host"] = {"python": platform.python_version(), "executable": PY, "machine": platform.machine(),
                      "cpus": os.cpu_count(), "gpu": run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,"
                                                                 "memory.total", "--format=csv,noheader"])}
    if not c.dry:
        c.info["cuda_library_dirs"] = nvidia_lib_dirs()
    if c.stage == "prep":
        return background_prep(c)
    with prep_lock(c):
        body(c)
    c.write_report()
    archive_logs(c)
    broken = [r["name"] for r in c.steps if r["status"] in ("error", "timeout")]
    failed = [r["name"] for r in c.steps if r["status"] == "fail"]
    print(markdown_summary(c.steps))
    print(f"report: {c.out / 'gpu-check.json'}, {c.out / 'gpu-check.md'}\n"
          f"parity failed: {', '.join(failed) or 'none'}\nerrors: {', '.join(broken) or 'none'}")
    if c.dry and not a.work:
        shutil.rmtree(c.work, ignore_errors=True)
    return 2 if broken else 1 if failed else 0


@contextmanager
def prep_lock(c: Check):
    """The final run waits for the background prep's current step, then tells it to stop."""
    if c.dry:
        yield
        return
    import fcntl

    (c.work / "final-started").touch()
    with open(c.work / "prep.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def background_prep(c: Check) -> int:
    """`run --stage prep`, started by the first `stash`: the CPU-only steps, one at a time under the lock, until the
    final run starts; then, once the ONNX wheels are whole, their install and the builder."""
    import fcntl

    (c.work / "final-started").unlink(missing_ok=True)
    lock = open(c.work / "prep.lock", "w")
    end = time.monotonic() + 900
    jobs = prep_jobs(c)
    while jobs and time.monotonic() < end:
        if (c.work / "final-started").exists():
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            break
        try:
            if jobs[0]() is not False:
                jobs.pop(0)
        except Exception as e:
            print(f"background job failed: {type(e).__name__}: {e}", flush=True)
            jobs.pop(0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        if jobs:
            time.sleep(1)
    (c.work / "prep.pid").unlink(missing_ok=True)
    return 0


def prep_jobs(c: Check) -> list:
    """Jobs for the background: each returns False to be retried later (waiting for wheels)."""
    def install_onnx():
        status = stash_status(DEVICE_HOME / "stash")
        if not status["groups"].get("onnx"):
            return False
        install(c, groups=["onnx"])
        return True

    return [lambda: synth(c, "tiny"), lambda: synth(c, "slice"), lambda: conversions(c, "tiny"),
            lambda: conversions(c, "slice"), install_onnx, lambda: builder(c)]


# ---- the steps, in the order the final run takes them ---------------------------------------------------------------
def body(c: Check) -> None:
    if not c.dry:
        status = stash_parts(carried_parts(), DEVICE_HOME / "stash")
        c.info["stash"] = status
    install(c)
    runtimes(c)
    synth(c, "tiny")
    conversions(c, "tiny")
    parity(c, "tiny")
    if not c.dry:
        synth(c, "slice")
        conversions(c, "slice")
    bench(c)
    builder(c)
    bench_builder(c)
    if not c.dry:
        parity(c, "slice")
    browser(c)


def model_dir(c: Check, model: str) -> Path:
    """The dry run's slice is the tiny model."""
    return c.work / ("tiny" if c.dry or model == "tiny" else "slice")


def install(c: Check, groups: list[str] | None = None) -> None:
    """pip --target the pinned wheels (from the stash, the local cache, or, where a registry answers, pip download),
    one pip call per group (mlx and mlx-cuda-13 share the mlx/ folder), skipped when already installed."""
    def run(limit: float) -> dict:
        if c.dry:
            raise Skip("dry run: the venv's CPU packages (onnxruntime, onnxruntime-genai, mlx[cpu], mlx-lm)")
        res: dict[str, Any] = {"site": str(c.site), "installed": [], "missing": []}
        for g in groups or PINS:
            wheels = {pin: find_wheel(DEVICE_HOME / "stash" / "wheels", pin) or find_wheel(LOCAL_CACHE / "wheels", pin)
                      for pin in PINS[g]}
            if absent := [pin for pin, w in wheels.items() if w is None]:
                # a machine that reaches the registries downloads them; this workplace's lent one does not
                r = pip_download(absent, LOCAL_CACHE / "wheels", timeout=int(min(limit / 3, 60)), quick=True)
                res.setdefault("pip_download", []).append({"pins": absent, "rc": r.returncode,
                                                           "tail": r.stderr[-300:]})
                wheels.update({pin: find_wheel(LOCAL_CACHE / "wheels", pin) for pin in absent})
            if absent := [pin for pin, w in wheels.items() if w is None]:
                res["missing"] += absent
                continue
            tag = hashlib.sha256(" ".join(sorted(w.name for w in wheels.values())).encode()).hexdigest()[:12]
            marker = c.site / f".installed-{g}-{tag}"
            if not marker.is_file():
                r = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                    "--no-cache-dir", "--upgrade", "--target", str(c.site),
                                    *map(str, wheels.values())], capture_output=True, text=True, timeout=limit)
                if r.returncode != 0:
                    raise StepError(f"pip install ({g}): {r.stderr[-1500:]}")
                marker.touch()
            res["installed"] += [w.name for w in wheels.values()]
        c.set_paths()
        if res["missing"]:
            res["_status"] = "error"
            res["hint"] = "carry every part `make gpu-wheels` printed, each with `python3 bench/gpu_check.py stash`"
        return res

    c.step("install" + (f"/{'+'.join(groups)}" if groups else ""), 120, run)


def runtimes(c: Check) -> None:
    def run(limit: float) -> dict:
        r = c.sh("runtimes", c.python(str(Path(__file__).resolve()), "probe-runtimes"), limit, probe=True)
        info = last_json(r["stdout"])
        c.info["runtimes"] = info
        res = {"summary": {k: info.get(k) for k in ("onnxruntime", "onnxruntime_genai", "mlx")}}
        if not c.dry and (bad := [why for why in (gpu_missing(c, "onnx"), gpu_missing(c, "mlx")) if why]):
            raise StepError("; ".join(bad) + (f" ({r['provider_fallback']})" if "provider_fallback" in r else ""))
        return res

    c.step("runtimes", 60, run)


def gpu_missing(c: Check, runtime: str) -> str | None:
    """Why `runtime` ("onnx" or "mlx") would not run on the GPU here (the runtimes probe), or None."""
    rt = c.info.get("runtimes", {})
    if runtime == "mlx":
        m = rt.get("mlx", {})
        return None if m.get("gpu") else f"mlx does not run on a GPU: {m.get('error') or m.get('device')}"
    o = rt.get("onnxruntime", {})
    ok = "CUDAExecutionProvider" in (o.get("cuda_session") or [])
    return None if ok else f"onnxruntime's CUDA provider does not load: {o.get('error') or o.get('cuda_session')}"


def gpu_gate(c: Check, runtime: str) -> None:
    """On the GPU machine, a step whose runtime is not on the GPU would measure the CPU: skip it (the runtimes
    step already failed, saying why)."""
    if not c.dry and (why := gpu_missing(c, runtime)):
        raise Skip(why)


def have_provider(c: Check, provider: str) -> bool:
    return provider in (c.info.get("runtimes", {}).get("onnxruntime", {}).get("providers") or [])


def synth(c: Check, model: str) -> None:
    if c.dry and model == "slice":
        return
    out = model_dir(c, model)
    preset, layers = ("tiny", None) if model == "tiny" else ("20b", "2")

    def run(limit: float) -> dict:
        shutil.rmtree(out, ignore_errors=True)  # only ever a half-made one: a whole one is reused below
        r = c.sh(f"synth/{model}", c.edgec(*CLI["synth"](str(out), preset, layers)), limit)
        return {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}

    c.step(f"synth/{model}", 30 if model == "tiny" else 90, run, reuse=out / "config.json")


# (folder name, target, experts) per model
CONVERSIONS = {"tiny": [("onnx-cuda-mxfp4", "onnx-cuda", None), ("onnx-cuda-exact", "onnx-cuda", "exact"),
                        ("onnx-trt-rtx", "onnx-trt-rtx", None), ("mlx", "mlx", None)],
               "slice": [("onnx-cuda-mxfp4", "onnx-cuda", None), ("mlx", "mlx", None)]}


def conv_dir(c: Check, model: str, name: str) -> Path:
    return c.work / f"{'tiny' if c.dry else model}-{name}"


def conversions(c: Check, model: str) -> None:
    if c.dry and model == "slice":
        return
    for name, target, experts in CONVERSIONS[model]:
        out = conv_dir(c, model, name)

        def run(limit: float, out=out, target=target, experts=experts, name=name) -> dict:
            if not (model_dir(c, model) / "config.json").is_file():
                raise Skip("no source checkpoint (synth failed)")
            shutil.rmtree(out, ignore_errors=True)
            r = c.sh(f"convert/{model}/{name}", c.edgec(*CLI["convert"](str(model_dir(c, model)), target, experts,
                                                                       str(out))), limit)
            s = last_json(r["stdout"])
            return {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                    "summary": {k: s.get(k) for k in ("experts", "dense", "seconds", "peak_rss_bytes")}}

        c.step(f"convert/{model}/{name}", 30 if model == "tiny" else 90, run, reuse=out / "edgec.json")


def builder_dir(c: Check) -> Path:
    return c.work / f"{'tiny' if c.dry else 'slice'}-builder-cuda-int4"


def builder(c: Check) -> None:
    """The peer conversion: onnxruntime-genai's model builder, `-e cuda -p int4`, on the same checkpoint."""
    out = builder_dir(c)
    src = model_dir(c, "slice")

    def run(limit: float) -> dict:
        if not (src / "config.json").is_file():
            raise Skip("no source checkpoint (synth failed)")
        shutil.rmtree(out, ignore_errors=True)
        r = c.sh("builder/cuda-int4", c.python("-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o",
                                               str(out), "-p", "int4", "-e", "cuda", "-c",
                                               str(c.work / "builder-cache")), limit)
        if not (out / "genai_config.json").is_file():
            raise StepError("the builder wrote no genai_config.json")
        return {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                "bytes": sum(p.stat().st_size for p in out.iterdir())}

    c.step("builder/cuda-int4", 240, run, reuse=out / "genai_config.json")


PARITY_FLAGS = {"max_abs": "--max-abs", "mean_abs": "--mean-abs", "min_cosine": "--min-cosine", "top1": "--top1",
                "max_kl": "--max-kl", "greedy": "--greedy"}


def cpu_proxy_bounds(folder: Path) -> list[str]:
    """Dry run only: the folder's target profile's [parity."cpu-proxy"] bounds (its GPU graph run by onnxruntime's
    CPU provider, measured there) as `edgec parity` flags; the GPU run keeps the profile's own bounds."""
    import tomllib

    target = json.loads((folder / "edgec.json").read_text()).get("target")
    prof = REPO / "targets" / f"{target}.toml"
    bounds = tomllib.loads(prof.read_text()).get("parity", {}).get("cpu-proxy", {}) if prof.is_file() else {}
    return [a for k, v in bounds.items() for a in (PARITY_FLAGS[k], str(v))]


def parity(c: Check, model: str) -> None:
    """`edgec parity` on each output: edgec's own loop, and for ONNX also onnxruntime-genai's generator."""
    extra: list[str] = []
    if c.quick:  # one 160-token sequence (past the 128-token window) and 4 greedy steps instead of the built-in set
        prompts = c.work / "quick-prompts.json"
        prompts.write_text(json.dumps([{"name": "random-160", "ids": [i * 7919 % 199998 for i in range(1, 161)]}]))
        extra = ["--prompts", str(prompts), "--tokens", "4"]
    src = model_dir(c, model)
    for name, _, _ in CONVERSIONS[model]:
        folder = conv_dir(c, model, name)
        runtimes_ = ["edgec-loop", "genai"] if name.startswith("onnx") else ["edgec-mlx"]
        for rt in runtimes_:
            step = f"parity/{model}/{name}/{rt}"

            def run(limit: float, folder=folder, rt=rt, name=name, step=step) -> dict:
                if not (folder / "edgec.json").is_file():
                    raise Skip("no converted folder (its conversion failed)")
                if c.dry and name == "onnx-cuda-mxfp4":
                    raise Skip(NO_FP4_CPU)
                if not c.dry and name == "onnx-trt-rtx" and not have_provider(c, "NvTensorRTRTXExecutionProvider"):
                    raise Skip("onnxruntime has no NvTensorRTRTXExecutionProvider (onnxruntime-gpu ships CUDA and "
                               "TensorRT; TensorRT-RTX is the plugin onnxruntime-ep-nv-tensorrt-rtx, for RTX GPUs)")
                gpu_gate(c, "mlx" if name == "mlx" else "onnx")
                report = c.work / "logs" / (step.replace("/", "__") + ".json")
                report.unlink(missing_ok=True)
                bounds = cpu_proxy_bounds(folder) if c.dry else []
                cmd = c.edgec(*CLI["parity"](str(src), str(folder), str(report), extra + bounds), cpu=c.dry,
                              genai=rt == "genai")
                r = c.sh(step, cmd, limit, gpu=not c.dry, ok_rcs=(0, 1))  # 1: parity failed (its report says why)
                if not report.is_file():
                    raise StepError(f"exit {r['rc']} and no parity report: {r['stderr_tail']}")
                rep = json.loads(report.read_text())
                return {"_status": "ok" if rep["passed"] else "fail", "passed": rep["passed"],
                        "backend": rep.get("backend"), "worst": rep["worst"], "thresholds": rep["thresholds"],
                        "failures": rep["failures"], "seconds": rep.get("seconds"),
                        **{k: r[k] for k in ("gpu_peak_device_mib", "gpu_peak_process_mib") if k in r}}

            c.step(step, 60 if model == "tiny" else 120, run)


def bench_one(c: Check, step: str, kind: str, folder: Path) -> None:
    def run(limit: float) -> dict:
        if not (folder / "genai_config.json").is_file() and not (folder / "edgec.json").is_file():
            raise Skip("no converted folder")
        if c.dry and folder.name.endswith("onnx-cuda-mxfp4"):
            raise Skip(NO_FP4_CPU)
        gpu_gate(c, "mlx" if folder.name.endswith("mlx") else "onnx")
        cmd = c.python(str(Path(__file__).resolve()), "probe-bench", kind, str(folder), "--prompt",
                       str(c.sizes["prompt"]), "--tokens", str(c.sizes["tokens"]), *(["--cpu"] if c.dry else []))
        r = c.sh(step, cmd, limit, gpu=not c.dry)
        res = last_json(r["stdout"])
        res.update({k: r[k] for k in ("peak_rss_mib", "gpu_peak_device_mib", "gpu_peak_process_mib") if k in r})
        return res

    c.step(step, 90, run)


def bench(c: Check) -> None:
    onnx, mlx = conv_dir(c, "slice", "onnx-cuda-mxfp4"), conv_dir(c, "slice", "mlx")
    if c.dry:  # the CPU provider runs the exact graph: the same plumbing
        onnx = conv_dir(c, "slice", "onnx-cuda-exact")
    bench_one(c, f"bench/{onnx.name}/edgec-loop", "edgec", onnx)
    bench_one(c, f"bench/{onnx.name}/genai", "genai", onnx)
    bench_one(c, f"bench/{mlx.name}/edgec-mlx", "edgec", mlx)
    bench_one(c, f"bench/{mlx.name}/mlx-lm", "mlx_lm", mlx)


def browser(c: Check) -> None:
    """The WebGPU row on the machine's own adapter (bench/bench_webgpu.py, EDGEC_WEBGPU_ADAPTER=gpu), where Chromium,
    chromedriver and onnxruntime-web are there; a skip saying what is missing otherwise. The dry run keeps
    SwiftShader."""
    def run(limit: float) -> dict:
        missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
        if not (REPO / "edgec" / "web" / "node_modules" / "onnxruntime-web").is_dir():
            missing.append("onnxruntime-web (npm ci --prefix edgec/web)")
        if missing:
            raise Skip("not installed: " + ", ".join(missing))
        cmd = c.python(str(REPO / "bench" / "bench_webgpu.py"), str(model_dir(c, "tiny")), "--work",
                       str(c.work / "webgpu"), "--json")
        if not c.dry:
            cmd = ["env", "EDGEC_WEBGPU_ADAPTER=gpu", *cmd]
        r = c.sh(name, cmd, limit)
        res = last_json(r["stdout"])
        web, cpu = res["rows"]
        return {**web, "prompt": res["prompt"], "onnx_cpu": cpu, "webgpu_over_cpu": res["webgpu_over_cpu"],
                "peak_rss_mib": r["peak_rss_mib"]}

    name = "bench/tiny-onnx-webgpu/onnxruntime-web"
    c.step(name, 240, run)


def bench_builder(c: Check) -> None:
    bench_one(c, f"bench/{builder_dir(c).name}/genai", "genai", builder_dir(c))


# =====================================================================================================================
# report
# =====================================================================================================================
def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, int | float) else str(v)


def markdown_summary(steps: list[dict]) -> str:
    lines = ["| step | status | s | note |", "|---|---|---:|---|"]
    for r in steps:
        note = r.get("reason") or r.get("error") or ("reused" if r.get("reused") else "")
        lines.append(f"| {r['name']} | {r['status']} | {fmt(r.get('seconds'), '.1f')} | "
                     f"{note[:200].replace('|', '/')} |")
    return "\n".join(lines)


def common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def markdown(doc: dict) -> str:
    info, steps = doc["info"], doc["steps"]
    rt = info.get("runtimes", {})
    out = [f"# edgec GPU check ({doc['mode']})", "",
           f"- started {doc.get('started')}, elapsed {doc['elapsed_s']} s of a {doc['budget_s']} s budget",
           f"- host: {info.get('host')}",
           f"- versions: {rt.get('versions')}",
           f"- onnxruntime: {rt.get('onnxruntime')}", f"- onnxruntime-genai: {rt.get('onnxruntime_genai')}",
           f"- mlx: {rt.get('mlx')}", f"- counts: {doc['counts']}", "", "## Parity", "",
           "| output | runtime | passed | max abs | mean abs | min cos | top-1 | max KL | greedy |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in steps:
        if r["name"].startswith("parity/"):
            res = r.get("result") or {}
            w = res.get("worst") or {}
            _, model, folder, runtime = r["name"].split("/")
            passed = res.get("passed", r["status"])
            out.append(f"| {model}/{folder} | {runtime} | {passed} | " +
                       " | ".join(fmt(w.get(k)) for k in ("max_abs", "mean_abs", "min_cosine", "top1", "max_kl",
                                                          "greedy")) + " |")
    out += ["", "## Benchmarks (2-layer slice of the 20b shape; dry run: tiny on CPU)", "",
            "| folder | runtime | prompt | prefill tok/s | ttft s | decode tok/s | GPU peak MiB (device / process) "
            "| MLX peak MiB | peak RSS MiB | greedy = edgec's |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    bench = [(r, *r["name"].split("/")[1:]) for r in steps if r["name"].startswith("bench/")]
    ours = {folder: (r.get("result") or {}).get("out_tokens") for r, folder, rt in bench if rt.startswith("edgec")}
    for r, folder, runtime in bench:
        res = r.get("result") or {}
        if r["status"] != "ok":
            out.append(f"| {folder} | {runtime} | {r['status']}: {(r.get('reason') or r.get('error') or '')[:150]} "
                       "| | | | | | | |")
            continue
        mlxp, theirs = res.get("mlx_peak_bytes"), res.get("out_tokens")
        same = "-" if runtime.startswith("edgec") or not ours.get(folder) or not theirs else \
            f"{common_prefix(ours[folder], theirs)}/{len(theirs)}"
        out.append(f"| {folder} | {runtime} | {fmt(res.get('prompt'))} | {fmt(res.get('prefill_tok_s'), '.1f')} | "
                   f"{fmt(res.get('ttft_s'), '.3f')} | {fmt(res.get('decode_tok_s'), '.1f')} | "
                   f"{fmt(res.get('gpu_peak_device_mib'), '.0f')} / {fmt(res.get('gpu_peak_process_mib'), '.0f')} | "
                   f"{fmt(mlxp / 2**20 if mlxp else None, '.0f')} | {fmt(res.get('peak_rss_mib'))} | {same} |")
    out += ["", "## Steps", "", markdown_summary(steps), ""]
    errs = [r for r in steps if r["status"] in ("error", "timeout", "fail")]
    if errs:
        out += ["## Failures", ""]
        for r in errs:
            detail = r.get("error") or "; ".join((r.get("result") or {}).get("failures") or [])
            out.append(f"- **{r['name']}** ({r['status']}): {detail}")
        out.append("")
    return "\n".join(out)


def archive_logs(c: Check) -> None:
    with tarfile.open(c.out / "gpu-check-logs.tar.gz", "w:gz") as tar:
        for p in sorted((c.work / "logs").iterdir()):
            if p.stat().st_size < 4 << 20:
                tar.add(p, arcname=p.name)
        prep = c.work / "prep.log"
        if prep.is_file():
            tar.add(prep, arcname="prep.log")


# =====================================================================================================================
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: download the pinned wheels and cut them into parts")
    p.add_argument("--part-mib", type=int, default=PART_MIB)
    p = sub.add_parser("stash", help="device: keep the carried part, start the background prep")
    p.add_argument("--no-prep", action="store_true")
    p = sub.add_parser("run", help="the check (device), or --dry-run (CPU)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=float, default=420, help="seconds for the whole run (default 420)")
    p.add_argument("--out", help="report folder (default: $OUT, else out/gpu-check)")
    p.add_argument("--work", help="scratch folder (default: /var/tmp/edgec-gpu-check/work; dry run: a temp folder)")
    p.add_argument("--only", action="append", help="run only steps whose name contains this (repeatable)")
    p.add_argument("--quick", action="store_true", help="parity on one 160-token sequence (the test suite's dry run)")
    p.add_argument("--stage", choices=["all", "prep"], default="all", help=argparse.SUPPRESS)
    sub.add_parser("probe-runtimes")
    p = sub.add_parser("probe-bench")
    p.add_argument("kind", choices=["edgec", "genai", "mlx_lm"])
    p.add_argument("folder")
    p.add_argument("--prompt", type=int, default=GPU_SIZES["prompt"])
    p.add_argument("--tokens", type=int, default=GPU_SIZES["tokens"])
    p.add_argument("--cpu", action="store_true")
    a = ap.parse_args()
    if a.cmd == "prepare":
        return cmd_prepare(a)
    if a.cmd == "stash":
        return cmd_stash(a)
    if a.cmd == "probe-runtimes":
        print(json.dumps(probe_runtimes(), default=str))
        return 0
    if a.cmd == "probe-bench":
        print(json.dumps(probe_bench(a.kind, a.folder, a.prompt, a.tokens, a.cpu), default=str))
        return 0
    return run_check(a)


if __name__ == "__main__":
    sys.exit(main())

"""The one memory model: what a runtime will hold, what the device can give, and what this process holds now.

- `Plan`: weights as the runtime holds them + its KV cache at a context (by the backend's own allocation rule) + the
  largest temporary one step makes. Each backend states its plan through one classmethod, `Backend.plan`; `edgec
  inspect`, chat's start-up check, the benchmarks and the README table all call it (`plan_folder`, `plan_recipe`).
- `Budget`: what the device can actually give (Metal's recommended working set, CUDA's free memory, the OS's available
  RAM), or what `--memory-budget` says.
- `fit_context`: the default context is the largest that fits (up to the model's maximum); a context that cannot fit
  is refused with the largest that can; weights that cannot fit at all are refused with the recipes that would.
- `rss_bytes` / `peak_rss_bytes`: this process's memory, measured portably (Linux /proc, macOS rusage + libproc,
  Windows GetProcessMemoryInfo), without the Unix-only `resource` module where it is missing.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgecError
from .spec import GptOssConfig, hf_tensors

GIB = 2**30

# Storage cost of each weight format, in bits per weight, block scales included: how a recipe is priced before it
# is converted (a converted folder is priced by its own files).
BITS_PER_WEIGHT: dict[str, float] = {
    "mxfp4": 4.25,  # 4-bit E2M1 codes + one 8-bit E8M0 scale per 32
    "int8": 9.0,  # int8 + fp32 scale per block of 32
    "exact": 8.5,  # MXFP4 -> lossless int8 blocks of 32 + an fp16 scale per block (QMoE on the GPU targets)
    "int4": 4.5,  # int4 + fp16 scale per block of 32
    "q8": 8.5,  # MLX affine 8-bit, group 64 (bf16 scale + bias per 64)
    "bf16": 16.0,
    "fp16": 16.0,
    "fp32": 32.0,
}
SMALL_KINDS = ("norm", "attn_bias", "sinks", "expert_bias")  # biases, norms, sinks: never block-quantized
VALUE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


# ---- weights -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """Bytes of a model's weights as stored: `total`, of which `matrices` are unquantized floating-point dense
    matrices (attention, router, lm_head: what a runtime may widen), `vectors` small floating-point tensors (norms,
    attention biases, sinks), `experts` the expert tensors (per layer: experts / layers) and `embedding` the
    embedding table (a runtime that gathers its rows from a memory map only ever reads the rows of tokens it sees)."""

    total: int
    matrices: int = 0
    vectors: int = 0
    experts: int = 0
    embedding: int = 0


def format_bits(fmt: str, dense: str | None = None) -> float | None:
    """Bits per weight of a format; "decomposed" experts (plain MatMuls) cost what the dense format costs."""
    if fmt == "decomposed" and dense is not None:
        return BITS_PER_WEIGHT.get(dense)
    return BITS_PER_WEIGHT.get(fmt)


def recipe_weights(cfg: GptOssConfig, dense: str, experts: str, expert_bits: float | None = None) -> Weights | None:
    """Weights of a recipe before conversion: expert matrices in `experts`, the other matrices in `dense` format;
    norms, biases and sinks in floating point (fp32 when dense is fp32, else 16-bit). `expert_bits` overrides the
    table (a profile's `[experts] bits_per_weight`). None when a format is unknown."""
    e_bits = expert_bits if expert_bits is not None else format_bits(experts, dense)
    if dense not in BITS_PER_WEIGHT or e_bits is None:
        return None
    small_bits = 32.0 if dense == "fp32" else 16.0
    float_dense = dense in VALUE_BYTES
    total = matrices = vectors = experts = embedding = 0.0
    for t in hf_tensors(cfg):
        if t.kind == "expert_blocks":
            bits = t.params * e_bits
        elif t.kind == "expert_scales":
            continue  # inside the 4.25 bits of mxfp4 (and replaced by the target format's own scales)
        elif t.kind in SMALL_KINDS:
            bits = t.params * small_bits
            vectors += bits if t.kind != "expert_bias" else 0
        else:
            bits = t.params * BITS_PER_WEIGHT[dense]
            matrices += bits if float_dense and t.kind != "embed" else 0
        experts += bits if t.kind.startswith("expert") else 0
        embedding += bits if t.kind == "embed" else 0
        total += bits
    return Weights(int(math.ceil(total / 8)), int(matrices // 8), int(vectors // 8), int(experts // 8),
                   int(embedding // 8))


def weight_bytes(cfg: GptOssConfig, dense: str, experts: str, expert_bits: float | None = None) -> int | None:
    """Total stored bytes of a recipe (see `recipe_weights`)."""
    w = recipe_weights(cfg, dense, experts, expert_bits)
    return None if w is None else w.total


# ---- KV arithmetic ----------------------------------------------------------------------------------------------
def kv_bytes(cfg: GptOssConfig, full_positions: int, sliding_positions: int, full_position_bytes: float,
             sliding_position_bytes: float) -> int:
    """KV bytes of a cache whose full-attention layers hold `full_positions` and sliding layers `sliding_positions`
    positions, at the given bytes per position and layer (K and V, every kv head). The arithmetic; each backend
    supplies its own allocation rule (how many positions, which dtype)."""
    return int(len(cfg.full_layers) * full_positions * full_position_bytes
               + len(cfg.sliding_layers) * sliding_positions * sliding_position_bytes)


def position_bytes(cfg: GptOssConfig, value_bytes: float) -> float:
    """Bytes of one position of one layer: K and V for every kv head."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * value_bytes


def facts_kv_bytes(cfg: GptOssConfig, context: int, value_bytes: float = 2) -> int:
    """The textbook figure (facts file): bf16 K/V, full layers every position, sliding layers only their window."""
    per = position_bytes(cfg, value_bytes)
    return kv_bytes(cfg, context, min(context, cfg.sliding_window), per, per)


# ---- plans -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a runtime will hold at `context` tokens: weights as held, its KV cache once `context` positions are
    cached (its own allocation rule), and the largest temporary a step makes (`transient`: widened weight blocks,
    attention scores of a prefill chunk, upcast K/V, logits)."""

    runtime: str
    context: int
    weights: int
    kv: int
    transient: int = 0
    kv_label: str = ""
    weights_label: str = ""
    offloaded: int = 0  # bytes of weights kept off the accelerator (MLX --cpu-moe): in `weights`, not on the GPU
    mapped: int = 0  # bytes of weights left memory-mapped and read by rows (an embedding table): not in `weights`
    paged: int = 0  # bytes of `weights` memory-mapped and read in when first used (experts): resident once routed to

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.transient

    @property
    def device_total(self) -> int:
        return self.total - self.offloaded

    @property
    def at_load(self) -> int:
        """The weights resident right after loading (the paged ones come in as they are used)."""
        return self.weights - self.paged

    def describe(self) -> str:
        kv = f" ({self.kv_label})" if self.kv_label else ""
        w = f" ({self.weights_label})" if self.weights_label else ""
        off = f", {gib(self.offloaded)} of it on the CPU" if self.offloaded else ""
        off += f", {gib(self.paged)} of it read in as first used" if self.paged else ""
        mapped = f" (+ {gib(self.mapped)} mapped, read by rows)" if self.mapped else ""
        return (f"weights {gib(self.weights)}{w}{off}{mapped} + KV {gib(self.kv)} at {self.context} tokens{kv} + "
                f"per-step temporaries {gib(self.transient)} = {gib(self.total)}")

    def as_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "context": self.context, "weights_bytes": self.weights,
                "kv_bytes": self.kv, "transient_bytes": self.transient, "total_bytes": self.total,
                "offloaded_bytes": self.offloaded, "mapped_bytes": self.mapped, "paged_bytes": self.paged,
                "at_load_bytes": self.at_load, "kv": self.kv_label,
                "weights": self.weights_label}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def plan_folder(folder: str | Path, context: int, **options: Any) -> Plan:
    """The plan of a converted folder (or a source checkpoint: the numpy reference) under `options`."""
    from .runtime.base import backend_class

    cls, _ = backend_class(folder)
    return cls.plan_folder(Path(folder), context, **options)


def plan_recipe(profile: dict[str, Any], cfg: GptOssConfig, context: int, dense: str | None = None,
                experts: str | None = None, **options: Any) -> Plan | None:
    """The plan of a target profile's recipe (its defaults unless `dense`/`experts`) before conversion, under its
    runtime's defaults on the device the target is for (the GPU where the profile has GPU defaults). None when a
    format is unknown."""
    from .runtime.base import runtime_class

    spec = profile.get("experts") or {}
    dense = dense or str((profile.get("dense") or {}).get("default", "bf16"))
    experts = experts or str(spec.get("default", "mxfp4"))
    e_bits = spec.get("bits_per_weight") if experts == spec.get("default") else None
    w = recipe_weights(cfg, dense, experts, None if e_bits is None else float(e_bits))
    if w is None:
        return None
    cls = runtime_class(str(profile.get("runtime", "")))
    device = "gpu" if "gpu" in (profile.get("runtime_defaults") or {}) else None
    recipe = {"dense": dense, "experts": experts, "execution_provider": profile.get("execution_provider")}
    opts = {**cls.defaults(None, profile, device), **{k: v for k, v in options.items() if v is not None}}
    return cls.plan(cfg, context, w, recipe=recipe, **opts)


# ---- the device's budget ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Bytes the device can give a model, and where the figure comes from. `bytes` None: unknown."""

    bytes: int | None
    source: str

    def describe(self) -> str:
        return f"{gib(self.bytes)} ({self.source})" if self.bytes else f"unknown ({self.source})"


def parse_size(text: str, option: str = "--memory-budget") -> int:
    """'10.7GB', '10GiB', '8000MB', '512M', or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m or not float(m.group(1)):
        raise EdgecError(f"{option} {text!r}: expected a size such as 10.7GB, 10GiB or 8000MB")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


def available_ram() -> Budget:
    """RAM a new allocation can use: Linux MemAvailable, Windows ullAvailPhys, macOS physical memory (its
    unified memory is budgeted through Metal when the GPU runs the model)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return Budget(int(line.split()[1]) * 1024, "available RAM")
    except OSError:
        pass
    if sys.platform == "win32":
        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        st = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):  # type: ignore[attr-defined]
            return Budget(int(st.ullAvailPhys), "available RAM")
    if sys.platform == "darwin":
        size = ctypes.c_uint64(0)
        n = ctypes.c_size_t(8)
        libc = ctypes.CDLL(None)
        if libc.sysctlbyname(b"hw.memsize", ctypes.byref(size), ctypes.byref(n), None, 0) == 0:
            return Budget(int(size.value), "physical RAM")
    try:
        return Budget(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM")
    except (ValueError, OSError, AttributeError):
        return Budget(None, "RAM")


def device_budget(device: dict[str, Any] | None, override: int | None = None) -> Budget:
    """What the device can give: `--memory-budget` when given; an MLX GPU's device info (Metal:
    max_recommended_working_set_size; CUDA: free_memory); otherwise available RAM."""
    if override:
        return Budget(int(override), "--memory-budget")
    info = device or {}
    if info.get("max_recommended_working_set_size"):
        return Budget(int(info["max_recommended_working_set_size"]), "Metal's recommended working set")
    if info.get("free_memory"):
        return Budget(int(info["free_memory"]), "free GPU memory")
    return available_ram()


# ---- fitting -------------------------------------------------------------------------------------------------
MIN_CONTEXT = 1024  # the smallest context edgec chooses by itself
CONTEXT_STEP = 1024  # a chosen context is a multiple of this (the full layers' growth step)


def largest_context(plan_at: Callable[[int], Plan], budget: int, limit: int) -> int:
    """The largest context <= `limit` (a multiple of CONTEXT_STEP, or `limit` itself) whose plan fits `budget`;
    0 when not even MIN_CONTEXT does. A plan grows with its context, so this is a binary search."""
    fits = lambda c: plan_at(c).device_total <= budget
    if fits(limit):
        return limit
    lo, hi = 0, limit // CONTEXT_STEP  # in steps: lo fits (or is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * CONTEXT_STEP) else (lo, mid)
    c = lo * CONTEXT_STEP
    return c if c >= min(MIN_CONTEXT, limit) else 0


def fit_context(plan_at: Callable[[int], Plan], budget: Budget, limit: int, requested: int | None,
                recipes: Callable[[], Iterable[str]] = lambda: ()) -> tuple[int, str]:
    """(context, one line saying what was planned). `requested` None: the largest context that fits, up to
    `limit`. A requested context that cannot fit is refused with the largest that can; weights that cannot fit at
    all with the recipes that would (`recipes()`: lines with numbers)."""
    if budget.bytes is None:
        ctx = requested or limit
        return ctx, f"context {ctx}: {plan_at(ctx).describe()}; device memory unknown"
    if requested:
        plan = plan_at(requested)
        if plan.device_total <= budget.bytes:
            return requested, f"context {requested}: {plan.describe()}; fits {budget.describe()}"
        best = largest_context(plan_at, budget.bytes, requested)
        if best:
            raise EdgecError(f"--max-context {requested} will not fit: {plan.describe()} > {budget.describe()}; "
                             f"the largest context that fits is {best} (--max-context {best})")
    else:
        best = largest_context(plan_at, budget.bytes, limit)
        if best:
            plan = plan_at(best)
            why = "the model's maximum" if best == limit else "the largest that fits"
            return best, f"context {best} ({why}): {plan.describe()}; budget {budget.describe()}"
    plan = plan_at(min(requested or limit, MIN_CONTEXT))
    alts = list(recipes())
    hint = ("; " + "; ".join(alts)) if alts else "; no recipe of this target fits: use a smaller model or device"
    more = "" if budget.source == "--memory-budget" else " (--memory-budget overrides the budget)"
    raise EdgecError(f"will not fit: {plan.describe()} > {budget.describe()}{hint}{more}")


# ---- this process --------------------------------------------------------------------------------------------
def _windows_counters() -> tuple[int, int] | None:
    """(working set, peak working set) of this process on Windows."""
    class Counters(ctypes.Structure):
        _fields_ = [("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    c = Counters(cb=ctypes.sizeof(Counters))
    k32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    k32.GetCurrentProcess.restype = ctypes.c_void_p
    if not k32.K32GetProcessMemoryInfo(ctypes.c_void_p(k32.GetCurrentProcess()), ctypes.byref(c), c.cb):
        return None
    return int(c.WorkingSetSize), int(c.PeakWorkingSetSize)


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Resident set size of this process now (None where the platform does not say)."""
    if sys.platform == "win32":
        c = _windows_counters()
        return c[0] if c else None
    if sys.platform == "darwin":
        try:  # libproc's proc_pid_rusage(RUSAGE_INFO_V2): ri_resident_size is the 7th uint64 after the uuid
            buf = (ctypes.c_uint64 * 32)()
            lib = ctypes.CDLL("/usr/lib/libproc.dylib")
            if lib.proc_pid_rusage(os.getpid(), 2, ctypes.byref(buf)) == 0:
                return int(buf[2 + 6])
        except OSError:
            return None
        return None
    return _proc_status("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (waited-for children not included)."""
    if sys.platform == "win32":
        c = _windows_counters()
        return c[1] if c else 0
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # a platform with neither /proc nor resource
        return rss_bytes() or 0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def mapped_rss_bytes(path: str | Path, start: int, end: int) -> int | None:
    """Resident bytes of this process's memory maps of bytes [start, end) of file `path` (an embedding table read by
    rows: how many pages a row brings in is the OS's choice). Linux only (/proc/self/smaps); None elsewhere."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    target, total, hit = str(Path(path).resolve()), 0, False
    for line in lines:
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            offset = int(head[2], 16)
            hit = len(head) > 5 and head[5] == target and offset < end and offset + hi - lo > start
        elif hit and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total

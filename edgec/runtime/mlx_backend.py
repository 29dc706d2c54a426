"""gpt-oss in MLX: the whole forward pass and its KV cache in one file.

Weights are held as the folder stores them (bf16 or q8 dense, MXFP4 experts) unless `compute` says otherwise.
`compute` (the defaults per device live in targets/mlx.toml `[runtime_defaults]`, copied into edgec.json):
  float16         (GPU default) bf16 matrices are converted once, at load, to float16 (the same bytes, read from
                  the file's map a block at a time) and multiply float16 activations (fp32 accumulation inside MLX's
                  kernels): float16 keeps 11 significant bits where bf16 keeps 8, which on the synthetic models
                  gives ~15x less error than bf16 math. The conversion is exact for |values| >= 2**-14; smaller
                  ones round to float16's subnormal step 2**-24; a matrix holding a value beyond float16's range
                  stays bf16.
  bfloat16        bf16 matrices multiply bf16 activations, no weight converted (mlx-lm's precision).
  float32         (CPU default) bf16 matrices are widened to float32 block by block as they are used (at most
                  WIDEN_BYTES at a time): float32 math without holding a float32 copy. On MLX's CPU a bf16 GEMM with
                  more than one row is ~50x slower than float32 (bench/bench_mlx.py), and `x_f32 @ w_bf16` would
                  widen the whole matrix per call (2.3 GB for 20b's lm_head).
  float32-upcast  dense matrices widened once at load (+1x their bytes): for parity work.
Whatever the policy, these stay float32: the residual stream, RMSNorm (fast.rms_norm accumulates in fp32), RoPE
(exact YaRN from `edgec.rope`, float32 angles), the router (its logits choose the experts) and its softmax, and the
activations of the quantized (MXFP4 experts, q8 dense) matmuls, which read only the quantized weights.

KV cache (`kv_dtype` float16, clamped to its range, bfloat16 or float32; `kv_bits=8` stores the full-attention
layers' K and V with MLX affine 8-bit quantization (`mx.quantize`: uint32-packed codes + float16 scale and bias per
group along the head dim; see `kv8_layout`) and attends with `mx.quantized_matmul`, the sink logit added to the
softmax denominator here).
Allocation (the rule `WindowedBackend` states and `plan` prices): full layers grow in FULL_CHUNK steps (x1.5 at
least) up to `max_context`; sliding layers hold window + ROLLBACK_MARGIN + PREFILL_CHUNK positions. `truncate(n)`
is exact. On the CPU device, attention runs in blocks of queries so the scores it materializes stay under
ATTN_SCRATCH (MLX's CPU attention has no fused kernel). `cpu_moe=N` runs the experts of the first N layers on the CPU
stream (llama.cpp's --n-cpu-moe): their weights stay out of what GPU command buffers touch (the plan's `offloaded`),
but MLX on macOS allocates every array, whatever stream uses it, as a Metal buffer counted in its own memory limit
(1.5x the recommended working set): unverified on a Mac.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import EdgecError, require
from ..jsonio import load_json
from ..memory import Budget, Plan, Weights, device_budget, kv_bytes, position_bytes
from ..rope import yarn_inv_freq
from ..safetensors_io import SafetensorsFile
from ..spec import GptOssConfig
from .base import WindowedBackend

COMPUTE = ("float16", "bfloat16", "float32", "float32-upcast")
KV_DTYPES = ("float16", "bfloat16", "float32")
F16_MAX = 65504.0
F16_BLOCK = 64 << 20  # compute float16: bf16 matrices are converted from the file this many bytes of rows at a time
WIDEN_BYTES = 2 << 20  # float32 block of a bf16 matrix widened at a time (compute float32)
ATTN_SCRATCH = 128 << 20  # bound on the attention scores one CPU attention call materializes
MATRICES = ("proj.weight", "router.weight", "lm_head.weight")  # dense matrices a policy may widen (not the embedding)
VECTORS = ("sinks", "norm.weight", "layernorm.weight", "bias")


def weight_class(name: str, quantized: bool) -> str:
    """'experts', 'matrix' (an unquantized dense matrix), 'vector' (norm, attention bias, sink) or 'other'."""
    if ".experts." in name:
        return "experts"
    if quantized or name.endswith((".scales", ".biases")):
        return "other"
    return "matrix" if name.endswith(MATRICES) else "vector" if name.endswith(VECTORS) else "other"


def kv8_layout(head_dim: int) -> tuple[int, int]:
    """(stored head dim, group size) of the 8-bit KV cache. MLX quantizes in groups of 32, 64 or 128 along the last
    axis; a head dim that no group divides (test models: 16) is zero-padded to a multiple of 32 (zeros add nothing
    to q.k and the padded output columns are dropped)."""
    for g in (64, 32):
        if head_dim % g == 0:
            return head_dim, g
    return -(-head_dim // 32) * 32, 32


def kv8_position_bytes(cfg: GptOssConfig) -> int:
    """Bytes one position of one full layer takes in the 8-bit cache: K and V, per kv head one byte per stored value
    plus a float16 scale and bias per group."""
    dim, group = kv8_layout(cfg.head_dim)
    return 2 * cfg.num_key_value_heads * (dim + 2 * 2 * dim // group)


def _device_name(mx: Any) -> str:
    return "gpu" if mx.is_available(mx.gpu) else "cpu"


class MlxBackend(WindowedBackend):
    name = "mlx"
    PREFILL_CHUNK: ClassVar[int] = 512

    # ---- options, defaults, plan (class level) -------------------------------------------------------------
    @classmethod
    def options(cls, folder: Path) -> dict[str, tuple]:
        mx = require("mlx.core", "mlx")
        return {"compute": COMPUTE, "kv_dtype": KV_DTYPES, "kv_bits": (8, 16),
                "device": ("gpu", "cpu") if mx.is_available(mx.gpu) else ("cpu",),
                "cpu_moe": tuple(range(config_layers(folder) + 1))}

    @classmethod
    def defaults(cls, folder: Path | None, profile: dict[str, Any] | None = None,
                 device: str | None = None) -> dict[str, Any]:
        """The device's defaults as the folder's edgec.json recorded them (else the mlx profile's): compute and
        kv_dtype per device."""
        if device is None:
            try:
                device = _device_name(require("mlx.core", "mlx"))
            except EdgecError:  # no MLX here (planning only): the device the target is for
                device = "gpu"
        recorded = {}
        if folder is not None and (Path(folder) / "edgec.json").is_file():
            recorded = load_json(Path(folder) / "edgec.json").get("runtime_defaults") or {}
        if not recorded:
            if profile is None:
                from ..targets import load_profile

                profile = load_profile("mlx")
            recorded = profile.get("runtime_defaults") or {}
        d = recorded.get(device) or {}
        return {"device": device, "compute": d.get("compute", "float32"), "kv_dtype": d.get("kv_dtype", "bfloat16"),
                "kv_bits": None, "cpu_moe": 0}

    @classmethod
    def budget(cls, options: dict[str, Any], override: int | None = None) -> Budget:
        mx = require("mlx.core", "mlx")
        gpu = options.get("device", _device_name(mx)) == "gpu"
        return device_budget(mx.device_info() if gpu else None, override)

    @classmethod
    def held_weights(cls, folder: Path) -> Weights:
        from ..safetensors_io import SafetensorsFile

        sizes: dict[str, int] = {"total": 0, "matrix": 0, "vector": 0, "experts": 0, "other": 0}
        files = sorted(Path(folder).glob("model*.safetensors"))
        if not files:
            raise EdgecError(f"{folder}: no model*.safetensors (not an MLX folder from `edgec convert -t mlx`)")
        for f in files:
            entries = SafetensorsFile(f).entries
            for name, e in entries.items():
                nbytes = e["offsets"][1] - e["offsets"][0]
                quantized = name.removesuffix(".weight") + ".scales" in entries
                sizes[weight_class(name, quantized)] += nbytes
                sizes["total"] += nbytes
        return Weights(sizes["total"], sizes["matrix"], sizes["vector"], sizes["experts"])

    @classmethod
    def plan(cls, cfg: GptOssConfig, context: int, weights: Weights, compute: str = "float32",
             kv_dtype: str = "bfloat16", kv_bits: int | None = None, device: str = "cpu", cpu_moe: int = 0,
             **_: Any) -> Plan:
        """Weights as held (float32-upcast doubles the dense matrices), KV by the allocation rule, and a step's
        temporaries at `context`: a widened weight block, upcast K/V of one layer (float32 compute over a bf16
        cache), CPU attention scores, a prefill chunk's expert activations, the logits."""
        held = weights.total + (weights.matrices if compute == "float32-upcast" else 0)
        full, sliding = cls.kv_positions(cfg, context)
        value = {"float16": 2, "bfloat16": 2, "float32": 4}[kv_dtype]
        per = position_bytes(cfg, value)
        kv = kv_bytes(cfg, full, sliding, kv8_position_bytes(cfg) if kv_bits == 8 else per, per)
        n, f32 = cls.PREFILL_CHUNK, 4
        temps = 2 * cfg.vocab_size * f32  # the last position's logits, and their numpy copy
        temps += WIDEN_BYTES if compute == "float32" else 0
        temps += 2 * cfg.num_key_value_heads * context * cfg.head_dim * f32 if (
            compute.startswith("float32") and value != 4) else 0
        temps += min(ATTN_SCRATCH, 3 * cfg.num_attention_heads * n * context * f32) if device == "cpu" else 0
        temps += n * cfg.num_experts_per_tok * (cfg.hidden_size + 3 * cfg.intermediate_size) * f32 * 2
        kv_label = (f"8-bit full layers, {kv_dtype} sliding" if kv_bits == 8 else kv_dtype)
        offloaded = weights.experts * min(cpu_moe, cfg.num_hidden_layers) // cfg.num_hidden_layers
        return Plan("mlx", context, held, kv, temps, kv_label,
                    f"{'float32 copies' if compute == 'float32-upcast' else 'as stored'}, {compute} compute on "
                    f"{device}", offloaded if device == "gpu" else 0)

    # ---- loading -------------------------------------------------------------------------------------------
    def __init__(self, folder: str | Path, max_context: int | None = None, kv_bits: int | None = None,
                 kv_dtype: str | None = None, compute: str | None = None, device: str | None = None,
                 cpu_moe: int | None = None):
        mx = self.mx = require("mlx.core", "mlx")
        folder = Path(folder)
        d = self.defaults(folder)
        self.device_name = device or d["device"]
        self.compute = compute or d["compute"]
        kv_dtype = kv_dtype or d["kv_dtype"]
        if self.compute not in COMPUTE:
            raise EdgecError(f"compute={self.compute!r}: the MLX runtime computes in {', '.join(COMPUTE)}")
        if kv_bits not in (None, 8, 16):
            raise EdgecError(f"kv_bits={kv_bits}: the MLX runtime quantizes the KV cache to 8 bits only")
        if kv_dtype not in KV_DTYPES:
            raise EdgecError(f"kv_dtype={kv_dtype!r}: the MLX runtime keeps the KV cache in {', '.join(KV_DTYPES)}")
        if self.device_name == "gpu" and not mx.is_available(mx.gpu):
            raise EdgecError("device gpu: MLX has no GPU here; it can run: cpu")
        self.dev = mx.Device(mx.gpu if self.device_name == "gpu" else mx.cpu)
        self.on_cpu = self.device_name == "cpu"
        self.kv_bits = 8 if kv_bits == 8 else None
        self.kv_dtype_name = kv_dtype
        self.kv_dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[kv_dtype]
        self.adt = {"float16": mx.float16, "bfloat16": mx.bfloat16}.get(self.compute, mx.float32)  # attention dtype
        self.folder = folder
        self.config = c = GptOssConfig.from_hf(load_json(folder / "config.json"), str(folder / "config.json"))
        self.cpu_moe = min(int(cpu_moe or 0), c.num_hidden_layers)
        quant = load_json(folder / "config.json").get("quantization", {})
        self.q8_group = next((v["group_size"] for v in quant.values() if isinstance(v, dict)), 64)
        self.w: dict = {}
        self.files: dict = {}  # tensor name -> its SafetensorsFile (read directly by compute float16)
        for f in sorted(folder.glob("model*.safetensors")):  # lazy: nothing is read until evaluated below
            self.w.update({k: v for k, v in mx.load(str(f)).items() if self._holds(k)})
            sf = SafetensorsFile(f)
            self.files.update(dict.fromkeys(sf.entries, sf))
        if not self.files:
            raise EdgecError(f"{folder}: no model*.safetensors (not an MLX folder from `edgec convert -t mlx`)")
        upcast = self.compute == "float32-upcast"
        for n in self.layers():  # one gather_qmm for gate and up: rows [gate | up]
            p = f"model.layers.{n}."
            for s in ("weight", "scales", "bias"):
                e = p + "mlp.experts."
                self.w[e + "gu." + s] = mx.concatenate([self.w.pop(e + "gate_proj." + s),
                                                        self.w.pop(e + "up_proj." + s)], axis=1)
            self._finish([k for k in self.w if k.startswith(p)], upcast)
        self._finish([k for k in self.w if not k.startswith("model.layers.")], upcast)
        for sf in set(self.files.values()):
            sf.close()
        self.files = {}
        mx.clear_cache()  # buffers freed while loading go back to the system
        self.max_context = max_context or c.max_position_embeddings
        inv_freq, self.concentration = yarn_inv_freq(c)
        self.inv_freq = inv_freq.astype(np.float32)
        self.kv8_dim, self.kv8_group = kv8_layout(c.head_dim)
        self.reset()

    def layers(self) -> range:
        """The layers this process holds and runs (all of them; a pipeline stage holds a slice)."""
        return range(self.config.num_hidden_layers)

    def _holds(self, name: str) -> bool:
        """Whether this process loads tensor `name` (everything; a pipeline stage only its own)."""
        return True

    def _finish(self, names: list[str], upcast: bool) -> None:
        """Evaluate (read) these weights now, widening the dense matrices when upcasting, so load-time temporaries
        stay one layer's worth."""
        mx = self.mx
        for k in names:
            quantized = k.removesuffix(".weight") + ".scales" in self.w
            if upcast and weight_class(k, quantized) == "matrix":
                self.w[k] = self.w[k].astype(mx.float32)
            if self.compute == "float16" and weight_class(k, quantized) == "matrix" and not k.endswith("router.weight"):
                self.w[k] = self._fp16_blocks(k) or self.w[k]
        mx.eval([self.w[k] for k in names])

    def _fp16_blocks(self, name: str) -> list | None:
        """A bf16 matrix as fp16 row blocks (exact for |values| >= 2**-14, smaller ones rounded to fp16's subnormal
        step 2**-24), read from the file's memory map F16_BLOCK bytes at a time, so no whole bf16 copy is ever beside
        the result. None when a value is beyond fp16's range (the matrix then stays bf16)."""
        mx, f = self.mx, self.files[name]
        raw = f.raw(name)  # uint16 view of the bf16 bits
        rows, blocks = max(1, F16_BLOCK // (raw.shape[1] * 2)), []
        for s in range(0, raw.shape[0], rows):
            b = mx.array(raw[s : s + rows]).view(mx.bfloat16)
            if mx.abs(b).max().item() > F16_MAX:
                return None
            blocks.append(b.astype(mx.float16))
            mx.eval(blocks[-1])
            f.release_pages()
        return blocks

    def memory_plan(self, context: int | None = None) -> Plan:
        """This backend's plan (its own options) at `context` (default: max_context)."""
        return self.plan(self.config, context or self.max_context, self.held_weights(self.folder),
                         compute=self.compute, kv_dtype=self.kv_dtype_name, kv_bits=self.kv_bits,
                         device=self.device_name, cpu_moe=self.cpu_moe)

    @property
    def precision(self) -> str:
        """What `edgec parity` picks its bounds by: compute policy and KV dtype (targets/mlx.toml [parity.*])."""
        return f"{self.compute}+kv-{'8bit' if self.kv_bits else self.kv_dtype_name}"

    def held_bytes(self) -> int:
        """Bytes of the weights this backend holds now."""
        return sum(sum(b.nbytes for b in a) if isinstance(a, list) else a.nbytes for a in self.w.values())

    # ---- cache -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.ids: list[int] = []
        self.sw_start = 0  # absolute position of index 0 of the sliding buffers
        # per layer [K, V]; a full layer with kv_bits=8: [K codes, K scales, K biases, V codes, V scales, V biases]
        self.cache: list[list] = [[None, None] for _ in range(self.config.num_hidden_layers)]

    def kv_bytes(self) -> int:
        return sum(t.nbytes for kv in self.cache for t in kv if t is not None)

    def _quantized(self, layer: int) -> bool:
        return self.kv_bits == 8 and not self.config.is_sliding(layer)

    def _grow(self, kv: list, shapes: list, cap: int) -> None:
        """Replace the buffers of one layer with `cap`-position ones holding what they held (evaluated now, so a
        growth step holds one layer's old buffers at a time, not every layer's)."""
        mx = self.mx
        grown = [mx.zeros((s[0], cap, *s[1:]), dtype=t) for s, t in shapes]
        if kv[0] is not None:
            m = kv[0].shape[1]
            for g, old in zip(grown, kv, strict=True):
                g[:, :m] = old
        mx.eval(grown)
        kv[:] = grown

    def _store(self, layer: int, k, v, start: int):
        """Write k/v [Hkv, n, D] at absolute positions start..; return the buffer views for attention (8-bit full
        layers: the (codes, scales, biases) triples of K and V)."""
        mx, c, n = self.mx, self.config, k.shape[1]
        kv = self.cache[layer]
        h = c.num_key_value_heads
        if self._quantized(layer):
            return self._store_q8(kv, k, v, start)
        if c.is_sliding(layer):
            cap, base = self.sliding_positions(c, self.max_context), self.sw_start
        else:
            cap, base = self.full_capacity(start + n, 0 if kv[0] is None else kv[0].shape[1], self.max_context), 0
        if kv[0] is None or kv[0].shape[1] < cap:
            self._grow(kv, [((h, c.head_dim), self.kv_dtype)] * 2, cap)
        a = start - base
        if self.kv_dtype == mx.float16:  # no inf from an out-of-range value
            k, v = mx.clip(k, -F16_MAX, F16_MAX), mx.clip(v, -F16_MAX, F16_MAX)
        kv[0][:, a : a + n] = k.astype(self.kv_dtype)
        kv[1][:, a : a + n] = v.astype(self.kv_dtype)
        return kv[0], kv[1], base

    def _store_q8(self, kv: list, k, v, start: int):
        """8-bit full layer: quantize each new position (groups along the head dim, so the positions already cached
        never change: truncate stays exact) and write it into buffers grown like the unquantized ones."""
        mx, c, n = self.mx, self.config, k.shape[1]
        need = start + n
        if len(kv) == 2 and kv[0] is None:
            kv[:] = [None] * 6
        cap = self.full_capacity(need, 0 if kv[0] is None else kv[0].shape[1], self.max_context)
        dim, group = self.kv8_dim, self.kv8_group
        if kv[0] is None or kv[0].shape[1] < cap:
            h = c.num_key_value_heads
            self._grow(kv, [((h, dim // 4), mx.uint32), ((h, dim // group), mx.float16),
                            ((h, dim // group), mx.float16)] * 2, cap)
        pad = [(0, 0), (0, 0), (0, dim - c.head_dim)]
        for j, x in ((0, k), (3, v)):
            x = mx.pad(x, pad) if dim != c.head_dim else x
            for t, part in zip(kv[j : j + 3], mx.quantize(x.astype(mx.float16), group_size=group, bits=8),
                               strict=True):
                t[:, start:need] = part
        return tuple(kv[:3]), tuple(kv[3:]), 0

    def _move_sliding(self, drop: int, upto: int) -> None:
        for i, kv in enumerate(self.cache):
            if self.config.is_sliding(i) and kv[0] is not None:
                for j in range(2):
                    kv[j][:, : upto - drop] = kv[j][:, drop:upto]

    # ---- math --------------------------------------------------------------------------------------------
    def _linear(self, x, name: str, bias: bool = True, widen: bool = False):
        """x [n, in] float32 -> float32 [n, out]. Quantized weights: quantized_matmul on float32 activations;
        bf16 weights by the compute policy (`widen`: float32 math whatever the policy, for the router)."""
        mx, w = self.mx, self.w
        if name + ".scales" in w:
            y = mx.quantized_matmul(x, w[name + ".weight"], w[name + ".scales"], w[name + ".biases"], transpose=True,
                                    group_size=self.q8_group, bits=8)
        else:
            m = w[name + ".weight"]
            if isinstance(m, list):  # fp16 row blocks (compute float16)
                x16 = x.astype(mx.float16)
                y = mx.concatenate([x16 @ b.T for b in m], axis=-1).astype(mx.float32)
            elif m.dtype == mx.float32:
                y = x @ m.T
            elif self.compute in ("float16", "bfloat16") and not widen:
                y = (x.astype(m.dtype) @ m.T).astype(mx.float32)
            else:
                y = self._widened(x, m)
        return y + w[name + ".bias"].astype(mx.float32) if bias else y

    def _widened(self, x, m):
        """x @ m.T in float32 with m widened WIDEN_BYTES at a time (rows of m), never all at once."""
        mx = self.mx
        rows = max(1, WIDEN_BYTES // (m.shape[1] * 4))
        if m.shape[0] <= rows:
            return x @ m.astype(mx.float32).T
        return mx.concatenate([x @ m[s : s + rows].astype(mx.float32).T for s in range(0, m.shape[0], rows)],
                              axis=-1)

    def _embed(self, ids):
        mx, w = self.mx, self.w
        if "model.embed_tokens.scales" in w:
            return mx.dequantize(w["model.embed_tokens.weight"][ids], w["model.embed_tokens.scales"][ids],
                                 w["model.embed_tokens.biases"][ids], group_size=self.q8_group, bits=8
                                 ).astype(mx.float32)
        return w["model.embed_tokens.weight"][ids].astype(mx.float32)

    def _norm(self, x, name: str):
        return self.mx.fast.rms_norm(x, self.w[name], self.config.rms_norm_eps)  # float32 x: float32 out

    def _rope(self, x, cos, sin):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return self.mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _attention(self, i: int, x, start: int, cos, sin):
        mx, c, n = self.mx, self.config, x.shape[0]
        p = f"model.layers.{i}.self_attn."
        heads = lambda t: t.reshape(n, -1, c.head_dim).transpose(1, 0, 2)
        q = self._rope(heads(self._linear(x, p + "q_proj")), cos, sin)
        k = self._rope(heads(self._linear(x, p + "k_proj")), cos, sin)
        v = heads(self._linear(x, p + "v_proj"))
        kb, vb, base = self._store(i, k, v, start)
        end = start + n
        if self._quantized(i):
            mask = (mx.arange(0, end)[None, :] <= mx.arange(start, end)[:, None]) if n > 1 else None
            o = self._attend_q8(q, [t[:, :end] for t in kb], [t[:, :end] for t in vb], mask, self.w[p + "sinks"])
        else:
            first = max(base, start - c.sliding_window + 1) if c.is_sliding(i) else 0
            keys = kb[:, first - base : end - base].astype(self.adt)
            vals = vb[:, first - base : end - base].astype(self.adt)
            o = self._sdpa(q.astype(self.adt), keys, vals, start, first, c.is_sliding(i), self.w[p + "sinks"])
        return self._linear(o.transpose(1, 0, 2).reshape(n, -1), p + "o_proj")

    def _sdpa(self, q, keys, vals, start: int, first: int, sliding: bool, sinks):
        """Attention with sinks of q [H, n, D] (positions start..) over keys/vals [Hkv, m, D] (positions first..).
        On the CPU device in blocks of queries, so the scores materialized stay under ATTN_SCRATCH."""
        mx, c, n = self.mx, self.config, q.shape[1]
        scale, sinks = 1.0 / math.sqrt(c.head_dim), sinks.astype(q.dtype)
        step = n if not self.on_cpu else max(1, ATTN_SCRATCH // (3 * q.shape[0] * keys.shape[1] * 4))
        outs = []
        for s in range(0, n, step):
            e = min(n, s + step)
            lo = max(0, start + s - c.sliding_window + 1 - first) if sliding else 0
            hi = start + e - first
            mask = None
            if e - s > 1 and sliding:
                qp, kp = mx.arange(start + s, start + e)[:, None], mx.arange(first + lo, first + hi)[None, :]
                mask = (kp <= qp) & (qp - kp < c.sliding_window)
            elif e - s > 1:
                mask = "causal"  # keys end where the block's queries end: bottom-right aligned
            outs.append(mx.fast.scaled_dot_product_attention(q[None, :, s:e], keys[None, :, lo:hi],
                                                             vals[None, :, lo:hi], scale=scale, mask=mask,
                                                             sinks=sinks)[0])
            if step < n:  # one block at a time: left lazy, MLX may run every block's scores at once
                mx.eval(outs[-1])
        return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)).astype(mx.float32)

    def _attend_q8(self, q, kq: list, vq: list, mask, sinks):
        """Attention with sinks over an 8-bit cache: q [H, n, D] float32; kq / vq (codes, scales, biases), each
        [Hkv, m, *]. Grouped-query: q is viewed as [Hkv, H/Hkv, n, D] against each kv head's quantized K and V."""
        mx, c = self.mx, self.config
        h, n, d = q.shape
        hkv, dim, group = c.num_key_value_heads, self.kv8_dim, self.kv8_group
        q = q * (1.0 / math.sqrt(d))
        if dim != d:
            q = mx.pad(q, [(0, 0), (0, 0), (0, dim - d)])
        q = q.reshape(hkv, h // hkv, n, dim)
        scores = mx.quantized_matmul(q, *[t[:, None] for t in kq], transpose=True, group_size=group, bits=8)
        if mask is not None:
            scores = mx.where(mask, scores, -math.inf)
        sink = sinks.astype(mx.float32).reshape(hkv, h // hkv, 1, 1)
        top = mx.maximum(scores.max(axis=-1, keepdims=True), sink)
        e = mx.exp(scores - top)
        p = e / (e.sum(axis=-1, keepdims=True) + mx.exp(sink - top))
        o = mx.quantized_matmul(p, *[t[:, None] for t in vq], transpose=False, group_size=group, bits=8)
        return o.reshape(h, n, dim)[..., :d]

    def _moe(self, i: int, x):
        mx, c, w = self.mx, self.config, self.w
        p = f"model.layers.{i}.mlp."
        g = self._linear(x, p + "router", widen=True)
        k = c.num_experts_per_tok
        idx = mx.argpartition(-g, kth=k - 1, axis=-1)[:, :k]
        weights = mx.softmax(mx.take_along_axis(g, idx, axis=-1), axis=-1, precise=True)
        e = p + "experts."
        xin, ridx = x[:, None, None, :], idx
        sort = idx.size >= 64  # many tokens: group them by expert (as mlx-lm's SwitchGLU does)
        if sort:
            flat = idx.reshape(-1)
            order = mx.argsort(flat)
            xin, ridx = x[:, None, :][order // k], flat[order]

        def qmm(a, name):
            y = mx.gather_qmm(a, w[name + ".weight"], w[name + ".scales"], None, rhs_indices=ridx, transpose=True,
                              group_size=32, bits=4, mode="mxfp4", sorted_indices=sort)
            return y + w[name + ".bias"][ridx][..., None, :].astype(mx.float32)

        with mx.stream(mx.cpu if i < self.cpu_moe else self.dev):  # --cpu-moe: these layers' experts on the CPU
            gate, up = mx.split(qmm(xin, e + "gu"), 2, axis=-1)
            gate = mx.minimum(gate, c.swiglu_limit)
            up = mx.clip(up, -c.swiglu_limit, c.swiglu_limit)
            y = qmm(gate * mx.sigmoid(c.swiglu_alpha * gate) * (up + 1.0), e + "down_proj")
        if sort:
            y = y[mx.argsort(order)]
        y = y.reshape(x.shape[0], k, -1)
        return (y * weights[..., None]).sum(axis=1)

    def _run(self, ids: list[int], logits: str) -> np.ndarray | None:
        mx = self.mx
        with mx.stream(self.dev):
            x = self._blocks(self._embed(mx.array(ids)), self.layers())
            self.ids.extend(ids)
            return self._head(x, logits)

    def _blocks(self, x, layers: range):
        """Run x (the positions after the cached ones) through `layers`, writing their KV; lazy."""
        mx, start, n = self.mx, self.length, x.shape[0]
        self._slide(start, n)
        ang = np.arange(start, start + n, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cos = mx.array(np.cos(ang) * np.float32(self.concentration))
        sin = mx.array(np.sin(ang) * np.float32(self.concentration))
        for i in layers:
            x = x + self._attention(i, self._norm(x, f"model.layers.{i}.input_layernorm.weight"), start, cos, sin)
            x = x + self._moe(i, self._norm(x, f"model.layers.{i}.post_attention_layernorm.weight"))
        return x

    def _cache_arrays(self) -> list:
        return [t for kv in self.cache for t in kv if t is not None]

    def _head(self, x, logits: str) -> np.ndarray | None:
        """Evaluate the cache and (unless logits is "none") the logits of the last or all positions of x."""
        mx = self.mx
        if logits == "none":
            mx.eval(self._cache_arrays())
            return None
        x = x if logits == "all" else x[-1:]
        out = self._linear(self._norm(x, "model.norm.weight"), "lm_head", bias=False)
        mx.eval(out, self._cache_arrays())
        return np.array(out.astype(mx.float32))


def config_layers(folder: Path) -> int:
    return int(load_json(Path(folder) / "config.json").get("num_hidden_layers", 0))

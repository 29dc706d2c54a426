"""gpt-oss in MLX: the whole forward pass and its KV cache in one file.

Precision: MXFP4 experts as stored; bf16 dense matrices held in float32 (`dense_dtype="bfloat16"` keeps them
bf16: half the memory, slower on CPU), q8 dense as stored; activations, residual stream,
RoPE (exact YaRN from `edgec.rope`, float32 angles) and softmax in float32. The KV cache is float32 by default
(bf16 K/V measurably moves logits on random-weight models: max |diff| 2.3 vs 3e-5 at 300 positions);
`kv_dtype="bfloat16"` or `kv_bits=8` trade fidelity for memory. `kv_bits=8` stores the full-attention layers' K and V
with MLX affine 8-bit quantization (`mx.quantize`: uint32-packed codes + float16 scale and bias per group along the
head dim; see `kv8_layout`) and attends with `mx.quantized_matmul` for q.k^T and p.v, the sink logit added to the
softmax denominator here (mlx-lm has no sinks with a quantized cache); sliding layers stay in `kv_dtype`.
Experts run without dequantizing through `mx.gather_qmm(..., mode="mxfp4")`; attention through
`mx.fast.scaled_dot_product_attention(..., sinks=...)`.

KV cache: full-attention layers grow in preallocated chunks (x1.5 at least, FULL_CHUNK steps) up to `max_context`;
sliding layers keep the last window + ROLLBACK_MARGIN positions (128 + 1024 for gpt-oss). `truncate(n)` is
exact: within the kept history it only moves the length; a rollback past it re-prefills the kept token ids
from scratch (rare, correct).
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import numpy as np

from ..errors import EdgecError, require
from ..rope import yarn_inv_freq
from ..spec import GptOssConfig, load_json
from .base import WindowedBackend, grown_capacity

FULL_CHUNK = 1024  # full-attention caches grow by this many positions
ROLLBACK_MARGIN = 1024  # extra sliding history kept beyond the window, so truncate(n) rarely recomputes
PREFILL_CHUNK = 512  # tokens per forward pass through the model during prefill (bounds attention memory)


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


def kv_cache_bytes(cfg: GptOssConfig, context: int, kv_bits: int | None = None, kv_dtype: str = "float32") -> int:
    """Bytes MlxBackend(max_context=context) holds once its cache is full, the same arithmetic as its allocation:
    full layers `context` positions (8-bit: 1 byte per stored value + float16 scale and bias per group), sliding
    layers window + ROLLBACK_MARGIN + PREFILL_CHUNK positions in `kv_dtype`."""
    base = {"float32": 4, "bfloat16": 2}[kv_dtype]
    per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * base  # K and V
    per_full = kv8_position_bytes(cfg) if kv_bits == 8 else per_pos
    sliding = cfg.sliding_window + ROLLBACK_MARGIN + PREFILL_CHUNK
    return len(cfg.full_layers) * context * per_full + len(cfg.sliding_layers) * sliding * per_pos


class MlxBackend(WindowedBackend):
    name = "mlx"

    def __init__(self, folder: str | Path, max_context: int | None = None, kv_bits: int | None = None,
                 kv_dtype: str = "float32", dense_dtype: str = "float32"):
        mx = self.mx = require("mlx.core", "mlx")
        folder = Path(folder)
        self.config = c = GptOssConfig.from_hf(load_json(folder / "config.json"), str(folder / "config.json"))
        quant = load_json(folder / "config.json").get("quantization", {})
        self.q8_group = next((v["group_size"] for v in quant.values() if isinstance(v, dict)), 64)
        self.w: dict = {}
        for f in sorted(glob.glob(str(folder / "model*.safetensors"))):
            self.w.update(mx.load(f))
        if not self.w:
            raise EdgecError(f"{folder}: no model*.safetensors (not an MLX folder from `edgec convert -t mlx`)")
        for n in range(c.num_hidden_layers):  # one gather_qmm for gate and up: rows [gate | up]
            p = f"model.layers.{n}.mlp.experts."
            for s in ("weight", "scales", "bias"):
                self.w[p + "gu." + s] = mx.concatenate([self.w.pop(p + "gate_proj." + s),
                                                        self.w.pop(p + "up_proj." + s)], axis=1)
        # small vectors in float32; unquantized dense matrices too by default: MLX's CPU matmul of float32
        # activations with bf16 weights casts the weight on every call (measured ~4x slower than float32 x float32)
        matrices = ("proj.weight", "router.weight", "lm_head.weight")
        for k in list(self.w):
            small = k.endswith(("sinks", "norm.weight", "layernorm.weight", "bias")) and "experts" not in k
            dense = dense_dtype == "float32" and k.endswith(matrices) and "experts" not in k \
                and k[: -len("weight")] + "scales" not in self.w
            if small or dense:
                self.w[k] = self.w[k].astype(mx.float32)
        mx.eval(self.w)
        if kv_bits not in (None, 8):
            raise EdgecError(f"kv_bits={kv_bits}: the MLX runtime quantizes the KV cache to 8 bits only")
        if kv_dtype not in ("float32", "bfloat16"):
            raise EdgecError(f"kv_dtype={kv_dtype!r}: the MLX runtime keeps the KV cache in float32 or bfloat16")
        self.kv_bits = kv_bits
        self.kv8_dim, self.kv8_group = kv8_layout(c.head_dim)
        self.kv_dtype = {"bfloat16": mx.bfloat16, "float32": mx.float32}[kv_dtype]
        self.max_context = max_context or c.max_position_embeddings
        inv_freq, self.concentration = yarn_inv_freq(c)
        self.inv_freq = inv_freq.astype(np.float32)
        self.keep = c.sliding_window + ROLLBACK_MARGIN
        self.reset()

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

    def _store(self, layer: int, k, v, start: int):  # noqa: ANN001
        """Write k/v [Hkv, n, D] at absolute positions start..; return the buffer views for attention (8-bit full
        layers: the (codes, scales, biases) triples of K and V)."""
        mx, c, n = self.mx, self.config, k.shape[1]
        kv = self.cache[layer]
        if self._quantized(layer):
            return self._store_q8(kv, k, v, start)
        if c.is_sliding(layer):
            cap, base = self.keep + PREFILL_CHUNK, self.sw_start
        else:
            need = start + n
            if need > self.max_context:
                raise EdgecError(f"context of {need} tokens exceeds max_context {self.max_context}")
            cap, base = grown_capacity(need, 0 if kv[0] is None else kv[0].shape[1], self.max_context, FULL_CHUNK), 0
        if kv[0] is None or kv[0].shape[1] < cap:
            shape = (c.num_key_value_heads, cap, c.head_dim)
            grown = [mx.zeros(shape, dtype=self.kv_dtype) for _ in range(2)]
            if kv[0] is not None:
                m = kv[0].shape[1]
                grown[0][:, :m], grown[1][:, :m] = kv[0], kv[1]
            kv[0], kv[1] = grown
        a = start - base
        kv[0][:, a : a + n] = k.astype(self.kv_dtype)
        kv[1][:, a : a + n] = v.astype(self.kv_dtype)
        return kv[0], kv[1], base

    def _store_q8(self, kv: list, k, v, start: int):  # noqa: ANN001
        """8-bit full layer: quantize each new position (groups along the head dim, so the positions already cached
        never change: truncate stays exact) and write it into buffers grown in FULL_CHUNK steps."""
        mx, c, n = self.mx, self.config, k.shape[1]
        need = start + n
        if need > self.max_context:
            raise EdgecError(f"context of {need} tokens exceeds max_context {self.max_context}")
        cap = grown_capacity(need, 0 if len(kv) == 2 else kv[0].shape[1], self.max_context, FULL_CHUNK)
        dim, group = self.kv8_dim, self.kv8_group
        if len(kv) == 2 or kv[0].shape[1] < cap:
            h = c.num_key_value_heads
            shapes = [((h, cap, dim // 4), mx.uint32), ((h, cap, dim // group), mx.float16),
                      ((h, cap, dim // group), mx.float16)] * 2
            grown = [mx.zeros(s, dtype=t) for s, t in shapes]
            if len(kv) == 6:
                m = kv[0].shape[1]
                for g, old in zip(grown, kv, strict=True):
                    g[:, :m] = old
            kv[:] = grown
        pad = [(0, 0), (0, 0), (0, dim - c.head_dim)]
        for j, x in ((0, k), (3, v)):
            x = mx.pad(x, pad) if dim != c.head_dim else x
            for t, part in zip(kv[j : j + 3], mx.quantize(x.astype(mx.float16), group_size=group, bits=8),
                               strict=True):
                t[:, start:need] = part
        return tuple(kv[:3]), tuple(kv[3:]), 0

    def _slide(self, start: int, n: int) -> None:
        """Before writing n positions at `start`, move the sliding buffers so they keep the last `keep` positions."""
        cap = self.keep + PREFILL_CHUNK
        if start + n - self.sw_start <= cap:
            return
        drop = start - self.keep - self.sw_start
        for i, kv in enumerate(self.cache):
            if self.config.is_sliding(i) and kv[0] is not None:
                for j in range(2):
                    kv[j][:, : start - self.sw_start - drop] = kv[j][:, drop : start - self.sw_start]
        self.sw_start += drop

    # ---- math --------------------------------------------------------------------------------------------
    def _linear(self, x, name: str, bias: bool = True):  # noqa: ANN001
        mx, w = self.mx, self.w
        if name + ".scales" in w:
            y = mx.quantized_matmul(x, w[name + ".weight"], w[name + ".scales"], w[name + ".biases"], transpose=True,
                                    group_size=self.q8_group, bits=8)
        else:
            y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    def _embed(self, ids):  # noqa: ANN001
        mx, w = self.mx, self.w
        if "model.embed_tokens.scales" in w:
            return mx.dequantize(w["model.embed_tokens.weight"][ids], w["model.embed_tokens.scales"][ids],
                                 w["model.embed_tokens.biases"][ids], group_size=self.q8_group, bits=8
                                 ).astype(mx.float32)
        return w["model.embed_tokens.weight"][ids].astype(mx.float32)

    def _norm(self, x, name: str):  # noqa: ANN001
        return self.mx.fast.rms_norm(x, self.w[name], self.config.rms_norm_eps)

    def _rope(self, x, cos, sin):  # noqa: ANN001
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return self.mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _attention(self, i: int, x, start: int, cos, sin):  # noqa: ANN001
        mx, c, n = self.mx, self.config, x.shape[0]
        p = f"model.layers.{i}.self_attn."
        heads = lambda t: t.reshape(n, -1, c.head_dim).transpose(1, 0, 2)  # noqa: E731
        q = self._rope(heads(self._linear(x, p + "q_proj")), cos, sin)
        k = self._rope(heads(self._linear(x, p + "k_proj")), cos, sin)
        v = heads(self._linear(x, p + "v_proj"))
        kb, vb, base = self._store(i, k, v, start)
        end = start + n
        first = max(base, start - c.sliding_window + 1) if c.is_sliding(i) else 0
        mask = None
        if n > 1:
            qp = mx.arange(start, end)[:, None]
            kp = mx.arange(first, end)[None, :]
            mask = kp <= qp
            if c.is_sliding(i):
                mask = mask & (qp - kp < c.sliding_window)
        if self._quantized(i):
            o = self._attend_q8(q, [t[:, :end] for t in kb], [t[:, :end] for t in vb], mask, self.w[p + "sinks"])
        else:
            keys = kb[:, first - base : end - base].astype(mx.float32)[None]
            vals = vb[:, first - base : end - base].astype(mx.float32)[None]
            o = mx.fast.scaled_dot_product_attention(q[None], keys, vals, scale=1.0 / math.sqrt(c.head_dim),
                                                     mask=mask, sinks=self.w[p + "sinks"])[0]
        return self._linear(o.transpose(1, 0, 2).reshape(n, -1), p + "o_proj")

    def _attend_q8(self, q, kq: list, vq: list, mask, sinks):  # noqa: ANN001
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
        sink = sinks.reshape(hkv, h // hkv, 1, 1)
        top = mx.maximum(scores.max(axis=-1, keepdims=True), sink)
        e = mx.exp(scores - top)
        p = e / (e.sum(axis=-1, keepdims=True) + mx.exp(sink - top))
        o = mx.quantized_matmul(p, *[t[:, None] for t in vq], transpose=False, group_size=group, bits=8)
        return o.reshape(h, n, dim)[..., :d]

    def _moe(self, i: int, x):  # noqa: ANN001
        mx, c, w = self.mx, self.config, self.w
        p = f"model.layers.{i}.mlp."
        g = self._linear(x, p + "router")
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

        def qmm(a, name):  # noqa: ANN001, ANN202
            y = mx.gather_qmm(a, w[name + ".weight"], w[name + ".scales"], None, rhs_indices=ridx, transpose=True,
                              group_size=32, bits=4, mode="mxfp4", sorted_indices=sort)
            return y + w[name + ".bias"][ridx][..., None, :].astype(mx.float32)

        gate, up = mx.split(qmm(xin, e + "gu"), 2, axis=-1)
        gate = mx.minimum(gate, c.swiglu_limit)
        up = mx.clip(up, -c.swiglu_limit, c.swiglu_limit)
        y = qmm(gate * mx.sigmoid(c.swiglu_alpha * gate) * (up + 1.0), e + "down_proj")
        if sort:
            y = y[mx.argsort(order)]
        y = y.reshape(x.shape[0], k, -1)
        return (y * weights[..., None]).sum(axis=1)

    def _step(self, ids: list[int], all_logits: bool):
        mx, c = self.mx, self.config
        start, n = self.length, len(ids)
        self._slide(start, n)
        ang = np.arange(start, start + n, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cos = mx.array(np.cos(ang) * np.float32(self.concentration))
        sin = mx.array(np.sin(ang) * np.float32(self.concentration))
        x = self._embed(mx.array(ids))
        for i in range(c.num_hidden_layers):
            x = x + self._attention(i, self._norm(x, f"model.layers.{i}.input_layernorm.weight"), start, cos, sin)
            x = x + self._moe(i, self._norm(x, f"model.layers.{i}.post_attention_layernorm.weight"))
        self.ids.extend(ids)
        x = x if all_logits else x[-1:]
        logits = self._linear(self._norm(x, "model.norm.weight"), "lm_head", bias=False)
        mx.eval(logits, *[t for kv in self.cache for t in kv if t is not None])
        return logits

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:  # noqa: ANN001
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        if not ids:
            raise EdgecError("forward needs at least one token id")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise EdgecError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        outs = []
        for s in range(0, len(ids), PREFILL_CHUNK):
            last = s + PREFILL_CHUNK >= len(ids)
            out = self._step(ids[s : s + PREFILL_CHUNK], all_logits)
            if all_logits or last:
                outs.append(np.array(out.astype(self.mx.float32)))
        return np.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]

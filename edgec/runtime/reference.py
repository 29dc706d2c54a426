"""The ground truth: gpt-oss forward pass in numpy float32 with OpenAI's reference semantics.

Reads weights straight from the checkpoint's memory map; experts are decoded from MXFP4 only for the experts
some token routes to, and lm_head is applied in row chunks, so a full-size checkpoint runs on a laptop.
"""

from __future__ import annotations

import numpy as np

from ..checkpoint import Checkpoint
from ..rope import apply_rope, cos_sin
from ..safetensors_io import bf16_to_f32
from ..spec import GptOssConfig

Q_CHUNK = 128  # query rows per attention block (bounds memory at long context)
VOCAB_CHUNK = 16384  # lm_head rows converted to float32 at a time


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, sinks: np.ndarray, window: int | None,
              q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """q [Hq, n, d], k/v [Hkv, m, d], sinks [Hq] -> [n, Hq*d]. Causal, optional sliding window, sink logits.

    k_pos must be ascending; each block of queries only scores the keys its mask can allow (a window's worth on
    sliding layers), which is the same math as masking the rest to -inf."""
    hq, n, d = q.shape
    group = hq // k.shape[0]
    kk, vv = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    out = np.empty((n, hq, d), dtype=np.float32)
    for s in range(0, n, Q_CHUNK):
        qp = q_pos[s : s + Q_CHUNK, None]
        hi = int(np.searchsorted(k_pos, qp.max(), side="right"))
        lo = 0 if window is None else int(np.searchsorted(k_pos, qp.min() - window + 1, side="left"))
        kp = k_pos[None, lo:hi]
        allowed = kp <= qp
        if window is not None:
            allowed &= (qp - kp) < window
        scores = np.matmul(q[:, s : s + Q_CHUNK], kk[:, lo:hi].transpose(0, 2, 1)) / np.sqrt(d)
        scores = np.where(allowed[None], scores, -np.inf)
        m = np.maximum(scores.max(axis=-1, keepdims=True), sinks[:, None, None])
        e = np.exp(scores - m)
        p = e / (e.sum(axis=-1, keepdims=True) + np.exp(sinks[:, None, None] - m))
        out[s : s + Q_CHUNK] = np.matmul(p, vv[:, lo:hi]).transpose(1, 0, 2)
    return out.reshape(n, hq * d)


class Reference:
    """`Reference(ckpt).logits(ids)` -> float32 logits [positions, vocab]."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.cfg: GptOssConfig = ckpt.config

    def _w(self, name: str) -> np.ndarray:
        return self.ckpt.f32(name)

    def attn_block(self, n: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        c, p = self.cfg, f"model.layers.{n}.self_attn."
        h = rms_norm(x, self._w(f"model.layers.{n}.input_layernorm.weight"), c.rms_norm_eps)
        q = h @ self._w(p + "q_proj.weight").T + self._w(p + "q_proj.bias")
        k = h @ self._w(p + "k_proj.weight").T + self._w(p + "k_proj.bias")
        v = h @ self._w(p + "v_proj.weight").T + self._w(p + "v_proj.bias")
        heads = lambda t: t.reshape(len(pos), -1, c.head_dim).transpose(1, 0, 2)
        cos, sin = cos_sin(c, pos)
        q, k, v = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin), heads(v)
        window = c.sliding_window if c.is_sliding(n) else None
        o = attention(q, k, v, self._w(p + "sinks"), window, pos, pos)
        return x + o @ self._w(p + "o_proj.weight").T + self._w(p + "o_proj.bias")

    def moe_block(self, n: int, x: np.ndarray) -> np.ndarray:
        c, p = self.cfg, f"model.layers.{n}."
        h = rms_norm(x, self._w(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        g = h @ self._w(p + "mlp.router.weight").T + self._w(p + "mlp.router.bias")
        top = np.argsort(-g, axis=-1, kind="stable")[:, : c.num_experts_per_tok]
        weights = softmax(np.take_along_axis(g, top, axis=-1))
        b1, b2 = self.ckpt.f32(p + "mlp.experts.gate_up_proj_bias"), self.ckpt.f32(p + "mlp.experts.down_proj_bias")
        out = np.zeros_like(x)
        for e in np.unique(top):
            tok, slot = np.nonzero(top == e)
            w1 = self.ckpt.experts(n, "gate_up_proj", [e])[0]
            w2 = self.ckpt.experts(n, "down_proj", [e])[0]
            hh = h[tok] @ w1.T + b1[e]
            gate = np.minimum(hh[:, 0::2], c.swiglu_limit)
            up = np.clip(hh[:, 1::2], -c.swiglu_limit, c.swiglu_limit)
            a = gate / (1.0 + np.exp(-c.swiglu_alpha * gate)) * (up + 1.0)
            y = a @ w2.T + b2[e]
            np.add.at(out, tok, weights[tok, slot][:, None] * y)
        return x + out

    def hidden(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Final-normed hidden states [n, hidden] for a whole sequence starting at position 0."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.arange(len(ids))
        x = bf16_to_f32(self.ckpt.raw("model.embed_tokens.weight")[ids])
        for n in range(self.cfg.num_hidden_layers):
            x = self.attn_block(n, x, pos)
            x = self.moe_block(n, x)
        return rms_norm(x, self._w("model.norm.weight"), self.cfg.rms_norm_eps)

    def logits(self, ids: list[int] | np.ndarray, last: int | None = None) -> np.ndarray:
        """float32 logits [positions, vocab] (only the last `last` positions when given)."""
        h = self.hidden(ids)
        if last is not None:
            h = h[-last:]
        head = self.ckpt.raw("lm_head.weight")
        out = np.empty((h.shape[0], head.shape[0]), dtype=np.float32)
        for s in range(0, head.shape[0], VOCAB_CHUNK):
            out[:, s : s + VOCAB_CHUNK] = h @ bf16_to_f32(head[s : s + VOCAB_CHUNK]).T
        return out

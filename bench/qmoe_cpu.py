"""Expert representations on onnxruntime's CPU QMoE kernel: one 20b-shaped MoE layer (2880 x 2880, top-4 of E
experts) with MXFP4 weights whose block scales spread over --spread binades, against a float64 numpy MoE.

    .venv/bin/python bench/qmoe_cpu.py [--experts 32] [--spread 2] [--repeat 20]

Prints, per representation: max |err| / max |out| for 1 and 64 tokens, median decode (1 token) and 64-token times,
and bits per weight. The per-channel INT8 form (edgec's former "exact" scheme) only exists when every row's scales
fit int8 (about 3 binades): use --spread 2 to include it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgec import mxfp4

H = INTER = 2880
TOP_K, ALPHA, LIM = 4, 1.702, 7.0
FLOAT, UINT8, E8M0 = 1, 2, 24


def channel_int8(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The former per-channel INT8 form: one power-of-two scale per row, or None when a row does not fit."""
    q, s = mxfp4.to_int8(blocks, scales)  # q [N, K], s [N, G] = 2**(e - 128)
    qa = np.abs(q.reshape(*s.shape, 32).astype(np.int64))
    low = np.where(qa > 0, np.log2(np.where(qa > 0, qa & -qa, 1)), 99).min(-1)  # lowest set bit per block
    e = np.round(np.log2(s)).astype(np.int64)
    r = np.where(low < 99, e + low, 1 << 20).min(-1)  # exponent of each row's lowest set bit
    r = np.where(r == 1 << 20, 0, r)
    vals = (q.reshape(*s.shape, 32) * 2.0 ** (e - r[:, None])[..., None]).reshape(q.shape)
    if np.abs(vals).max() > 127:
        return None
    return (vals + 128).astype(np.uint8), (2.0 ** r).astype(np.float32)


def main() -> None:
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--spread", type=int, default=2, help="binades of the block scales (normal, clipped)")
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    E, rng = a.experts, np.random.default_rng(0)

    def mx(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        c = 127 + round(np.log2(1 / (np.sqrt(68.5 / 8) * np.sqrt(k))))
        off = np.clip(np.round(rng.standard_normal((E, n, k // 32)) * a.spread / 4), -(a.spread // 2), a.spread // 2)
        return rng.integers(0, 256, (E, n, k // 32, 16), dtype=np.uint8), (c + off).astype(np.uint8)

    (b1, s1), (b2, s2) = mx(2 * INTER, H), mx(H, INTER)
    bias1 = (rng.standard_normal((E, 2 * INTER)) * 0.1).astype(np.float32)
    bias2 = (rng.standard_normal((E, H)) * 0.1).astype(np.float32)

    def ref(x: np.ndarray, router: np.ndarray) -> np.ndarray:
        y = np.zeros((len(x), H))
        for t in range(len(x)):
            top = np.argsort(-router[t])[:TOP_K]
            w = np.exp(router[t, top] - router[t, top].max())
            for e, we in zip(top, w / w.sum(), strict=True):
                h = mxfp4.decode(b1[e], s1[e]).astype(np.float64) @ x[t] + bias1[e]
                g, u = np.minimum(h[0::2], LIM), np.clip(h[1::2], -LIM, LIM)
                y[t] += we * (mxfp4.decode(b2[e], s2[e]).astype(np.float64) @ (g / (1 + np.exp(-ALPHA * g)) * (u + 1))
                              + bias2[e])
        return y

    def session(inits: dict, attrs: dict):
        names = ["x", "router", "w1", "s1", "b1", "w2", "s2", "b2", "", "", "", "", "", ""]
        if "g1" in inits:
            names += ["", "g1", "g2"]
        tensors = []
        for n, v in inits.items():
            t = numpy_helper.from_array(v[0] if isinstance(v, tuple) else v, n)
            if isinstance(v, tuple):
                t.data_type = v[1]
            tensors.append(t)
        node = helper.make_node("QMoE", names, ["y"], domain="com.microsoft", activation_type="swiglu",
                                activation_alpha=ALPHA, activation_beta=1.0, swiglu_limit=LIM, swiglu_fusion=1,
                                k=TOP_K, normalize_routing_weights=1, use_sparse_mixer=0, **attrs)
        g = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", FLOAT, ["T", H]),
                                              helper.make_tensor_value_info("router", FLOAT, ["T", E])],
                              [helper.make_tensor_value_info("y", FLOAT, ["T", H])], tensors)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def fp4_rows():  # edgec's onnx-cpu mxfp4: the checkpoint's bytes, logical dims [E, K, N/2]
        ones = np.ones(E, dtype=np.float32)
        return (dict(w1=b1.reshape(E, H, INTER), s1=(s1, E8M0), b1=bias1, w2=b2.reshape(E, INTER, H // 2),
                     s2=(s2, E8M0), b2=bias2, g1=ones, g2=ones),
                dict(expert_weight_bits=4, block_size=32, quant_type="fp4", weights_prepacked=1), 4.25)

    def int8_blocks():
        (q1, c1), (q2, c2) = mxfp4.to_int8(b1, s1), mxfp4.to_int8(b2, s2)
        return (dict(w1=q1.view(np.uint8) ^ np.uint8(128), s1=c1, b1=bias1, w2=q2.view(np.uint8) ^ np.uint8(128),
                     s2=c2, b2=bias2), dict(expert_weight_bits=8, block_size=32), 9.0)

    def int8_channel():
        r1 = [channel_int8(b1[e], s1[e]) for e in range(E)]
        r2 = [channel_int8(b2[e], s2[e]) for e in range(E)]
        if any(r is None for r in r1 + r2):
            raise ValueError("a row's scales span more than per-channel int8 holds")
        return (dict(w1=np.stack([r[0] for r in r1]), s1=np.stack([r[1] for r in r1]), b1=bias1,
                     w2=np.stack([r[0] for r in r2]), s2=np.stack([r[1] for r in r2]), b2=bias2),
                dict(expert_weight_bits=8), 8.0)

    def int4_blocks():
        (p1, c1), (p2, c2) = mxfp4.to_qmoe_int4(b1, s1), mxfp4.to_qmoe_int4(b2, s2)
        return dict(w1=p1, s1=c1, b1=bias1, w2=p2, s2=c2, b2=bias2), dict(expert_weight_bits=4, block_size=32), 5.0

    xs = {t: (rng.standard_normal((t, H)).astype(np.float32), rng.standard_normal((t, E)).astype(np.float32))
          for t in (1, 64)}
    refs = {1: ref(*xs[1]), 64: ref(xs[64][0][:8], xs[64][1][:8])}
    print(f"{E} experts, scales spread {a.spread} binades; onnxruntime {ort.__version__}")
    for name, make in (("fp4 row-major (edgec mxfp4)", fp4_rows), ("int8 per-channel (former exact)", int8_channel),
                       ("int8 blocks of 32", int8_blocks), ("int4 blocks of 32", int4_blocks)):
        try:
            inits, attrs, bits = make()
        except ValueError as e:
            print(f"{name:32s} n/a: {e}")
            continue
        s = session(inits, attrs)
        del inits

        def run(t: int, s=s) -> np.ndarray:
            return s.run(None, {"x": xs[t][0], "router": xs[t][1]})[0]
        err1 = np.abs(run(1) - refs[1]).max() / np.abs(refs[1]).max()
        err64 = np.abs(run(64)[:8] - refs[64]).max() / np.abs(refs[64]).max()
        dec = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            run(1)
            dec.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run(64)
        pre = time.perf_counter() - t0
        print(f"{name:32s} err {err1:.1e} / {err64:.1e}  decode {statistics.median(dec) * 1e3:6.2f} ms  "
              f"64 tokens {pre * 1e3:6.1f} ms  {bits:.2f} bits/weight", flush=True)


if __name__ == "__main__":
    main()

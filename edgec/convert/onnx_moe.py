"""The MoE layer of edgec's ONNX graphs, one builder per expert format (from the MXFP4 blocks, one expert at a time):
  mxfp4  QMoE quant_type fp4 + FLOAT8E8M0 scales: the checkpoint's bytes, either as stored (row-major [E, N, K/2],
         `weights_prepacked=1`: onnxruntime's CPU kernel, exact at any scale spread) or repacked N-major to
         [E, K, N/2] for CUDA (profile key `[experts] mxfp4_layout`); with `[experts] ops = "standard"` (DirectML)
         the checkpoint's bytes as they are, decoded in the graph by a Gather on a (scale, byte) table for the
         experts the tokens of a run route to (`_moe_mxfp4_lut`)
  exact  INT8 QMoE, blocks of 32 (zero point 128, scale 2**(s-128) in the io dtype): every MXFP4 value exactly,
         whatever the scale spread, as long as the io dtype holds the scale (fp16: E8M0 104..143; else warned)
  int4   INT4 QMoE, per-block scale chosen to minimise squared error (`mxfp4.to_qmoe_int4`; lossy)
  decomposed  dequantized expert matrices in the io dtype (exact)
All take the layer's normed hidden state and router logits and return the MoE output (com.microsoft.QMoE: swiglu,
interleaved fusion; the standard-op forms compute the same). Where a QMoE expert tensor of all E experts is over the
target's buffer cap (onnx-webgpu's max_buffer_bytes, `convert --max-buffer`), the experts are split into groups, one
QMoE node each, with gpt-oss's routing over all E kept (`_grouped`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import mxfp4
from ..checkpoint import Checkpoint
from ..errors import EdgecError
from .onnx_graph import (
    BOOL,
    FLOAT,
    FLOAT8E8M0,
    INT32,
    IO_CODE,
    UINT8,
    ExternalData,
    Graph,
    bf16_to_io,
    keep_scales,
    to_io,
)

MOE_KIND = {"mxfp4": "QMoE fp4 (the checkpoint's MXFP4 bytes)", "exact": "QMoE int8, blocks of 32 (exact MXFP4)",
            "int4": "QMoE int4, blocks of 32 (lossy)", "decomposed": "decomposed MatMuls (dense experts)"}


def moe(g: Graph, ext: ExternalData, ckpt: Checkpoint, i: int, h: str, router: str, io: str, experts: str,
        profile: dict[str, Any]) -> str:
    """Layer i's experts written through `ext` in the `experts` format, and the nodes that apply them to `h`."""
    if experts == "decomposed":
        return _moe_decomposed(g, ext, ckpt, i, h, router, io)
    if experts == "mxfp4" and _standard_ops(profile):
        return _moe_mxfp4_lut(g, ext, ckpt, i, h, router, io)
    return _qmoe(g, ext, ckpt, i, h, router, io, experts, profile)


def moe_kind(profile: dict[str, Any], experts: str) -> str:
    """What `moe` builds for this target and expert format, in words (edgec.json's recipe.moe)."""
    if _standard_ops(profile) and experts == "mxfp4":
        return "MXFP4 bytes decoded in the graph (standard ops)"
    return MOE_KIND[experts]


def _standard_ops(profile: dict[str, Any]) -> bool:
    """Whether the target's provider lacks a MoE kernel, so experts are built from standard ONNX ops."""
    return (profile.get("experts") or {}).get("ops") == "standard"


def _qmoe(g: Graph, ext: ExternalData, ckpt: Checkpoint, i: int, h: str, router: str, io: str, experts: str,
          profile: dict[str, Any]) -> str:
    """com.microsoft.QMoE over all E experts; over expert groups (`_grouped`) where one of its expert tensors of
    all E is over the target's buffer cap (`ext.cap`: onnx-webgpu's max_buffer_bytes, or `--max-buffer`)."""
    cfg = ckpt.config
    E, H, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    item, pack = ext.width(IO_CODE[io]), 1 if experts == "exact" else 2
    scale_item = 1 if experts == "mxfp4" else item  # E8M0 bytes, or scales in the io dtype
    per_expert = [b for n, kk in ((2 * inter, H), (H, inter)) for b in (n * kk // pack, n * kk // 32 * scale_item,
                                                                        n * item)]  # qweight, scales, bias
    groups = expert_groups(E, max(per_expert), ext.cap)
    g.expert_groups = len(groups)
    probs = g.node("Reshape", [router, g.i64(-1, E)], name=f"/model/layers.{i}/moe/router/Reshape")[0]
    if len(groups) == 1:
        return _qmoe_group(g, ext, ckpt, i, h, probs, io, experts, profile, 0, E, "")
    return _grouped(g, ext, ckpt, i, h, probs, io, experts, profile, groups)


def expert_groups(E: int, per_expert: int, cap: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...]: the E experts in the fewest contiguous groups of ceil(E/G) (the last smaller) whose tensors
    fit `cap` bytes (0: no cap), `per_expert` the bytes one expert adds to the largest. One expert over the cap
    still makes a group of one (ExternalData refuses its tensor in one line)."""
    if not cap or E * per_expert <= cap:
        return [(0, E)]
    n = -(-E // max(1, cap // per_expert))
    step = -(-E // n)
    return [(lo, min(E, lo + step)) for lo in range(0, E, step)]


def _qmoe_group(g: Graph, ext: ExternalData, ckpt: Checkpoint, i: int, h: str, probs: str, io: str, experts: str,
                profile: dict[str, Any], lo: int, hi: int, tag: str) -> str:
    """One QMoE node over experts lo..hi (router logits `probs` [T, hi - lo], top-min(k, hi - lo)), its tensors
    named `model.layers.{i}.moe.experts.{tag}{gate_up_proj|down_proj}.*` (tag "" for all the experts)."""
    cfg = ckpt.config
    H, inter, E = cfg.hidden_size, cfg.intermediate_size, hi - lo
    p, code = f"model.layers.{i}.", IO_CODE[io]
    rows = experts == "mxfp4" and profile.get("experts", {}).get("mxfp4_layout") == "rows"
    names = []
    for which, n, k in (("gate_up_proj", 2 * inter, H), ("down_proj", H, inter)):
        src = p + f"mlp.experts.{which}"
        blocks, scales = ckpt.raw(src + "_blocks"), ckpt.raw(src + "_scales")
        dst = p + f"moe.experts.{tag}{which}"
        if experts == "mxfp4":  # dims are the logical [E, K, N/2] in both layouts
            pack = np.asarray if rows else mxfp4.to_qmoe_fp4
            ext.add(dst + ".qweight", UINT8, (E, k, n // 2), (pack(blocks[e]) for e in range(lo, hi)))
            ext.add(dst + ".scales", FLOAT8E8M0, (E, n, k // 32), (np.asarray(scales[e]) for e in range(lo, hi)))
        else:
            conv = _int8 if experts == "exact" else mxfp4.to_qmoe_int4
            # weights and scales go to two tensors: write weights first, keeping only the small scales
            sc: list[np.ndarray] = []
            pack = 1 if experts == "exact" else 2
            ext.add(dst + ".qweight", UINT8, (E, n, k // pack),
                    (keep_scales(conv(blocks[e], scales[e]), sc) for e in range(lo, hi)))
            ext.add(dst + ".scales", code, (E, n, k // 32), (to_io(s_, io) for s_ in sc))
            if experts == "exact" and io == "fp16":  # 2**(s-128) is exact in fp16 for E8M0 104..143 only
                bad = sum(int(((s_ < 2.0 ** -24) | (s_ > 2.0 ** 15)).sum()) for s_ in sc)
                if bad:
                    g.scale_clipped[i] = g.scale_clipped.get(i, 0) + bad
        ext.add(dst + ".bias", code, (E, n), bf16_to_io(ckpt.raw(src + "_bias")[lo:hi], io))
        names.append(dst)
    (w1, w2) = names
    inputs = [h, probs, w1 + ".qweight", w1 + ".scales", w1 + ".bias", w2 + ".qweight", w2 + ".scales", w2 + ".bias",
              "", "", "", "", "", ""]
    attrs = dict(activation_alpha=cfg.swiglu_alpha, activation_beta=1.0, activation_type="swiglu",
                 expert_weight_bits=8 if experts == "exact" else 4, k=min(cfg.num_experts_per_tok, E), block_size=32,
                 normalize_routing_weights=1, swiglu_fusion=1, use_sparse_mixer=0, swiglu_limit=cfg.swiglu_limit)
    if experts == "mxfp4":
        for nm in (w1, w2):
            ext.add(nm + ".global_scales", FLOAT, (E,), np.ones(E, dtype=np.float32))
        inputs += ["", w1 + ".global_scales", w2 + ".global_scales"]
        attrs["quant_type"] = "fp4"
        if rows:
            attrs["weights_prepacked"] = 1  # "row-major MXFP4": the layout onnxruntime's CPU kernel runs
    elif profile.get("execution_provider") == "CUDAExecutionProvider":  # integer experts on CUDA: absent means
        attrs["weights_prepacked"] = 0  # CUTLASS-prepacked; ours are raw [E, N, K/pack], as the builder marks them
    return g.node("QMoE", inputs, name=f"/model/layers.{i}/moe/{tag.replace('.', '/')}QMoE", domain="com.microsoft",
                  **attrs)[0]


# A group's router input (`_grouped`): a chosen expert's logit less the token's top-1 logit, floored at -CHOSEN_FLOOR;
# every other expert at -UNCHOSEN. Both finite in fp16, and exp() of both is a normal float32 (> 0, under 1)
CHOSEN_FLOOR, UNCHOSEN = 40.0, 80.0


def _grouped(g: Graph, ext: ExternalData, ckpt: Checkpoint, i: int, h: str, logits: str, io: str, experts: str,
             profile: dict[str, Any], groups: list[tuple[int, int]]) -> str:
    """The MoE over G expert groups (`expert_groups`), each its own QMoE node and tensors (`...moe.experts.g{j}.*`),
    so no expert tensor is over the target's buffer cap (20b's int4 gate_up of 32 experts is 253 MiB; WebGPU
    guarantees a 128 MiB binding). Routing stays gpt-oss's, top-k over all E logits and a softmax over those k:
      TopK(k) of the [T, E] logits once: vals, idx; w = Softmax(vals) [T, k]
      chosen [T, E]: Equal(idx, arange(E)), ReduceMax over the k (as `_moe_mxfp4_lut`)
      group g's router input: Slice lo_g..hi_g of Where(chosen, max(logit - top-1 logit, -CHOSEN_FLOOR), -UNCHOSEN)
      S_g [T, 1]: the sum of w over the chosen experts in group g (its share of the softmax mass)
      output = sum_g S_g * QMoE_g(h, logits_g), with k_g = min(k, group size)
    QMoE_g takes the top k_g of its logits and a softmax over them: its c_g chosen experts (shift-invariant: their
    weights within the group) and k_g - c_g others, each weighted <= e**(CHOSEN_FLOOR - UNCHOSEN) = e**-40 of a chosen
    one; times S_g, each chosen expert gets its gpt-oss weight. A group with no chosen expert (S_g = 0) gets a
    finite uniform mix of k_g experts, and 0 * finite = 0: no NaN. Finite is not enough: some of onnxruntime's QMoE
    gates take exp() of the logits without subtracting their max (the multi-token `gate.wgsl.template` at some
    commits) and divide by the sum unguarded, where a -1e4 fill would make every exp() 0 and the weights 0/0 = NaN
    (and NaN * 0 is NaN). Shifted by the top-1 logit and floored, every value's exp() is a normal float32, so the
    weights are the same whether a kernel subtracts the max or not (onnxruntime 1.32 CPU and onnxruntime-web 1.31.1
    both gave finite outputs on an all -1e4 router row here).
    The cost: each token runs k_g experts in every group, G x the expert work at decode (a prompt's tokens route to
    most experts anyway), plus G QMoE launches; only outputs converted with a cap below the expert tensor pay it."""
    cfg = ckpt.config
    E, H, k, code = cfg.num_local_experts, cfg.hidden_size, cfg.num_experts_per_tok, IO_CODE[io]
    q = f"/model/layers.{i}/moe"
    vals, idx = g.node("TopK", [logits, g.i64(k)], n_out=2, name=q + "/TopK", axis=-1, largest=1, sorted=1)
    w = g.node("Softmax", [vals], name=q + "/Softmax", axis=-1)[0]  # [T, k]
    hit = g.node("Equal", [g.node("Unsqueeze", [idx, g.i64(-1)])[0],
                           g.const("/const/i64/experts", np.arange(E, dtype=np.int64))])[0]  # [T, k, E]
    hit = g.node("Cast", [hit], to=code)[0]
    share = g.node("ReduceSum", [g.node("Mul", [hit, g.node("Unsqueeze", [w, g.i64(-1)])[0]])[0], g.i64(1)],
                   name=q + "/Share", keepdims=0)[0]  # [T, E]: each expert's routing weight, 0 where not chosen
    chosen = g.node("Cast", [g.node("ReduceMax", [hit, g.i64(1)], keepdims=0)[0]], to=BOOL)[0]  # [T, E]
    top = g.node("Slice", [vals, g.i64(0), g.i64(1), g.i64(1)])[0]  # [T, 1]: the top-1 logit
    shifted = g.node("Max", [g.node("Sub", [logits, top])[0], g.scalar(-CHOSEN_FLOOR, io)])[0]
    masked = g.node("Where", [chosen, shifted, g.scalar(-UNCHOSEN, io)], name=q + "/Masked")[0]  # [T, E]
    cut = lambda x, lo, hi: g.node("Slice", [x, g.i64(lo), g.i64(hi), g.i64(1)])[0]  # [T, E] -> experts lo..hi
    out = None
    for j, (lo, hi) in enumerate(groups):
        s = g.node("ReduceSum", [cut(share, lo, hi), g.i64(1)], name=f"{q}/g{j}/Share", keepdims=1)[0]  # [T, 1]
        y = _qmoe_group(g, ext, ckpt, i, h, cut(masked, lo, hi), io, experts, profile, lo, hi, f"g{j}.")
        y = g.node("Mul", [g.node("Reshape", [y, g.i64(-1, H)])[0], s], name=f"{q}/g{j}/Mul")[0]  # [T, H]
        out = y if out is None else g.node("Add", [out, y], name=f"{q}/g{j}/Add")[0]
    return g.node("Reshape", [out, g.node("Shape", [h])[0]], name=q + "/Output")[0]


def _int8(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact INT8 blocks of 32 for QMoE: uint8 [N, K] with zero point 128, float32 scales [N, K/32]."""
    q, s = mxfp4.to_int8(blocks, scales)
    return q.view(np.uint8) ^ np.uint8(0x80), s


def _moe_decomposed(g: Graph, ext: ExternalData, ckpt: Checkpoint, i: int, h: str, router: str, io: str) -> str:
    """MoE without a MoE kernel (DirectML): TopK, Softmax, Gather of the chosen experts' dense matrices, MatMul."""
    cfg = ckpt.config
    E, H, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    k = cfg.num_experts_per_tok
    p, q, code = f"model.layers.{i}.", f"/model/layers.{i}/moe", IO_CODE[io]
    for which, shape in (("gate_up_proj", (E, 2 * inter, H)), ("down_proj", (E, H, inter))):
        src = p + f"mlp.experts.{which}"
        ext.add(p + f"moe.experts.{which}.weight", code, shape,
                (to_io(ckpt.experts(i, which, [e])[0], io) for e in range(E)))
        ext.add(p + f"moe.experts.{which}.bias", code, shape[:2], bf16_to_io(ckpt.raw(src + "_bias"), io))
    vals, idx = g.node("TopK", [router, g.i64(k)], n_out=2, name=q + "/TopK", axis=-1, largest=1, sorted=1)
    w = g.node("Softmax", [vals], name=q + "/Softmax", axis=-1)[0]
    xe = g.node("Unsqueeze", [h, g.i64(2, 4)])[0]  # [B,S,1,H,1]
    w1 = g.node("Gather", [p + "moe.experts.gate_up_proj.weight", idx], axis=0)[0]  # [B,S,k,2I,H]
    b1 = g.node("Gather", [p + "moe.experts.gate_up_proj.bias", idx], axis=0)[0]  # [B,S,k,2I]
    hh = g.node("Add", [g.node("Squeeze", [g.node("MatMul", [w1, xe])[0], g.i64(-1)])[0], b1])[0]
    act = _swiglu(g, hh, -1, cfg, io)
    w2 = g.node("Gather", [p + "moe.experts.down_proj.weight", idx], axis=0)[0]  # [B,S,k,H,I]
    b2 = g.node("Gather", [p + "moe.experts.down_proj.bias", idx], axis=0)[0]
    y = g.node("MatMul", [w2, g.node("Unsqueeze", [act, g.i64(-1)])[0]])[0]
    y = g.node("Add", [g.node("Squeeze", [y, g.i64(-1)])[0], b2])[0]  # [B,S,k,H]
    y = g.node("Mul", [y, g.node("Unsqueeze", [w, g.i64(-1)])[0]])[0]
    return g.node("ReduceSum", [y, g.i64(2)], name=q + "/ReduceSum", keepdims=0)[0]


def _swiglu(g: Graph, hh: str, axis: int, cfg, io: str) -> str:
    """gpt-oss's clamped SwiGLU on gate/up rows interleaved along `axis` (gate = even, up = odd)."""
    big, lim = np.iinfo(np.int64).max, cfg.swiglu_limit
    gate = g.node("Slice", [hh, g.i64(0), g.i64(big), g.i64(axis), g.i64(2)])[0]
    up = g.node("Slice", [hh, g.i64(1), g.i64(big), g.i64(axis), g.i64(2)])[0]
    gate = g.node("Clip", [gate, "", g.scalar(lim, io)])[0]
    up = g.node("Clip", [up, g.scalar(-lim, io), g.scalar(lim, io)])[0]
    sig = g.node("Sigmoid", [g.node("Mul", [gate, g.scalar(cfg.swiglu_alpha, io)])[0]])[0]
    return g.node("Mul", [g.node("Mul", [gate, sig])[0], g.node("Add", [up, g.scalar(1.0, io)])[0]])[0]


# Bytes of expert values the MXFP4-in-graph MoE decodes at once (all experts a run routes to, a slice of their rows):
# the transient it adds on the device is about three times this (int32 table indices, decoded values), per layer.
DECODE_BYTES = 128 << 20
FP16_MAX = 65504.0


def _moe_mxfp4_lut(g: Graph, ext: ExternalData, ckpt: Checkpoint, i: int, h: str, router: str, io: str) -> str:
    """MoE from standard ONNX ops on the checkpoint's MXFP4 bytes (4.25 bits/weight), for providers without a MoE
    kernel (DirectML). Routing picks the top-k experts per token; the run's experts are the union U of those (k
    for one decoded token, at most E for a prompt chunk), gathered once as bytes; each slice of their rows is decoded
    by one Gather on a [256 scales x 256 bytes, 2] table (exactly LUT[code] * 2**(scale-127) in the io dtype) and
    multiplied with every token; a token's output weighs each of the U experts by its routing weight (0 when it did
    not choose it). Work is |U|/k times the sparse MoE's (the same for decode), the decoded transient is bounded by
    DECODE_BYTES whatever the prompt length, and activations grow as [U, 2I, tokens]."""
    cfg = ckpt.config
    E, H, inter, k = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    p, q, code = f"model.layers.{i}.", f"/model/layers.{i}/moe", IO_CODE[io]
    if "mxfp4.table" not in ext.names:
        ext.add("mxfp4.table", code, (256 * 256, 2), _mxfp4_table(io))
    mats = {}
    for which, n, kk in (("gate_up_proj", 2 * inter, H), ("down_proj", H, inter)):
        src, dst = p + f"mlp.experts.{which}", p + f"moe.experts.{which}"
        blocks, scales = ckpt.raw(src + "_blocks"), ckpt.raw(src + "_scales")
        if io == "fp16":
            for e in range(E):
                _check_fp16(blocks[e], scales[e], f"{src}_blocks[{e}]")
        ext.add(dst + ".blocks", UINT8, (E, n, kk // 32, 16), (np.asarray(blocks[e]) for e in range(E)))
        ext.add(dst + ".scales", UINT8, (E, n, kk // 32), (np.asarray(scales[e]) for e in range(E)))
        ext.add(dst + ".bias", code, (E, n), bf16_to_io(ckpt.raw(src + "_bias"), io))
        mats[which] = (dst, n, kk)
    # routing: top-k per token, softmax over the k, the union of chosen experts, each token's weight per union slot
    vals, idx = g.node("TopK", [router, g.i64(k)], n_out=2, name=q + "/TopK", axis=-1, largest=1, sorted=1)
    w = g.node("Reshape", [g.node("Softmax", [vals], name=q + "/Softmax", axis=-1)[0], g.i64(-1, k, 1)])[0]  # [T,k,1]
    idx = g.node("Reshape", [idx, g.i64(-1, k, 1)])[0]  # [T,k,1]
    hit = g.node("Equal", [idx, g.const("/const/i64/experts", np.arange(E, dtype=np.int64))])[0]  # [T,k,E]
    used = g.node("ReduceMax", [g.node("Cast", [hit], to=INT32)[0], g.i64(0, 1)], keepdims=0)[0]  # [E]
    sel = g.node("Reshape", [g.node("NonZero", [used], name=q + "/Union")[0], g.i64(-1)])[0]  # [U] expert ids
    chose = g.node("Cast", [g.node("Equal", [idx, sel])[0]], to=code)[0]  # [T,k,U]
    weight = g.node("ReduceSum", [g.node("Mul", [chose, w])[0], g.i64(1)], keepdims=0)[0]  # [T,U]
    weight = g.node("Unsqueeze", [g.node("Transpose", [weight], perm=[1, 0])[0], g.i64(1)])[0]  # [U,1,T]

    def experts(which: str, x: str) -> str:
        """[U, n, T]: the union's `which` matrices (decoded slice by slice) times x ([K, T] or [U, K, T]), + bias."""
        dst, n, kk = mats[which]
        b = g.node("Gather", [dst + ".blocks", sel], axis=0)[0]  # [U, n, K/32, 16] uint8
        s = g.node("Gather", [dst + ".scales", sel], axis=0)[0]  # [U, n, K/32] uint8
        rows = max(1, DECODE_BYTES // (E * kk * np.dtype(_NP[io]).itemsize))
        parts = []
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            bs = g.node("Slice", [b, g.i64(r0), g.i64(r1), g.i64(1)])[0]
            ss = g.node("Slice", [s, g.i64(r0), g.i64(r1), g.i64(1)])[0]
            row = g.node("Mul", [g.node("Cast", [ss], to=INT32)[0], g.const("/const/i32/256", np.int32(256))])[0]
            at = g.node("Add", [g.node("Cast", [bs], to=INT32)[0], g.node("Unsqueeze", [row, g.i64(-1)])[0]])[0]
            vals_ = g.node("Gather", ["mxfp4.table", at], axis=0, name=f"{q}/{which}/Decode_{r0}")[0]
            wts = g.node("Reshape", [vals_, g.i64(-1, r1 - r0, kk)])[0]  # [U, rows, K]
            parts.append(g.node("MatMul", [wts, x], name=f"{q}/{which}/MatMul_{r0}")[0])
        y = parts[0] if len(parts) == 1 else g.node("Concat", parts, axis=1)[0]
        bias = g.node("Gather", [dst + ".bias", sel], axis=0)[0]  # [U, n]
        return g.node("Add", [y, g.node("Unsqueeze", [bias, g.i64(-1)])[0]])[0]

    xt = g.node("Transpose", [g.node("Reshape", [h, g.i64(-1, H)])[0]], perm=[1, 0])[0]  # [H, T]
    act = _swiglu(g, experts("gate_up_proj", xt), 1, cfg, io)  # [U, I, T]
    y = g.node("Mul", [experts("down_proj", act), weight])[0]  # [U, H, T]
    y = g.node("Transpose", [g.node("ReduceSum", [y, g.i64(0)], keepdims=0)[0]], perm=[1, 0])[0]  # [T, H]
    return g.node("Reshape", [y, g.node("Shape", [h])[0]], name=q + "/Output")[0]


_NP = {"fp32": np.float32, "fp16": np.float16}


def _mxfp4_table(io: str) -> np.ndarray:
    """[256 * 256, 2]: row scale * 256 + byte holds the byte's two values (low nibble first), LUT * 2**(scale-127),
    rounded once to the io dtype (what the dequantized expert matrices would hold)."""
    byte = np.arange(256)
    pair = np.stack([mxfp4.LUT[byte & 15], mxfp4.LUT[byte >> 4]], axis=-1)  # [256, 2]
    with np.errstate(over="ignore", invalid="ignore"):  # scales past the io dtype's range: inf (255, NaN: unused)
        vals = pair[None] * np.ldexp(np.float32(1), np.arange(256) - 127).astype(np.float32)[:, None, None]
        return vals.reshape(-1, 2).astype(_NP[io])


def _check_fp16(blocks: np.ndarray, scales: np.ndarray, where: str) -> None:
    """An fp16 graph holds |value| <= 65504: refuse (one line) an expert whose MXFP4 values overflow it."""
    hot = np.asarray(scales) > 127 + 13  # 6 * 2**13 fits; above, it depends on the block's largest code
    if not hot.any():
        return
    mags = np.abs(mxfp4.decode(np.asarray(blocks)[hot][:, None], np.asarray(scales)[hot][:, None]))
    if not np.isfinite(mags).all() or mags.max() > FP16_MAX:
        raise EdgecError(f"{where}: MXFP4 values up to {float(mags.max()):.3g} overflow float16 (max 65504); "
                         f"convert with --dense fp32")

"""gpt-oss -> onnxruntime-genai model folder (model.onnx + model.edgec.onnx sharing model.onnx.data, genai_config.json,
tokenizer files; the two graphs' interface is declared in `onnx_graph.py`).

Per layer: SimplifiedLayerNorm / SkipSimplifiedLayerNorm, fused qkv MatMul+Add, com.microsoft.GroupQueryAttention
(sinks as `head_sink`, rotary from YaRN cos/sin caches, `local_window_size` on sliding layers), o_proj, router
MatMul+Add, then the MoE in the expert format of the recipe (`onnx_moe.py`: com.microsoft.QMoE, or standard ops where
the provider has no MoE kernel). Dense matrices (attention q/k/v/o) and lm_head: the io dtype, or int8/int4
MatMulNBits blocks of 32; lm_head may take its own format (`--lm-head`; the `--experts int4` recipe is int8 attention +
int4 lm_head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint
from ..errors import require
from ..fsutil import atomic_dir
from ..jsonio import load_json
from ..progress import byte_progress
from ..rope import cos_sin
from ..safetensors_io import bf16_to_f32
from .common import copy_tokenizer_files, write_manifest
from .onnx_graph import (
    ATTENTION_MASK,
    DATA,
    EDGEC,
    EDGEC_GRAPH,
    F32_GRAPH,
    GENAI,
    GENAI_GRAPH,
    GRAPH_FORMAT,
    INPUT_IDS,
    INT32,
    INT64,
    IO_CODE,
    LOGITS,
    LOGITS_FROM,
    PAST,
    POSITION_IDS,
    PRESENT,
    SLIDING_SEQLENS_K,
    SLIDING_TOTAL,
    UINT8,
    ExternalData,
    Graph,
    bf16_to_io,
    keep_scales,
    row_shards,
    to_io,
    widen_f32,
)
from .onnx_moe import moe, moe_kind

ROWS = 8192  # rows per chunk when streaming the embedding / lm_head


def convert(ckpt: Checkpoint, profile: dict[str, Any], out: Path, dense: str, experts: str, force: bool = False,
            progress: bool = True, lm_head: str | None = None) -> dict[str, Any]:
    require("onnx", "onnx")
    cfg = ckpt.config
    ctx = int(profile.get("context_length", cfg.max_position_embeddings))
    meter = SourceMeter(ckpt)
    with atomic_dir(out, force, keep=ckpt.source_files()) as tmp, \
            byte_progress(meter.total, f"onnx {profile['name']}", progress) as adv:
        meter.advance = adv
        # fp16 on a profile with an fp32 variant (onnx-webgpu: adapters without shader-f16): F32_GRAPH beside it
        widen = bool(profile.get("fp32_variant")) and io_dtype(dense) == "fp16"
        file_cap = int(profile.get("max_data_file_bytes", 0))
        ext = ExternalData(tmp / DATA, release=ckpt.release_pages, cap=int(profile.get("max_buffer_bytes", 0)),
                           file_cap=file_cap, widen=widen)
        try:
            g = build(ckpt, ext, dense, experts, ctx, profile, lm_head or dense, meter)
        finally:
            ext.close()
        lossy = lossy_steps(experts, dense, lm_head or dense, g.scale_clipped)
        opset = int(profile.get("opset", 21))
        for name, only in ((GENAI_GRAPH, GENAI), (EDGEC_GRAPH, EDGEC)):
            (tmp / name).write_bytes(g.model(ext, opset, only).SerializeToString())
        variants = {}
        if widen:  # the fp16 graph as written, its dtypes rewritten; no second copy of the weights
            import onnx

            f32, table = widen_f32(onnx.load(str(tmp / EDGEC_GRAPH), load_external_data=False), file_cap)
            (tmp / F32_GRAPH).write_bytes(f32.SerializeToString())
            variants = {"variants": {"fp16": EDGEC_GRAPH, "fp32": F32_GRAPH}, "widened": table}
        genai = genai_config(ckpt, profile, ctx)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")
        tok = copy_tokenizer_files(ckpt, tmp)
        tok = sorted({*tok, *write_chat_template(tmp)})
        recipe = {"dense": dense, "lm_head": lm_head or dense, "experts": experts, "io_dtype": io_dtype(dense),
                  "context_length": ctx, "graph_format": GRAPH_FORMAT,
                  "execution_provider": profile.get("execution_provider"),
                  "ort_device": profile.get("ort_device", "cpu"), "moe": moe_kind(profile, experts),
                  "experts_exact": not any(w.startswith("experts") for w in lossy), "lossy": lossy, **variants}
        if ext.cap:  # the device-buffer cap (profile or --max-buffer), what was written under it, the QMoE groups
            recipe.update(max_buffer_bytes=ext.cap, largest_initializer_bytes=ext.largest,
                          expert_groups=g.expert_groups)
        write_manifest(tmp, ckpt, profile, recipe)
    return {"files": [GENAI_GRAPH, EDGEC_GRAPH, *([F32_GRAPH] if widen else []), *ext.files, "genai_config.json",
                      *tok], "recipe": recipe,
            "lossy": lossy, "output_bytes": sum(p.stat().st_size for p in Path(out).iterdir())}


CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "chat_template.jinja"


def write_chat_template(out: Path) -> list[str]:
    """onnxruntime-genai's examples render prompts with the folder's chat_template.jinja, and its Tokenizer alone with
    tokenizer_config.json's `chat_template`: keep the source's template (else write edgec's Harmony one) and give
    tokenizer_config.json the same text. Returns the files written."""
    jinja, config = out / "chat_template.jinja", out / "tokenizer_config.json"
    if not jinja.is_file():
        jinja.write_text(CHAT_TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    if config.is_file():
        cfg = load_json(config)
        if not cfg.get("chat_template"):
            cfg["chat_template"] = jinja.read_text(encoding="utf-8")
            config.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [jinja.name] + ([config.name] if config.is_file() else [])


class SourceMeter:
    """Conversion progress in source bytes (a true total: what the checkpoint's tensors hold): `done(prefix)`
    advances by every not yet counted tensor whose HF name starts with `prefix`."""

    def __init__(self, ckpt: Checkpoint):
        self.left = {t.name: t.nbytes for t in ckpt.specs()}
        self.total = sum(self.left.values())
        self.advance = lambda n: None

    def done(self, prefix: str = "") -> None:
        names = [n for n in self.left if n.startswith(prefix)]
        self.advance(sum(self.left.pop(n) for n in names))


def lossy_steps(experts: str, dense: str, lm_head: str, scale_clipped: dict[int, int]) -> list[str]:
    """Every step of this conversion that does not keep the checkpoint's values, one line each (convert prints
    them as warnings; edgec.json keeps them in recipe.lossy)."""
    out = []
    if experts == "int4":
        out.append("experts int4: MXFP4 requantized to INT4 blocks of 32 (lossy)")
    if scale_clipped:
        layers = ", ".join(f"{i} ({n} blocks)" for i, n in sorted(scale_clipped.items()))
        out.append(f"experts exact: block scales outside the fp16 range (E8M0 104..143) in layers {layers}: those "
                   "blocks' weights flush to zero or overflow")
    for cls, fmt in (("attention", dense), ("lm_head", lm_head)):
        if fmt in INT_BITS:
            out.append(f"{cls} {fmt}: MatMulNBits blocks of 32 (lossy requantization of the bf16 weights)")
    return out


def build(ckpt: Checkpoint, ext: ExternalData, dense: str, experts: str, ctx: int, profile: dict[str, Any],
          lm_head: str, meter: SourceMeter | None = None) -> Graph:
    """Write every weight through `ext` (in model order) and return the graph that uses them (both variants)."""
    cfg = ckpt.config
    meter = meter or SourceMeter(ckpt)
    io = io_dtype(dense)
    # MatMulNBits accuracy_level for int8/int4 dense: 4 = int8 activations (fast int8 dot kernels, lossy), 0 = fp32
    acc = int(profile.get("dense_accuracy_level", 0))
    H, V, nkv, hd = cfg.hidden_size, cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim
    code = IO_CODE[io]
    g = Graph()
    g.input(INPUT_IDS, INT64, ["batch_size", "sequence_length"])
    g.input(ATTENTION_MASK, INT64, ["batch_size", "total_sequence_length"])
    for kind in ("key", "value"):
        for i in range(cfg.num_hidden_layers):
            past = "past_sliding_length" if cfg.is_sliding(i) else "past_sequence_length"
            g.input(PAST % (i, kind), code, ["batch_size", nkv, past, hd])
    # edgec's loop: sliding layers' own bookkeeping (see onnx_graph.py) and the first position given logits
    g.input(SLIDING_SEQLENS_K, INT32, [1], only=EDGEC)
    g.input(SLIDING_TOTAL, INT32, [], only=EDGEC)
    g.input(POSITION_IDS, INT64, [1, "sequence_length"], only=EDGEC)
    g.input(LOGITS_FROM, INT64, [1], only=EDGEC)
    g.output(LOGITS, code, ["batch_size", "sequence_length", V], only=GENAI)
    g.output(LOGITS, code, ["batch_size", "logits_length", V], only=EDGEC)
    for kind in ("key", "value"):
        for i in range(cfg.num_hidden_layers):
            total = "total_sliding_length" if cfg.is_sliding(i) else "total_sequence_length"
            g.output(PRESENT % (i, kind), code, ["batch_size", nkv, total, hd])

    # GQA bookkeeping: seqlens_k = tokens seen - 1, total_sequence_length = mask width (both int32)
    s = g.node("ReduceSum", [ATTENTION_MASK, g.i64(1)], keepdims=0)[0]
    seqlens = g.node("Cast", [g.node("Sub", [s, g.i64(1)])[0]], to=INT32)[0]
    width = g.node("Gather", [g.node("Shape", [ATTENTION_MASK])[0], g.const("/const/i64/1s", np.array(1))],
                   axis=0)[0]
    total = g.node("Cast", [width], to=INT32)[0]

    x = _embedding(g, ext, ckpt.raw("model.embed_tokens.weight"), io)
    meter.done("model.embed_tokens.")
    cos, sin = cos_sin(cfg, ctx)
    ext.add("cos_cache", code, cos.shape, to_io(cos, io))
    ext.add("sin_cache", code, sin.shape, to_io(sin, io))

    residual, pending = x, None
    g.scale_clipped = {}  # layer -> expert blocks whose scale the io dtype cannot hold (exact INT8 in fp16)
    g.expert_groups = 1  # QMoE nodes per layer (onnx_moe.expert_groups: more where an expert tensor is over ext.cap)
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"/model/layers.{i}"
        ext.add(p + "input_layernorm.weight", code, (H,), bf16_to_io(ckpt.raw(p + "input_layernorm.weight"), io))
        if pending is None:
            h = _rms_norm(g, x, p + "input_layernorm.weight", q + "/input_layernorm", cfg.rms_norm_eps, io)
        else:
            h, residual = _skip_norm(g, residual, pending, p + "input_layernorm.weight", q + "/input_layernorm", cfg)
        # attention: fused qkv
        a = p + "self_attn."
        w = np.concatenate([ckpt.f32(a + f"{n}_proj.weight") for n in "qkv"], axis=0)
        b = np.concatenate([ckpt.f32(a + f"{n}_proj.bias") for n in "qkv"])
        qkv = _linear(g, ext, h, p + "attn.qkv", q + "/attn/qkv", w, b, io, dense, acc)
        ext.add(p + "attn.sinks", code, (cfg.num_attention_heads,), bf16_to_io(ckpt.raw(a + "sinks"), io))
        attrs = dict(num_heads=cfg.num_attention_heads, kv_num_heads=nkv, scale=float(hd ** -0.5),
                     local_window_size=cfg.sliding_window if cfg.is_sliding(i) else -1, softcap=0.0, do_rotary=1,
                     rotary_interleaved=0)
        # sliding layers, onnxruntime-genai: a window-sized cache the op evicts from itself; edgec: a buffer that keeps
        # history past the window (exact rollback), indexed by the loop's own seqlens and absolute position ids
        past, present = [PAST % (i, k) for k in ("key", "value")], [PRESENT % (i, k) for k in ("key", "value")]
        variants = [(None, past, present, seqlens, total, "", {})]
        if cfg.is_sliding(i) and profile.get("sliding_window_cache", True):
            cap, inner, outer = _window_floor(g, past, present, cfg.sliding_window, q)
            variants = [(GENAI, inner, outer, seqlens, total, "", dict(sliding_window_cache=1))]
        if cfg.is_sliding(i):
            variants.append((EDGEC, past, present, SLIDING_SEQLENS_K, SLIDING_TOTAL, POSITION_IDS, {}))
        for only, kv_in, kv_out, sk, tot, pos, extra in variants:
            att = g.node("GroupQueryAttention", [qkv, "", "", *kv_in, sk, tot, "cos_cache", "sin_cache", pos, "",
                                                 p + "attn.sinks"],
                         name=q + "/attn/GroupQueryAttention", domain="com.microsoft", only=only,
                         outputs=[q + "/attn/GroupQueryAttention/output_0", *kv_out], **attrs, **extra)[0]
            if kv_out != present:  # back to the capacity onnxruntime-genai allocated
                for a_, b_, k in zip(kv_out, present, ("key", "value"), strict=True):
                    g.node("Slice", [a_, g.i64(0), cap, g.i64(2)], name=f"{q}/attn/WindowFloor/Slice_{k}",
                           outputs=[b_], only=GENAI)
        o = _linear(g, ext, att, p + "attn.o_proj", q + "/attn/o_proj", ckpt.f32(a + "o_proj.weight"),
                    ckpt.f32(a + "o_proj.bias"), io, dense, acc)
        ext.add(p + "post_attention_layernorm.weight", code, (H,),
                bf16_to_io(ckpt.raw(p + "post_attention_layernorm.weight"), io))
        h2, residual = _skip_norm(g, residual, o, p + "post_attention_layernorm.weight",
                                  q + "/post_attention_layernorm", cfg)
        # router
        r = _linear(g, ext, h2, p + "moe.router", q + "/moe/router", ckpt.f32(p + "mlp.router.weight"),
                    ckpt.f32(p + "mlp.router.bias"), io, "fp32" if dense in INT_BITS else dense)
        pending = moe(g, ext, ckpt, i, h2, r, io, experts, profile)
        meter.done(p)

    ext.add("model.norm.weight", code, (H,), bf16_to_io(ckpt.raw("model.norm.weight"), io))
    y, _ = _skip_norm(g, residual, pending, "model.norm.weight", "/model/norm", cfg)
    # lm_head's input: every position (onnxruntime-genai), or positions LOGITS_FROM.. (edgec: -1 = the last only)
    y_lm = "/lm_head/input"
    g.node("Identity", [y], name="/lm_head/AllPositions", outputs=[y_lm], only=GENAI)
    g.node("Slice", [y, LOGITS_FROM, g.i64(np.iinfo(np.int64).max), g.i64(1)], name="/lm_head/LogitsFrom",
           outputs=[y_lm], only=EDGEC)
    _lm_head(g, ext, ckpt.raw("lm_head.weight"), y_lm, io, lm_head, acc)
    meter.done()
    return g


INT_BITS = {"int8": 8, "int4": 4}
EMBEDDING = "model.embed_tokens.weight"


def _rows(src: np.ndarray, r0: int, r1: int, io: str):
    """Rows r0..r1 of a BF16 checkpoint matrix in the io dtype, ROWS at a time."""
    return (bf16_to_io(src[r:min(r + ROWS, r1)], io) for r in range(r0, r1, ROWS))


def _embedding(g: Graph, ext: ExternalData, emb: np.ndarray, io: str) -> str:
    """The embedding lookup. A table over `ext.cap` is stored as vocabulary shards `EMBEDDING.<j>`: each shard
    gathers the ids inside its rows (the others read row 0 and are zeroed by a Where), and a Sum of the shards'
    [batch, seq, hidden] outputs gives every id its row exactly (one term non-zero)."""
    V, H = emb.shape
    code = IO_CODE[io]
    shards = row_shards(V, H * ext.width(code), ext.cap)  # sized at float32 when the fp16 graph is also widened
    if len(shards) == 1:
        ext.add(EMBEDDING, code, (V, H), _rows(emb, 0, V, io))
        return g.node("Gather", [EMBEDDING, INPUT_IDS], name="/model/embed_tokens/Gather")[0]
    parts = []
    for j, (r0, r1) in enumerate(shards):
        q, name = f"/model/embed_tokens/shard{j}", f"{EMBEDDING}.{j}"
        ext.add(name, code, (r1 - r0, H), _rows(emb, r0, r1, io))
        local = g.node("Sub", [INPUT_IDS, g.i64(r0)], name=q + "/Sub")[0]
        inside = g.node("And", [g.node("GreaterOrEqual", [local, g.i64(0)], name=q + "/Ge")[0],
                                g.node("Less", [local, g.i64(r1 - r0)], name=q + "/Lt")[0]], name=q + "/And")[0]
        row = g.node("Gather", [name, g.node("Where", [inside, local, g.i64(0)], name=q + "/Index")[0]],
                     name=q + "/Gather")[0]
        keep = g.node("Unsqueeze", [inside, g.i64(-1)], name=q + "/Unsqueeze")[0]
        parts.append(g.node("Where", [keep, row, g.scalar(0.0, io)], name=q + "/Where")[0])
    return g.node("Sum", parts, name="/model/embed_tokens/Sum")[0]


def _lm_head(g: Graph, ext: ExternalData, lm: np.ndarray, y: str, io: str, fmt: str, acc: int) -> None:
    """LOGITS = y lm^T (io dtype Gemm or MatMulNBits blocks, quantized as the rows stream in). A matrix over
    `ext.cap` is stored as vocabulary shards `lm_head.<weight|qweight|scales>.<j>`, one product per shard, and the
    shards' logits concatenated along the vocabulary (each row's dot product is the same as unsharded)."""
    V, H = lm.shape
    code = IO_CODE[io]
    bits = INT_BITS.get(fmt)
    row_bytes = H * bits // 8 if bits else H * ext.width(code)
    shards = row_shards(V, row_bytes, ext.cap)
    tag = (lambda j: "") if len(shards) == 1 else (lambda j: f".{j}")
    flat = None if bits else g.node("Reshape", [y, g.i64(-1, H)], name="/lm_head/Reshape_in")[0]
    parts = []
    for j, (r0, r1) in enumerate(shards):
        if bits:  # MatMulNBits on [batch, seq, H] -> [batch, seq, n]
            sc: list[np.ndarray] = []
            chunks = (keep_scales(quantize_rows(bf16_to_f32(lm[r:min(r + ROWS, r1)]), bits), sc)
                      for r in range(r0, r1, ROWS))
            qw, s = f"lm_head.qweight{tag(j)}", f"lm_head.scales{tag(j)}"
            ext.add(qw, UINT8, (r1 - r0, H // 32, 32 * bits // 8), chunks)
            ext.add(s, code, (r1 - r0, H // 32), (to_io(x_, io) for x_ in sc))
            parts.append(g.node("MatMulNBits", [y, qw, s], name=f"/lm_head/MatMulNBits{tag(j)}",
                                domain="com.microsoft", K=H, N=r1 - r0, bits=bits, block_size=32,
                                accuracy_level=acc, outputs=[LOGITS] if len(shards) == 1 else None)[0])
        else:  # Gemm on [tokens, H] -> [tokens, n]
            w = f"lm_head.weight{tag(j)}"
            ext.add(w, code, (r1 - r0, H), _rows(lm, r0, r1, io))
            parts.append(g.node("Gemm", [flat, w], name=f"/lm_head/Gemm{tag(j)}", transB=1)[0])
    if bits and len(parts) > 1:
        g.node("Concat", parts, name="/lm_head/Concat", axis=-1, outputs=[LOGITS])
    if bits:
        return
    lg = parts[0] if len(parts) == 1 else g.node("Concat", parts, name="/lm_head/Concat", axis=-1)[0]
    shape = g.node("Concat", [g.node("Shape", [y], end=1)[0], g.i64(-1, V)], axis=0)[0]  # [batch, -1, V]
    g.node("Reshape", [lg, shape], name="/lm_head/Reshape_out", outputs=[LOGITS])


def io_dtype(dense: str) -> str:
    """Activation dtype of the graph: the dense dtype, or fp32 when dense weights are integer blocks."""
    return "fp32" if dense in INT_BITS else dense


def quantize_rows(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits blocks of 32 along K (zero point 2**(bits-1)): signed scale mapping each block's extreme
    to the most negative level, so it is exact; returns uint8 [N, K/32, 32*bits/8] and float32 scales [N, K/32]."""
    qmin = -(1 << (bits - 1))
    g = w.reshape(w.shape[0], -1, 32)
    ext = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    scale = (ext / qmin).astype(np.float32)
    safe = np.where(scale == 0, 1, scale)
    q = (np.clip(np.rint(g / safe[..., None]), qmin, -qmin - 1) - qmin).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scale


def _window_floor(g: Graph, past: list[str], present: list[str], window: int, q: str) -> tuple[str, list, list]:
    """onnxruntime-genai sizes a sliding layer's cache min(max_length, window + slack), and GroupQueryAttention's
    windowed cache refuses a capacity below the window: pad the past K/V up to the window (a no-op at the usual
    capacities) and slice the present back. Returns (capacity [1], padded past names, unpadded present names)."""
    w = q + "/attn/WindowFloor"
    cap = g.node("Slice", [g.node("Shape", [past[0]], name=w + "/Shape", only=GENAI)[0], g.i64(2), g.i64(3)],
                 name=w + "/Capacity", only=GENAI)[0]
    short = g.node("Max", [g.node("Sub", [g.i64(window), cap], name=w + "/Sub", only=GENAI)[0], g.i64(0)],
                   name=w + "/Max", only=GENAI)[0]
    pads = g.node("Concat", [g.i64(0, 0, 0, 0, 0, 0), short, g.i64(0)], name=w + "/Pads", axis=0, only=GENAI)[0]
    inner = [g.node("Pad", [name, pads], name=f"{w}/Pad_{k}", only=GENAI)[0]
             for name, k in zip(past, ("key", "value"), strict=True)]
    return cap, inner, [f"{q}/attn/present_{k}" for k in ("key", "value")]


def _linear(g: Graph, ext: ExternalData, x: str, wname: str, name: str, w: np.ndarray, b: np.ndarray, io: str,
            dense: str, acc: int = 0) -> str:
    """y = x W^T + b for a checkpoint weight W [N, K]: MatMul with W^T in the io dtype, or MatMulNBits."""
    n, k = w.shape
    code = IO_CODE[io]
    if dense in INT_BITS:
        q, s = quantize_rows(w, INT_BITS[dense])
        ext.add(wname + ".qweight", UINT8, q.shape, q)
        ext.add(wname + ".scales", code, s.shape, to_io(s, io))
        y = g.node("MatMulNBits", [x, wname + ".qweight", wname + ".scales"], name=name + "/MatMulNBits",
                   domain="com.microsoft", K=k, N=n, bits=INT_BITS[dense], block_size=32,
                   accuracy_level=acc)[0]
    else:
        ext.add(wname + ".weight", code, (k, n), to_io(np.ascontiguousarray(w.T), io))
        y = g.node("MatMul", [x, wname + ".weight"], name=name + "/MatMul")[0]
    ext.add(wname + ".bias", code, (n,), to_io(b, io))
    return g.node("Add", [y, wname + ".bias"], name=name + "/Add")[0]


def _rms_norm(g: Graph, x: str, weight: str, name: str, eps: float, io: str) -> str:
    """The first RMSNorm from standard ops, x / sqrt(mean(x^2) + eps) * w (onnx.checker rejects
    SimplifiedLayerNormalization, an onnxruntime op registered in the standard domain)."""
    ms = g.node("ReduceMean", [g.node("Mul", [x, x], name=name + "/Sq")[0], g.i64(-1)], name=name + "/Mean",
                keepdims=1)[0]
    rms = g.node("Sqrt", [g.node("Add", [ms, g.scalar(eps, io)], name=name + "/Eps")[0]], name=name + "/Sqrt")[0]
    return g.node("Mul", [g.node("Div", [x, rms], name=name + "/Div")[0], weight], name=name + "/Scale")[0]


def _skip_norm(g: Graph, residual: str, new: str, weight: str, name: str, cfg) -> tuple[str, str]:
    out = g.node("SkipSimplifiedLayerNormalization", [residual, new, weight], name=name, epsilon=cfg.rms_norm_eps,
                 domain="com.microsoft",
                 outputs=[name + "/output_0", "", "", name + "/output_3"])
    return out[0], out[3]


def genai_config(ckpt: Checkpoint, profile: dict[str, Any], ctx: int) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph (type gptoss, sliding-window cache section)."""
    cfg = ckpt.config
    gen_path = next((p for p in ckpt.tokenizer_files() if p.name == "generation_config.json"), None)
    gen = load_json(gen_path) if gen_path else {}
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    eos = eos if isinstance(eos, list) else [eos]
    ep = profile.get("genai_provider")
    session = {"log_id": "onnxruntime-genai", "provider_options": [{ep: {}}] if ep else [],
               **profile.get("genai_session_options", {})}
    decoder: dict[str, Any] = {
        "session_options": session,
        "filename": GENAI_GRAPH, "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                   "past_key_names": PAST.replace("%s", "key"),
                   "past_value_names": PAST.replace("%s", "value")},
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT.replace("%s", "key"),
                    "present_value_names": PRESENT.replace("%s", "value")},
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    if profile.get("sliding_window_cache", True):
        decoder["sliding_window"] = {"window_size": cfg.sliding_window, "slide_key_value_cache": False,
                                     "slide_inputs": False, "layers": cfg.sliding_layers, "cache_slack": 0}
    search = {"diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", True)), "early_stopping": True,
              "length_penalty": 1.0, "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
              "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
              "top_p": float(gen.get("top_p", 1.0))}
    return {"model": {"bos_token_id": int(gen.get("bos_token_id", cfg.bos_token_id)), "context_length": ctx,
                      "decoder": decoder, "eos_token_id": [int(e) for e in eos],
                      "pad_token_id": int(gen.get("pad_token_id", cfg.pad_token_id)), "type": "gptoss",
                      "vocab_size": cfg.vocab_size},
            "search": search}


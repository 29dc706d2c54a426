// The ONE in-browser model runner (browser parity and the chat page): onnxruntime-web over an onnx-webgpu output's
// model.edgec.onnx (interface: edgec/convert/onnx_graph.py), KV cache held here, as edgec/runtime/onnx_backend.py.
// First cut: every layer (sliding ones too) keeps a buffer of `maxContext` positions, fed back as past each run
// (GQA's local_window_size limits what sliding layers attend to); sw_start stays 0.
// Variant = the output's io dtype (edgec.json recipe.io_dtype): `edgec convert SRC --target onnx-webgpu` gives fp16,
// `--dense fp32` float32 activations with the same int4 experts, for adapters without shader-f16 (SwiftShader).
// An fp16 output also holds model.f32.edgec.onnx (recipe.variants.fp32): on an adapter without shader-f16 it runs
// that graph, its fp16 initializers widened here to float32 (`widen`, the table in recipe.widened): variant fp32.

const PIECE = 16;

// model.onnx.data, model.onnx.data.1, ...: the external-data files edgec.json lists, in write order
export const dataFiles = (manifest) => Object.keys(manifest.files).filter((f) => /^model\.onnx\.data(\.\d+)?$/.test(f))
  .sort((a, b) => (Number(a.split('.')[3]) || 0) - (Number(b.split('.')[3]) || 0));

export async function loadModel(baseUrl, {ort, variant, maxContext = 1024} = {}) {
  const base = baseUrl.endsWith('/') ? baseUrl : baseUrl + '/';
  const gpuAdapter = await navigator.gpu.requestAdapter();
  const info = gpuAdapter.info || {};
  const features = [...gpuAdapter.features];
  const manifest = await (await fetch(base + 'edgec.json')).json(), cfg = manifest.config;
  // onnxruntime-web binds every initializer whole and asks the device for the adapter's own maxStorageBufferBindingSize
  // and maxBufferSize (WebGPU guarantees 128 MiB / 256 MiB): refuse an output whose largest initializer (edgec.json
  // recipe, under convert's --max-buffer) is over either, before any weights are fetched
  const lim = gpuAdapter.limits, limit = Math.min(lim.maxStorageBufferBindingSize, lim.maxBufferSize);
  const largest = manifest.recipe.largest_initializer_bytes ?? manifest.recipe.max_buffer_bytes ?? 0;
  if (largest > limit) throw new Error(`this output's largest initializer is ${largest} bytes, over this adapter's ` +
    `buffer limit of ${limit} bytes (maxStorageBufferBindingSize ${lim.maxStorageBufferBindingSize}, maxBufferSize ` +
    `${lim.maxBufferSize}): convert with \`edgec convert SRC --target onnx-webgpu --dense fp32 --max-buffer 128MiB\``);
  const has = manifest.recipe.io_dtype === 'fp32' ? 'fp32' : 'fp16';
  variant = variant || (gpuAdapter.features.has('shader-f16') ? 'fp16' : 'fp32');
  const widened = variant === 'fp32' && has === 'fp16' && !!(manifest.recipe.variants || {}).fp32;
  if (variant !== has && !widened) throw new Error(`this output is ${has}; the ${variant} variant needs ` +
    (variant === 'fp32' ? 'model.f32.edgec.onnx (convert again with this edgec) or `edgec convert SRC --target ' +
     'onnx-webgpu --dense fp32` (the adapter has no shader-f16)' :
     'an fp16 output (edgec convert SRC --target onnx-webgpu)'));
  // every data file by URL (convert splits them under the profile's max_data_file_bytes): the browser fetches each;
  // widened: the real files the f32 graph still reads (int4 experts) by URL, the widened ones built here
  const externalData = widened ? [...manifest.recipe.widened.data.map((f) => ({path: f, data: base + f})),
    ...await widen(base, manifest.recipe.widened)] : dataFiles(manifest).map((f) => ({path: f, data: base + f}));
  const layers = cfg.num_hidden_layers, heads = cfg.num_key_value_heads, dim = cfg.head_dim;
  // node placement from ORT's own verbose log (session_state.cc VerifyEachNodeIsAssignedToAnEp), read off the console
  const placement = {}, seen = [], hooks = ['log', 'info', 'warn', 'error', 'debug'], saved = {};
  for (const h of hooks) { saved[h] = console[h]; console[h] = (...a) => { seen.push(a.join(' ')); }; }
  let session;
  try {
    const graph = widened ? manifest.recipe.variants.fp32 : 'model.edgec.onnx';
    session = await ort.InferenceSession.create(base + graph, {
      executionProviders: ['webgpu'], logSeverityLevel: 0, logVerbosityLevel: 0, externalData,
    });
  } finally { for (const h of hooks) console[h] = saved[h]; }
  let ep = null;
  for (const line of seen) {
    if (!line.includes('VerifyEachNodeIsAssignedToAnEp')) continue;
    const head = line.match(/placed on \[(\w+)\]/), node = line.match(/\]\s{3}(\S+) \((.*)\)/);
    if (head) { ep = head[1]; placement[ep] = placement[ep] || []; } else if (node && ep) placement[ep].push([node[1], node[2]]);
  }
  const nodesTotal = Object.values(placement).reduce((n, l) => n + l.length, 0);
  const nodesOnWebgpu = (placement.WebGpuExecutionProvider || []).length;
  const [dtype, Arr] = variant === 'fp16' ? ['float16', Uint16Array] : ['float32', Float32Array];
  let kv = null, ids = [];
  const reset = () => {
    kv = {};
    for (let i = 0; i < layers; i++) for (const k of ['key', 'value'])
      kv[`past_key_values.${i}.${k}`] = new ort.Tensor(dtype, new Arr(heads * maxContext * dim), [1, heads, maxContext, dim]);
    ids = [];
  };
  reset();
  const i64 = (a, shape) => new ort.Tensor('int64', BigInt64Array.from(a.map(BigInt)), shape);
  const i32 = (a, shape) => new ort.Tensor('int32', Int32Array.from(a), shape);
  // onnxruntime-web 1.31.1's WebGPU EP (SwiftShader) computes a run of >= 32 new tokens wrong from the 5th on (runs of
  // <= 24 equal onnx-cpu to the last bit: edgec parity --browser, README): prompts go in pieces of PIECE tokens
  async function run(chunk, all) {
    if (chunk.length <= PIECE) return runPiece(chunk, all);
    const parts = [];
    for (let s = 0; s < chunk.length; s += PIECE) parts.push(await runPiece(chunk.slice(s, s + PIECE), all));
    if (!all) return parts[parts.length - 1];
    const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }
  async function runPiece(chunk, all) {
    const start = ids.length, total = start + chunk.length;
    if (total > maxContext) throw new Error(`context ${total} > maxContext ${maxContext}`);
    const feeds = {
      input_ids: i64(chunk, [1, chunk.length]),
      attention_mask: i64(new Array(total).fill(1), [1, total]),
      sliding_seqlens_k: i32([total - 1], [1]),
      sliding_total_sequence_length: i32([total], []),
      position_ids: i64(chunk.map((_, j) => start + j), [1, chunk.length]),
      logits_from: i64([all ? 0 : -1], [1]),
      ...kv,
    };
    for (const n of Object.keys(feeds)) if (!session.inputNames.includes(n)) delete feeds[n];
    const out = await session.run(feeds);
    for (const name of Object.keys(kv)) kv[name] = out[name.replace('past_key_values.', 'present.')];
    ids.push(...chunk);
    const logits = out.logits;
    return logits.type === 'float16' ? Float32Array.from(logits.data, halfToFloat) : logits.data;
  }
  return {
    variant, widened, adapter: {vendor: info.vendor, architecture: info.architecture, description: info.description, features},
    nodesTotal, nodesOnWebgpu, placement,
    async forward(chunk) {
      const data = await run(chunk, false), v = data.length;
      return data.slice(v - cfg.vocab_size);
    },
    async logitsAll(chunk) { return run(chunk, true); },
    truncate(n) { ids = ids.slice(0, n); },  // full buffers: positions >= n are overwritten by the next run
    get length() { return ids.length; },
    reset,
    release() { session.release(); },
  };
}

// The widened files of an fp16 output's f32 graph (edgec/convert/onnx_graph.py widen_f32): each real data file
// fetched once, each of its fp16 tensors written as float32 into a preallocated buffer at its recorded offset
// (fp16 -> fp32 is exact: a 65536-entry table). Returns onnxruntime-web externalData entries.
async function widen(base, table) {
  const f32 = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) f32[h] = halfToFloat(h);
  const out = Object.fromEntries(table.files.map((f) => [f.name, new ArrayBuffer(f.bytes)]));
  for (const file of [...new Set(table.tensors.map((t) => t.file))]) {
    const src = await (await fetch(base + file)).arrayBuffer();
    for (const t of table.tensors) {
      if (t.file !== file) continue;
      const from = new Uint16Array(src, t.offset, t.count);
      const to = new Float32Array(out[t.wide_file], t.wide_offset, t.count);
      for (let i = 0; i < t.count; i++) to[i] = f32[from[i]];
    }
  }
  return table.files.map((f) => ({path: f.name, data: new Uint8Array(out[f.name])}));
}

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

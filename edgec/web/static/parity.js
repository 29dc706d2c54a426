// `edgec parity OUT --browser`'s page side (edgec/web/runner.py drives it): model.js over OUT, logits handed back
// to Python in base64 row chunks (a 201k-vocabulary row is 800 KB of float32; JSON numbers would be ~3x that).
import * as ort from '/ort/ort.webgpu.min.mjs';
import {loadModel} from '/static/model.js';

let model = null, last = null, vocab = 0;

export async function load(maxContext) {
  model = await loadModel('/model/', {ort, maxContext});
  vocab = (await (await fetch('/model/edgec.json')).json()).config.vocab_size;
  return {variant: model.variant, adapter: model.adapter, nodesTotal: model.nodesTotal,
          nodesOnWebgpu: model.nodesOnWebgpu, placement: model.placement};
}

export async function forward(ids, all) {  // -> rows held for rows(); the count
  last = all ? await model.logitsAll(ids) : await model.forward(ids);
  return last.length / vocab;
}

export function rows(start, end) {  // rows [start, end) of the last forward, float32 little-endian, base64
  const bytes = new Uint8Array(last.buffer, last.byteOffset + start * vocab * 4, (end - start) * vocab * 4);
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function reset() { model.reset(); }

export async function bench(ids, tokens) {  // bench/bench_webgpu.py: prefill of ids, then tokens - 1 greedy steps
  model.reset();
  const argmax = l => l.reduce((best, v, i) => (v > l[best] ? i : best), 0);
  const t0 = performance.now();
  let next = argmax(await model.forward(ids));
  const t1 = performance.now();
  for (let i = 1; i < tokens; i++) next = argmax(await model.forward([next]));
  const t2 = performance.now();
  return {prefill_s: (t1 - t0) / 1000, decode_s: (t2 - t1) / 1000};
}

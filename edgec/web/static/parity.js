// `edgec parity OUT --browser`'s page side (edgec/web/runner.py drives it): model.js over OUT, logits handed back
// to Python in base64 row chunks (a 201k-vocabulary row is 800 KB of float32; JSON numbers would be ~3x that).
import * as ort from '/ort/ort.webgpu.min.mjs';
import {loadModel} from '/static/model.js';

let model = null, last = null, vocab = 0;

export async function load(maxContext) {
  model = await loadModel('/model/', {ort, maxContext});
  vocab = (await (await fetch('/model/edgec.json')).json()).config.vocab_size;
  return {variant: model.variant, widened: model.widened, adapter: model.adapter, nodesTotal: model.nodesTotal,
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

export async function bench(ids, n) {  // bench/bench_webgpu.py: prefill `ids`, then n greedy steps, timed in the page
  model.reset();
  let t0 = performance.now(), logits = await model.forward(ids);
  const prefill = (performance.now() - t0) / 1000, out = [];
  t0 = performance.now();
  for (let i = 0; i < n; i++) {
    let best = 0;
    for (let j = 1; j < logits.length; j++) if (logits[j] > logits[best]) best = j;
    out.push(best);
    logits = await model.forward([best]);
  }
  return {prefill_s: prefill, decode_s: (performance.now() - t0) / 1000, tokens: out};
}

// The chat page of `edgec web OUT`: everything runs here, in the browser. Tokenizer (tokenizer.js, from the
// output's tokenizer.json), Harmony render and streaming parse (harmony.js), KV cache and the graph
// (/static/model.js over onnxruntime-web's WebGPU EP), sampling (below). The server only hands out files.
// window.edgec exposes the state to tests (tests/test_web_page.py).
import {loadModel} from '/static/model.js';
import {Tokenizer} from './tokenizer.js';
import {renderPrompt, StreamParser, STOP_TOKENS, today} from './harmony.js';

const $ = id => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = {history: [], fed: [], running: false, stop: false, last: null, ready: false, error: null,
               date: params.get('date') || today(), maxContext: Number(params.get('context') || 1024)};
window.edgec = state;
// The prompt is prefilled in runs of at most this many tokens. Measured on onnxruntime-web 1.31.1 (WebGPU EP,
// SwiftShader, tiny fixture): one run of <= 24 new tokens gives onnx-cpu's logits (to 1e-6), one of >= 32 differs
// by up to ~1 (GroupQueryAttention's prefill path, not root-caused); runs of 16 match to 1e-6 at 69 tokens.
const PREFILL_CHUNK = Number(params.get('chunk') || 16);

// seeded draws where ?seed= is given (mulberry32), else Math.random
function rng(seed) {
  if (seed === null) return Math.random;
  let a = Number(seed) >>> 0;
  return () => { a = (a + 0x6d2b79f5) >>> 0; let t = a; t = Math.imul(t ^ (t >>> 15), t | 1);
                 t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
}

// temperature 0: argmax (the first of equal maxima, as numpy); else softmax(logits / T), cut to the smallest set
// whose probability reaches top_p, and drawn from
export function sample(logits, temperature, topP, rand) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (temperature === 0) return best;
  const probs = new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += (probs[i] = Math.exp((logits[i] - logits[best]) / temperature));
  let order = null, n = logits.length;
  if (topP < 1) {
    order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]);
    let cum = 0;
    for (n = 0; n < order.length && cum < topP * sum; n++) cum += probs[order[n]];
    sum = cum;
  }
  let r = rand() * sum;
  for (let k = 0; k < n; k++) {
    const i = order ? order[k] : k;
    if ((r -= probs[i]) <= 0) return i;
  }
  return order ? order[n - 1] : best;
}

function top(logits, k = 5) {  // the k largest logits as [id, value], for tests and the raw view
  const out = [];
  for (let i = 0; i < logits.length; i++) {
    if (out.length < k || logits[i] > out[out.length - 1][1]) {
      out.push([i, logits[i]]);
      out.sort((a, b) => b[1] - a[1]);
      if (out.length > k) out.pop();
    }
  }
  return out;
}

function turnView(text) {
  const div = document.createElement('div');
  div.className = 'turn';
  div.innerHTML = '<div class="user"></div><div class="reasoning"></div><div class="final"></div><div class="raw"></div>';
  div.querySelector('.user').textContent = text;
  div.querySelector('.raw').hidden = !$('show_raw').checked;
  $('log').appendChild(div);
  return div;
}

async function reply(tok, model, text) {
  const temperature = Number($('temperature').value), topP = Number($('top_p').value);
  const maxTokens = Number($('max_tokens').value), rand = rng(params.get('seed'));
  state.history.push({role: 'user', text});
  const prompt = renderPrompt(tok, {system: {date: state.date, reasoning: $('reasoning').value}, messages: state.history});
  // the KV cache keeps the longest prefix the new prompt shares with what was fed (at least one token is fed)
  let keep = 0;
  while (keep < state.fed.length && keep < prompt.length - 1 && state.fed[keep] === prompt[keep]) keep++;
  model.truncate(keep);
  state.fed = prompt.slice(0, keep);
  const view = turnView(text), parser = new StreamParser(tok), raw = tok.decoder();
  const last = state.last = {prompt, reused: keep, tokens: [], top: [], stop: null, prefill_s: null, decode_s: null};
  let chunk = prompt.slice(keep), t0 = performance.now(), t1 = null;
  const show = ev => {
    if (ev.kind !== 'text') return;
    view.querySelector(ev.channel === 'analysis' ? '.reasoning' : '.final').textContent += ev.text;
  };
  for (;;) {
    if (state.stop) { last.stop = 'stopped'; break; }
    if (last.tokens.length >= maxTokens) { last.stop = 'max_tokens'; break; }
    if (model.length + chunk.length > state.maxContext) { last.stop = 'context'; break; }
    let logits;
    for (let i = 0; i < chunk.length; i += PREFILL_CHUNK) {
      const piece = chunk.slice(i, i + PREFILL_CHUNK);
      logits = await model.forward(piece);
      state.fed.push(...piece);
    }
    if (t1 === null) { t1 = performance.now(); last.prefill_s = (t1 - t0) / 1000; }
    const id = sample(logits, temperature, topP, rand);
    last.top.push(top(logits));
    if (STOP_TOKENS.includes(id)) { last.stop = 'return'; break; }
    last.tokens.push(id);
    parser.feed(id).forEach(show);
    view.querySelector('.raw').textContent += raw.push(id);
    last.decode_s = (performance.now() - t1) / 1000;
    $('stats').textContent = stats(last);
    chunk = [id];
  }
  parser.finish().forEach(show);
  const final = parser.messages.filter(m => m.channel !== 'analysis').map(m => m.text).join('');
  state.history.push({role: 'assistant', channel: 'final', text: final});
  $('stats').textContent = stats(last);
}

function stats(l) {
  const n = l.tokens.length, pre = l.prompt.length - l.reused;
  const dec = n > 1 && l.decode_s ? ` · decode ${((n - 1) / l.decode_s).toFixed(1)} tok/s` : '';
  return `${n} tokens · prefill ${pre} in ${(l.prefill_s || 0).toFixed(2)} s${dec}` + (l.stop ? ` · stop=${l.stop}` : '');
}

async function main() {
  const ort = await import('/ort/ort.webgpu.min.mjs');
  ort.env.wasm.wasmPaths = '/ort/';
  $('status').textContent = 'loading the tokenizer…';
  const tok = state.tokenizer = new Tokenizer(await (await fetch('/model/tokenizer.json')).json());
  $('status').textContent = 'loading the model…';
  // an fp32 output runs on every adapter; an fp16 one needs shader-f16, or runs its widened fp32 graph (model.js)
  const manifest = await (await fetch('/model/edgec.json')).json();
  const variant = manifest.recipe.io_dtype === 'fp32' ? 'fp32' : undefined;
  const model = state.model = await loadModel('/model/', {ort, variant, maxContext: state.maxContext});
  const a = model.adapter;
  state.adapter = a;
  $('device').textContent = a.description || [a.vendor, a.architecture].filter(Boolean).join(' ') || 'unknown adapter';
  $('variant').textContent = `${model.variant}${model.widened ? ' widened from fp16' : ''} (adapter ${a.features.includes('shader-f16') ? 'has' : 'has no'} shader-f16)`;
  const send = async () => {
    const text = $('prompt').value;
    if (state.running || !text.trim()) return;
    $('prompt').value = '';
    state.running = true; state.stop = false;
    $('send').disabled = true; $('stop').disabled = false;
    try { await reply(tok, model, text); } catch (e) { state.error = String(e); $('status').textContent = `error: ${e}`; }
    state.running = false;
    $('send').disabled = false; $('stop').disabled = true;
  };
  $('send').onclick = send;
  $('stop').onclick = () => { state.stop = true; };
  $('reset').onclick = () => { if (!state.running) { state.history = []; $('log').textContent = ''; } };
  $('prompt').onkeydown = e => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); } };
  $('show_raw').onchange = () => document.querySelectorAll('.raw').forEach(r => { r.hidden = !$('show_raw').checked; });
  $('prompt').disabled = $('send').disabled = false;
  $('status').textContent = `ready: ${model.nodesOnWebgpu} of ${model.nodesTotal} nodes on WebGPU, context ${state.maxContext}`;
  state.ready = true;
}

main().catch(e => { state.error = String(e); $('status').textContent = `error: ${e}`; });

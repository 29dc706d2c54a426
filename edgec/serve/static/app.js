// edgec chat page: streams /v1/chat/completions (SSE), reasoning collapsed apart from the answer, stats per reply.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), effort = $("effort"), keyBox = $("api-key");
let model = null, history = [], controller = null;

keyBox.value = localStorage.getItem("edgec-api-key") || "";
keyBox.addEventListener("change", () => { localStorage.setItem("edgec-api-key", keyBox.value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    model = j.data[0].id;
    $("model").textContent = `${model} · ${j.data[0].backend} · context ${j.data[0].context_length}`;
  } catch (e) {
    $("model").textContent = "model unavailable: " + e.message;
  }
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addMessage(role) {
  const m = el("div", "msg " + role);
  m.append(el("div", "role", role));
  log.append(m);
  return m;
}

function stats(usage, t, finish) {
  const parts = [];
  if (usage) {
    const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    parts.push(`prompt ${usage.prompt_tokens} tok (cached ${cached})`, `completion ${usage.completion_tokens} tok`);
    const r = usage.completion_tokens_details ? usage.completion_tokens_details.reasoning_tokens : 0;
    if (r) parts.push(`reasoning ${r} tok`);
  }
  if (t) parts.push(`TTFT ${(t.ttft_s * 1000).toFixed(0)} ms`, `${t.tok_s.toFixed(1)} tok/s`);
  if (finish) parts.push(`finish ${finish}`);
  return parts.join(" · ");
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user").append(el("div", "content", text));
  const m = addMessage("assistant");
  const details = el("details", "reasoning"); details.hidden = true;
  details.append(el("summary", null, "Reasoning"));
  const thinking = el("pre"); details.append(thinking);
  const content = el("div", "content"), calls = el("div", "tool-call"), foot = el("div", "stats", "…");
  m.append(details, content, calls, foot);
  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  let usage = null, timings = null, finish = null, answer = "";
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model, messages: history, stream: true, stream_options: { include_usage: true },
                             reasoning_effort: effort.value, max_tokens: Number($("max-tokens").value) || 512 }),
    });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      throw new Error(j.error ? j.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const c = JSON.parse(data);
          if (c.error) throw new Error(c.error.message);
          if (c.usage) usage = c.usage;
          if (c.timings) timings = c.timings;
          for (const ch of c.choices || []) {
            const d = ch.delta || {};
            if (d.reasoning_content) { details.hidden = false; thinking.textContent += d.reasoning_content; }
            if (d.content) { answer += d.content; content.textContent = answer; }
            for (const tc of d.tool_calls || []) {
              if (tc.function && tc.function.name) calls.textContent += `→ ${tc.function.name}(`;
              if (tc.function && tc.function.arguments) calls.textContent += tc.function.arguments;
            }
            if (ch.finish_reason) finish = ch.finish_reason;
          }
          foot.textContent = stats(usage, timings, finish);
          log.scrollTop = log.scrollHeight;
        }
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped by you";
    else m.append(el("div", "error", e.message));
    history.push({ role: "assistant", content: answer });
  } finally {
    foot.textContent = stats(usage, timings, finish);
    m.dataset.done = "1";
    controller = null;
    $("send").hidden = false; $("stop").hidden = true;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => { if (!controller) { history = []; log.textContent = ""; } });
loadModel();

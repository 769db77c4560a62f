// The kvflow web page: a chat that streams from /v1/chat/completions, and a panel drawn from the
// server's own Prometheus /metrics. Plain browser JavaScript: no build step, nothing fetched from
// elsewhere. Model text is only ever inserted as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];           // the conversation sent with each request
let controller = null;        // aborts the streaming request (Stop)
let modelName = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) { $("error").textContent = text || ""; }

// ---------------- chat ----------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    messages: messages.concat(history), stream: true, stream_options: { include_usage: true },
    temperature: numberField("temperature"), top_p: numberField("top_p"), top_k: numberField("top_k"),
    max_tokens: numberField("max_tokens"), seed: numberField("seed"),
  };
  if (modelName) body.model = modelName;
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (e) { throw new Error("JSON schema: " + e.message); }
    body.response_format = { type: "json_schema", json_schema: { name: "output", schema: parsed } };
  }
  return body;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  showError("");
  let body;
  history.push({ role: "user", content: text });
  try { body = requestBody(); } catch (e) { history.pop(); showError(e.message); return; }
  addMessage("user", text);
  $("prompt").value = "";
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  let reply = "", usage = null, finish = null;
  const started = performance.now();
  let firstToken = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + resp.status));
    }
    for await (const chunk of sseEvents(resp)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          if (firstToken === null) firstToken = performance.now();
          reply += delta.content;
          bubble.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
    finish = finish || (e.name === "AbortError" ? "stopped" : "error");
  } finally {
    bubble.classList.remove("streaming");
    const meta = document.createElement("span");
    meta.className = "meta";
    const secs = ((performance.now() - started) / 1000).toFixed(2);
    const ttft = firstToken === null ? "–" : ((firstToken - started) / 1000).toFixed(2) + " s";
    meta.textContent = `${usage ? usage.completion_tokens + " tokens, " : ""}${secs} s, first token ${ttft}` +
                       (finish ? `, ${finish}` : "");
    bubble.appendChild(meta);
    if (reply) history.push({ role: "assistant", content: reply }); else history.pop();
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

// Server-sent events from a fetch response: yields each `data:` JSON object until [DONE].
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---------------- metrics ----------------
// Prometheus text format: "name{labels} value" per line; histograms as _sum / _count.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    out[line.slice(0, space)] = Number(line.slice(space + 1));
  }
  return out;
}

let previous = null;
const rates = [];   // tokens/s of the last 60 scrapes

function meanSince(now, prev, name) {
  const sum = now[name + "_sum"], count = now[name + "_count"];
  if (count === undefined) return null;
  if (prev && count > prev[name + "_count"]) return (sum - prev[name + "_sum"]) / (count - prev[name + "_count"]);
  return count > 0 ? sum / count : null;
}

function ms(seconds) { return seconds === null ? "–" : (seconds * 1000).toFixed(seconds < 1 ? 1 : 0) + " ms"; }

async function pollMetrics() {
  try {
    const resp = await fetch("/metrics", { cache: "no-store" });
    const m = parseMetrics(await resp.text());
    const now = performance.now() / 1000;
    $("m-running").textContent = m["kvflow:num_requests_running"];
    $("m-waiting").textContent = m["kvflow:num_requests_waiting"];
    $("m-kv").textContent = (100 * m["kvflow:kv_cache_usage_perc"]).toFixed(1) + " %";
    const tokens = m["kvflow:generation_tokens_total"] ?? m["kvflow:generation_tokens"];
    $("m-tokens").textContent = tokens;
    if (previous) {
      const rate = (tokens - previous.tokens) / (now - previous.time);
      $("m-tps").textContent = rate.toFixed(1);
      rates.push(rate); if (rates.length > 60) rates.shift();
      drawChart();
    }
    // TTFT and TPOT: the mean over the last second if anything finished in it, else since start
    $("m-ttft").textContent = ms(meanSince(m, previous && previous.m, "kvflow:time_to_first_token_seconds"));
    $("m-tpot").textContent = ms(meanSince(m, previous && previous.m, "kvflow:inter_token_latency_seconds"));
    previous = { m, tokens, time: now };
    $("m-status").textContent = "up";
    $("m-scrapes").textContent = Number($("m-scrapes").textContent) + 1;
  } catch (e) {
    $("m-status").textContent = "unreachable";
  }
}

function drawChart() {
  const c = $("m-chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const top = Math.max(1, ...rates);
  g.strokeStyle = "#2f6fdf"; g.lineWidth = 1.5; g.beginPath();
  rates.forEach((r, i) => {
    const x = (i / 59) * (c.width - 2) + 1, y = c.height - 2 - (r / top) * (c.height - 6);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#7a8699"; g.font = "10px sans-serif"; g.fillText(top.toFixed(0) + " tok/s", 4, 11);
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { $("model-name").textContent = resp.status === 401 ? "enter the API key" : "HTTP " + resp.status; return; }
    const data = await resp.json();
    modelName = data.data[0].id;
    $("model-name").textContent = modelName;
  } catch (e) { $("model-name").textContent = "unreachable"; }
}

// ---------------- wiring ----------------
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("messages").textContent = ""; showError(""); });
$("api-key").value = localStorage.getItem("kvflow-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("kvflow-api-key", $("api-key").value); loadModel(); });
loadModel();
pollMetrics();
setInterval(pollMetrics, 1000);

"""The page at `/`: type a prompt, watch tokens stream in coloured by monitor scores, alerts listed.

One self-contained HTML string (inline CSS and JS, no CDN, no external request, not even a favicon), so it
works offline and on a machine that cannot reach the internet. It reads the SSE stream of
POST /v1/generate/stream with fetch() (EventSource cannot POST). Colour: for each token, the highest
monitor score (or the one monitor chosen in "colour by") relative to its threshold, (score - threshold) / max(|threshold|, 1), from green (well below)
through yellow (at the threshold) to red (above); a token on which a monitor fired is outlined.
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>mechscope serve</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem 1.5rem; color: #222; }
 h1 { font-size: 1.3rem; margin: .2rem 0 .6rem; } h2 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
 #model { color: #666; font-size: .9rem; }
 textarea { width: 100%; box-sizing: border-box; font: inherit; min-height: 5rem; padding: .4rem; }
 .row { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: .5rem 0; }
 #monitors label { margin-right: .8rem; white-space: nowrap; }
 button { font: inherit; padding: .35rem 1.1rem; cursor: pointer; }
 #output { border: 1px solid #ccc; border-radius: 4px; padding: .6rem; min-height: 3rem; white-space: pre-wrap;
           font-family: ui-monospace, monospace; font-size: 14px; }
 #output .prompt { color: #777; }
 .tok { border-radius: 3px; padding: 0 1px; }
 .tok.fired { outline: 2px solid #b00020; }
 .tok.blocked { text-decoration: line-through; color: #b00020; }
 #alerts li { color: #b00020; }
 #status { color: #555; font-size: .9rem; min-height: 1.2em; }
 #status.error { color: #b00020; }
 .legend span { display: inline-block; padding: 0 .4rem; border-radius: 3px; margin-right: .3rem; font-size: .8rem; }
</style></head>
<body>
<h1>mechscope serve</h1>
<div id="model">loading…</div>
<h2>Prompt</h2>
<textarea id="prompt" placeholder="Type a prompt">The capital of France is</textarea>
<div class="row">
 <label>max new tokens <input id="max-tokens" type="number" min="1" value="24" style="width:5rem"></label>
 <button id="generate">Generate</button>
 <button id="stop" disabled>Stop</button>
</div>
<div class="row" id="monitors"></div>
<div class="row"><label>colour by <select id="colour-by"><option value="">highest over monitors</option></select></label></div>
<div class="legend"><span style="background:hsl(120,80%,82%)">below threshold</span><span
 style="background:hsl(60,80%,82%)">at threshold</span><span style="background:hsl(0,80%,82%)">above</span>
 <span style="outline:2px solid #b00020">monitor fired</span></div>
<h2>Output</h2>
<div id="output"></div>
<div id="status"></div>
<h2>Alerts</h2>
<ul id="alerts"></ul>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let monitors = {};  // name -> info (threshold, action, kind)
let controller = null;

function status(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }

async function loadInfo() {
  const [health, list] = await Promise.all([fetch("/health").then((r) => r.json()),
                                            fetch("/v1/monitors").then((r) => r.json())]);
  $("model").textContent = `model ${health.model} · ${health.n_layers} layers · d_model ${health.d_model} · ` +
    `max ${health.limits.max_new_tokens} new tokens`;
  const box = $("monitors");
  box.textContent = list.length ? "monitors: " : "no monitors loaded";
  monitors = {};
  for (const m of list) {
    monitors[m.name] = m;
    const label = document.createElement("label");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.checked = true; cb.value = m.name; cb.className = "monitor";
    label.append(cb, ` ${m.name} (${m.kind}, ${m.action}, threshold ${m.threshold})`);
    box.append(label);
    const opt = document.createElement("option");
    opt.value = m.name; opt.textContent = m.name;
    $("colour-by").append(opt);
  }
}

function colour(scores) {
  let best = null;
  const only = $("colour-by").value;
  for (const [name, s] of Object.entries(scores || {})) {
    if (s === null || s === undefined || (only && name !== only)) continue;
    const thr = monitors[name] && monitors[name].threshold !== null ? monitors[name].threshold : 0;
    const v = (s - thr) / Math.max(Math.abs(thr), 1);
    if (best === null || v > best) best = v;
  }
  if (best === null) return null;
  const t = Math.min(1, Math.max(0, (best + 1) / 2));   // -1 -> green, 0 -> yellow, >= 1 -> red
  return `hsl(${Math.round(120 * (1 - t))}, 80%, 82%)`;
}

function addToken(ev) {
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.index = ev.index;
  const fired = Object.entries(ev.fired || {}).filter(([, f]) => f).map(([n]) => n);
  if (ev.token === null) { span.classList.add("blocked"); span.textContent = "⛔"; }
  else span.textContent = ev.token;
  span.dataset.scores = JSON.stringify(ev.scores || {});
  const bg = colour(ev.scores);
  if (bg) span.style.backgroundColor = bg;
  if (fired.length) span.classList.add("fired");
  span.title = Object.entries(ev.scores || {}).map(([n, s]) => `${n}: ${s === null ? "n/a" : s.toFixed(3)}`)
    .join("\n") + (fired.length ? `\nfired: ${fired.join(", ")}` : "") + (ev.actions.length ? `\nactions: ${ev.actions.join(", ")}` : "");
  $("output").append(span);
}

function showAlerts(alerts) {
  const ul = $("alerts");
  ul.textContent = "";
  for (const a of alerts) {
    const li = document.createElement("li");
    li.className = "alert";
    li.textContent = `${a.monitor} fired at token ${a.index} (score ${a.score === null ? "n/a" : a.score.toFixed(3)}` +
      `, action ${a.action})`;
    ul.append(li);
  }
  if (!alerts.length) { const li = document.createElement("li"); li.className = "none"; li.textContent = "none"; ul.append(li); }
}

function handle(event, data) {
  if (event === "start") status(`generating with ${data.monitors.length} monitor(s)…`);
  else if (event === "token") addToken(data);
  else if (event === "done") {
    showAlerts(data.alerts);
    status(`${data.n_tokens} tokens in ${data.latency_s.toFixed(2)} s` +
           (data.stopped_by ? ` · stopped by ${data.stopped_by}` : "") + ` · ${data.alerts.length} alert(s)`);
    $("output").dataset.done = "1";
  } else if (event === "error") status(`error ${data.status}: ${data.detail}`, true);
}

async function generate() {
  const chosen = Array.from(document.querySelectorAll("input.monitor:checked")).map((c) => c.value);
  const body = { prompt: $("prompt").value, max_new_tokens: parseInt($("max-tokens").value, 10) || 1,
                 monitors: chosen };
  const out = $("output");
  out.textContent = ""; delete out.dataset.done; showAlerts([]);
  const p = document.createElement("span"); p.className = "prompt"; p.textContent = body.prompt; out.append(p);
  controller = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false;
  try {
    const r = await fetch("/v1/generate/stream", { method: "POST", headers: { "Content-Type": "application/json" },
                                                   body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail; } catch (e) { /* not JSON */ }
      status(`error ${r.status}: ${detail}`, true);
      return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let event = "message", data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) handle(event, JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name === "AbortError") status("stopped");
    else status(`error: ${e.message}`, true);
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; controller = null;
  }
}

$("generate").addEventListener("click", generate);
$("colour-by").addEventListener("change", () => {
  for (const span of document.querySelectorAll("#output span.tok")) {
    span.style.backgroundColor = colour(JSON.parse(span.dataset.scores || "{}")) || "";
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
loadInfo().catch((e) => status(`cannot reach the service: ${e.message}`, true));
</script>
</body></html>
"""

// The playground: up to three decoding modes side by side, streamed through the public
// /v1/completions SSE API like any client, and a layer view from /v1/inspect. Plain JS, no
// build step and nothing fetched from elsewhere: the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const SLOTS = 3;
const TOP_LOGPROBS = 5;

const state = { card: null, runs: [] };

// ---- talking to the server -------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

/** An API error as one readable line: status, type, message, the field it names. */
async function describeError(resp) {
  let text = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    const e = body.error || {};
    text += e.type ? ` ${e.type}` : "";
    text += e.message ? `: ${e.message}` : "";
    if (e.param) text += ` (field: ${e.param})`;
  } catch (_) {
    text += resp.statusText ? ` ${resp.statusText}` : "";
  }
  if (resp.status === 429) {
    const after = resp.headers.get("Retry-After");
    text += `\nThe server is busy${after ? `; retry after ${after} s` : ""}.`;
  }
  if (resp.status === 401) text += "\nEnter the server's API key at the top right.";
  return text;
}

async function post(path, body, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!resp.ok) throw new Error(await describeError(resp));
  return resp;
}

/** Yields the JSON of each SSE `data:` event until `[DONE]`. */
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // a keep-alive comment
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---- modes ------------------------------------------------------------------------------
// Every strategy's form comes from the server (the served name's card, `strategies`): its
// fields, their widgets and this model's defaults. A new strategy appears here by itself.

/** The server's form for a strategy (`multi_exit.mode`). */
function formOf(kind) {
  return state.card.strategies.find((f) => f.mode === kind);
}

/** A mode as a picker holds it: its strategy and each field's value. */
function defaultMode(kind) {
  const form = formOf(kind);
  if (!form) return { kind: "off" };
  const values = {};
  for (const f of form.parameters) values[f.name] = f.default;
  return { kind, values };
}

function defaultModes() {
  return ["original", "exit", "contrast"].map(defaultMode);
}

/** The request's `multi_exit` object. */
function modeBody(m) {
  return { mode: m.kind, ...m.values };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

function select(options, value, onchange) {
  const s = el("select");
  for (const [v, label] of options) s.append(el("option", { value: String(v), textContent: label }));
  s.value = String(value);
  s.addEventListener("change", () => onchange(s.value));
  return s;
}

/** A field's widget; each change sets `m.values[f.name]`. */
function fieldInput(m, f) {
  if (f.input === "choice") {
    // choices may be numbers, strings or lists: compared and kept as JSON text
    const options = f.choices.map(([v, label]) => [JSON.stringify(v), label]);
    return select(options, JSON.stringify(m.values[f.name]), (v) => { m.values[f.name] = JSON.parse(v); });
  }
  const input = el("input", { type: "number", min: f.min, max: f.max, step: f.step, value: m.values[f.name] });
  input.addEventListener("change", () => { m.values[f.name] = Number(input.value); });
  return input;
}

/** One picker per slot; each edits `state.modes[i]` and redraws itself. */
function drawPickers() {
  const box = $("mode-pickers");
  box.replaceChildren();
  const menu = [["off", "off"], ...state.card.strategies.map((f) => [f.mode, f.title])];
  state.modes.forEach((m, i) => {
    const p = el("div", { class: "picker" }, el("span", { class: "slot", textContent: `Mode ${i + 1}` }));
    p.append(select(menu, m.kind, (v) => { state.modes[i] = defaultMode(v); drawPickers(); }));
    const form = formOf(m.kind);
    for (const f of form ? form.parameters : []) {
      p.append(el("label", {}, `${f.label} `, fieldInput(m, f)));
    }
    box.append(p);
  });
}

// ---- the completion columns --------------------------------------------------------------

function fmtToken(t) {
  return JSON.stringify(t).slice(1, -1);
}

function showTooltip(ev, text) {
  const tip = $("tooltip");
  tip.textContent = text;
  tip.hidden = false;
  const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = Math.min(ev.clientY + 16, window.innerHeight - tip.offsetHeight - 8);
  tip.style.left = `${Math.max(4, x)}px`;
  tip.style.top = `${Math.max(4, y)}px`;
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

/** The hover text of a streamed chunk: each token, its logprob and the top alternatives. */
function logprobText(lp) {
  const lines = [];
  lp.tokens.forEach((tok, j) => {
    const l = lp.token_logprobs[j];
    const p = l == null ? "" : `  logprob ${l.toFixed(3)}  p ${(Math.exp(l) * 100).toFixed(1)}%`;
    lines.push(`"${fmtToken(tok)}"${p}`);
    const top = lp.top_logprobs && lp.top_logprobs[j];
    if (top) {
      for (const [alt, v] of Object.entries(top).sort((a, b) => b[1] - a[1])) {
        lines.push(`   ${v.toFixed(3)}  "${fmtToken(alt)}"`);
      }
    }
  });
  return lines.join("\n");
}

/** A column, headed by its strategy until the server names the mode (its flag form). */
function makeColumn(mode) {
  const completion = el("div", { class: "completion", "data-mode": mode.kind });
  const stats = el("div", { class: "stats", textContent: "waiting…" });
  const error = el("div", { class: "error", hidden: true });
  const title = el("h3", { textContent: mode.kind });
  const col = el("div", { class: "column" }, title, completion, error, stats);
  return { col, title, completion, stats, error };
}

/** Heads the column with the mode's name as the server resolved it (e.g. `dola:2-4-6`). */
function nameColumn(view, multiExit) {
  if (!multiExit || !multiExit.name) return;
  view.completion.setAttribute("data-mode", multiExit.name);
  view.title.textContent = multiExit.name;
}

async function runColumn(mode, common, view, signal) {
  const started = performance.now();
  let first = null;
  let tokens = 0;
  let finish = null;
  let usage = null;
  try {
    const body = { ...common, stream: true, stream_options: { include_usage: true }, multi_exit: modeBody(mode) };
    const resp = await post("/v1/completions", body, signal);
    view.stats.textContent = "streaming…";
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new Error(`${chunk.error.type || "error"}: ${chunk.error.message}`);
      nameColumn(view, chunk.multi_exit);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.text) {
          const span = el("span", { class: "tok", textContent: c.text });
          let exits = "";
          if (c.exit_layers && c.exit_layers.length) {
            // early exit: a shade per layer, the darker the earlier the token left
            const layer = Math.min(...c.exit_layers);
            span.setAttribute("data-exit-layer", c.exit_layers.join(","));
            const depth = 1 - layer / state.card.num_layers;
            span.style.background = `rgba(var(--cell), ${(0.06 + 0.5 * depth).toFixed(3)})`;
            exits = `left at layer ${c.exit_layers.join(", ")} of ${state.card.num_layers}\n`;
          }
          if (exits || (c.logprobs && c.logprobs.tokens.length)) {
            const hover = exits + (c.logprobs ? logprobText(c.logprobs) : "");
            span.addEventListener("mousemove", (ev) => showTooltip(ev, hover));
            span.addEventListener("mouseleave", hideTooltip);
          }
          view.completion.append(span);
        }
        if (c.logprobs) tokens += c.logprobs.tokens.length;
        if (c.finish_reason) finish = c.finish_reason;
        if (first === null && c.text) first = performance.now();
      }
    }
    const secs = (performance.now() - started) / 1000;
    const n = usage ? usage.completion_tokens : tokens;
    const ttft = first === null ? "" : `, first token ${Math.round(first - started)} ms`;
    const byLayer = usage && usage.early_exit
      ? `; left at ${Object.entries(usage.early_exit.tokens_by_layer).map(([l, k]) => `${l}: ${k}`).join(", ")}`
      : "";
    view.stats.textContent = `${n} tokens in ${secs.toFixed(2)} s${ttft}, finish: ${finish || "?"}${byLayer}`;
  } catch (e) {
    if (e.name === "AbortError") {
      view.stats.textContent = "stopped";
      return;
    }
    view.error.textContent = e.message;
    view.error.hidden = false;
    view.stats.textContent = "failed";
  }
}

function commonParams() {
  const params = {
    model: state.card.id,
    prompt: $("prompt").value,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    logprobs: TOP_LOGPROBS,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") params.seed = Number(seed);
  return params;
}

// ---- the layer view ------------------------------------------------------------------------

async function drawLayers(common, modes, signal) {
  const box = $("layers");
  box.replaceChildren(el("p", { class: "muted", textContent: "inspecting…" }));
  try {
    const tok = await (await post("/tokenize", { model: common.model, prompt: common.prompt, return_token_strs: true }, signal)).json();
    // Every position up to the server's cap (the rest of a longer prompt is not inspected).
    const shown = tok.tokens.slice(0, state.card.max_inspect_positions);
    const req = { model: common.model, prompt: shown, positions: "all", top_logprobs: 3 };
    // the strategies picked, as rows of their own (single heads are rows already)
    const strategies = modes.filter((m) => !formOf(m.kind).single_head).map(modeBody);
    if (strategies.length) req.strategies = strategies;
    const insp = await (await post("/v1/inspect", req, signal)).json();
    state.inspection = { insp, strs: tok.token_strs };
    renderLayers();
  } catch (e) {
    if (e.name === "AbortError") return;
    box.replaceChildren(el("div", { class: "error", textContent: `Layer view: ${e.message}` }));
  }
}

function renderLayers() {
  if (!state.inspection) return;
  const { insp, strs } = state.inspection;
  const shade = $("shade").value;
  const heads = insp.positions[0].heads.map((h) => h.head);
  const table = el("table");
  const head = el("tr", {}, el("th", { textContent: "head \\ input" }));
  insp.positions.forEach((p) => head.append(el("th", { textContent: fmtToken(strs[p.index] ?? String(p.token_id)) })));
  table.append(head);
  heads.forEach((name, r) => {
    const row = el("tr", {}, el("th", { textContent: name }));
    insp.positions.forEach((p) => {
      const h = p.heads[r];
      const top = h.top_logprobs[0];
      const prob = Math.exp(top.logprob);
      const weight = shade === "jsd" ? Math.min(1, h.jsd_to_original / Math.LN2) : prob;
      const cell = el("td", { textContent: fmtToken(top.token) });
      cell.style.background = `rgba(var(--cell), ${(0.08 + 0.6 * weight).toFixed(3)})`;
      if (p.next_token_id !== null && top.token_id === p.next_token_id) cell.classList.add("hit");
      const lines = [`${name} at position ${p.index}`, `entropy ${h.entropy.toFixed(3)} nats, JSD to original ${h.jsd_to_original.toFixed(4)}`];
      // the layer a strategy chose here (DoLa's premature layer, early exit's exit)
      for (const [k, v] of Object.entries(h)) if (k.endsWith("_layer")) lines.push(`${k.replaceAll("_", " ")} ${v}`);
      if (h.next_token_logprob !== null) lines.push(`logprob of the actual next token ${h.next_token_logprob.toFixed(3)}`);
      h.top_logprobs.forEach((t) => lines.push(`   ${t.logprob.toFixed(3)}  "${fmtToken(t.token)}"`));
      const hover = lines.join("\n");
      cell.addEventListener("mousemove", (ev) => showTooltip(ev, hover));
      cell.addEventListener("mouseleave", hideTooltip);
      row.append(cell);
    });
    table.append(row);
  });
  $("layers").replaceChildren(table, el("p", { class: "muted", textContent: "Bold: the head's top token is the prompt's actual next token." }));
}

// ---- running ----------------------------------------------------------------------------

let controller = null;

async function run() {
  if (!state.card) return;
  $("global-error").hidden = true;
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  const modes = state.modes.filter((m) => m.kind !== "off");
  const common = commonParams();
  const views = modes.map(makeColumn);
  $("columns").replaceChildren(...views.map((v) => v.col));
  const signal = controller.signal;
  await Promise.all([
    ...modes.map((m, i) => runColumn(m, common, views[i], signal)),
    drawLayers(common, modes, signal),
  ]);
  $("run").disabled = false;
  $("stop").disabled = true;
  document.body.dataset.state = "done";
}

async function connect() {
  const info = $("model-info");
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw new Error(await describeError(resp));
    const list = await resp.json();
    const card = list.data.find((c) => c.id === c.root) || list.data[0];
    state.card = card;
    state.modes = defaultModes();
    info.textContent = `${card.id}: ${card.num_layers} layers, exits at ${card.exit_layers.join(", ")}`;
    drawPickers();
    $("run").disabled = false;
    $("global-error").hidden = true;
    document.body.dataset.state = "ready";
  } catch (e) {
    info.textContent = "not connected";
    $("global-error").textContent = e.message;
    $("global-error").hidden = false;
    $("run").disabled = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("run").disabled = true;
  $("run").addEventListener("click", run);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("api-key").addEventListener("change", connect);
  $("shade").addEventListener("change", renderLayers);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) run();
  });
  connect();
});

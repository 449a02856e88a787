// fluxgymd's dashboard: every URL is relative, so the page works under a proxy's path prefix.
"use strict";
const TOKEN = document.querySelector('meta[name="fluxgymd-token"]').content;
const $ = (sel) => document.querySelector(sel);
const jobs = new Map();
let selected = null;
let logSeq = null;
let metrics = [];

async function api(path, opts = {}) {
  opts.headers = Object.assign({ "X-Fluxgymd-Token": TOKEN }, opts.headers || {});
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  for (const [unit, scale] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (n >= scale) return `${(n / scale).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

function esc(t) {
  return String(t ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

function renderJobs() {
  const rows = [...jobs.values()].sort((a, b) => b.id - a.id);
  $("#jobs tbody").innerHTML = rows.map((j) => {
    const pct = j.progress !== null && j.progress !== undefined ? Math.round(j.progress * 100) : null;
    const prog = j.state === "queued" && j.waiting ? esc(j.waiting)
      : j.phase && ["loading", "caching", "sampling", "saving"].includes(j.phase) && j.state === "running"
        ? j.phase : (pct === null ? "-" : `<div class="bar"><span style="width:${pct}%"></span></div> ${pct}%`);
    const act = ["queued", "starting", "running", "stalled", "recovering"].includes(j.state)
      ? `<button data-act="cancel" data-id="${j.id}">cancel</button>`
      : (["failed", "cancelled", "interrupted"].includes(j.state)
        ? `<button data-act="retry" data-id="${j.id}">retry</button>` : "");
    return `<tr data-id="${j.id}" class="${selected === j.id ? "sel" : ""}">
      <td>${j.id}</td><td>${esc(j.name)}</td><td>${esc(j.kind)}</td>
      <td class="state state-${j.state}">${j.state}</td><td>${prog}</td>
      <td>${j.kind === "download" ? `${fmtBytes(j.step)}/${fmtBytes(j.total_steps)}`
        : `${j.step ?? "-"}/${j.total_steps ?? "-"}`}</td>
      <td>${j.loss === null || j.loss === undefined ? "-" : Number(j.loss).toPrecision(4)}</td>
      <td>${fmtDuration(j.eta_s)}</td><td>${j.attempts ?? 0}</td><td>${act}</td></tr>`;
  }).join("");
  const counts = {};
  rows.forEach((j) => { counts[j.state] = (counts[j.state] || 0) + 1; });
  $("#summary").textContent = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ") || "no jobs";
}

async function loadJobs() {
  const r = await api("api/jobs");
  jobs.clear();
  r.jobs.forEach((j) => jobs.set(j.id, j));
  renderJobs();
}

async function loadGpus() {
  const r = await api("api/gpus");
  if (!r.gpus.length) { $("#gpu-list").textContent = `no GPU figures: ${r.why}`; return; }
  $("#gpu-list").innerHTML = "<table><tr><th>GPU</th><th>name</th><th>util</th><th>memory GiB</th>" +
    "<th>planned GiB</th><th>temp</th><th>power W</th><th>jobs</th></tr>" + r.gpus.map((g) => `<tr><td>${g.index}</td>
    <td>${esc(g.name || "-")}</td><td>${g.utilization ?? "-"}%</td>
    <td>${g.memory_used == null ? "-" : (g.memory_used / 2 ** 30).toFixed(1)}/${g.memory_total == null ? "-" : (g.memory_total / 2 ** 30).toFixed(1)}</td>
    <td>${g.planned ? (g.planned / 2 ** 30).toFixed(1) : "-"}</td>
    <td>${g.temperature ?? "-"}°C</td><td>${g.power_w == null ? "-" : Math.round(g.power_w)}${g.power_limit_w ? "/" + Math.round(g.power_limit_w) : ""}</td>
    <td>${g.jobs.map((j) => `${j.id} ${esc(j.name)}` + (j.planned == null ? "" :
      ` (${(j.planned / 2 ** 30).toFixed(1)} GiB${j.tier ? ", " + esc(j.tier) : ""})`)).join(", ") || "-"}</td></tr>`).join("") +
    "</table>" + (r.waiting || []).map((w) => `<div>job ${w.id} (${esc(w.name)}) ${esc(w.why)}</div>`).join("");
}

function drawChart() {
  const pts = metrics.filter((m) => m.loss !== null);
  const a = Number($("#smooth").value);
  let ema = null;
  const smooth = pts.map((m) => (ema = ema === null ? m.loss : a * ema + (1 - a) * m.loss));
  const lr = metrics.filter((m) => m.lr !== null);
  const traces = [
    { x: pts.map((m) => m.step), y: pts.map((m) => m.loss), name: "loss", mode: "lines",
      line: { color: "#9bb", width: 1 } },
    { x: pts.map((m) => m.step), y: smooth, name: `loss (EMA ${a})`, mode: "lines", line: { color: "#06c" } },
  ];
  if (lr.length) traces.push({ x: lr.map((m) => m.step), y: lr.map((m) => m.lr), name: "lr", yaxis: "y2",
    mode: "lines", line: { color: "#c60", dash: "dot" } });
  // a learning rate is never negative: the axis starts at 0 (autorange around a constant
  // lr spreads it to both sides of zero)
  const lrMax = Math.max(0, ...lr.map((m) => m.lr));
  Plotly.react("chart", traces, {
    margin: { t: 10, r: 50, b: 40, l: 50 }, xaxis: { title: "step" }, yaxis: { title: "loss" },
    yaxis2: { overlaying: "y", side: "right", showgrid: false, title: "lr", tickformat: ".1e",
      range: [0, lrMax > 0 ? lrMax * 1.15 : 1], autorange: false },
    legend: { orientation: "h" },
  }, { displayModeBar: false, responsive: true });
}

async function loadSamples(id) {
  const r = await api(`api/jobs/${id}/samples`);
  const byStep = new Map();
  r.samples.forEach((s) => {
    const k = s.step ?? "?";
    if (!byStep.has(k)) byStep.set(k, []);
    byStep.get(k).push(s);
  });
  $("#gallery").innerHTML = [...byStep.entries()].map(([step, list]) =>
    `<div class="step"><b>step ${step}</b>${list.map((s) =>
      `<img src="api/jobs/${id}/samples/${encodeURIComponent(s.name)}" alt="${esc(s.name)}" title="${esc(s.name)}">`).join("")}</div>`)
    .join("") || "<i>no samples yet</i>";
}

const ACTIVE = ["queued", "starting", "running", "stalled", "recovering"];
const LORA_KINDS = ["lora", "kohya"];

function say(text, ok = false) {  // the status line under the jobs: red unless ok
  $("#message").textContent = text;
  $("#message").dataset.kind = ok ? "ok" : "err";
}

function renderActions(j) {
  const b = [];
  if (j.lora) b.push(`<a class="button" id="download-lora" href="api/jobs/${j.id}/lora" download>download LoRA</a>`);
  if (j.checkpoint) b.push(`<a class="button" id="download-checkpoint" href="api/jobs/${j.id}/checkpoint" download>download checkpoint (step ${j.checkpoint_step})</a>`);
  if (j.state === "running" && LORA_KINDS.includes(j.kind)) {
    b.push(`<button data-act="save-now">save now</button>`);
    const prompts = j.kind === "lora" ? (j.spec?.train?.sample_prompts || []).length > 0
      : (j.spec?.kohya?.args || []).some((a) => a.startsWith("--sample_prompts"));
    if (prompts) b.push(`<button data-act="sample-now">sample now</button>`);
  }
  if (ACTIVE.includes(j.state)) b.push(`<button data-act="cancel">cancel</button>`);
  if (LORA_KINDS.includes(j.kind) && !["failed", "cancelled"].includes(j.state)) {
    b.push(`<input id="publish-repo" placeholder="owner/repo" size="18" aria-label="Hub repo">
      <label class="small"><input type="checkbox" id="publish-private"> private</label>
      <button data-act="publish">publish</button>`);
  }
  $("#actions").innerHTML = b.join(" ");
  $("#actions").dataset.id = j.id;
}

$("#actions").addEventListener("click", async (e) => {
  const btn = e.target.closest("button");
  if (!btn) return;
  const id = $("#actions").dataset.id;
  const opts = { method: "POST" };
  if (btn.dataset.act === "publish") {
    opts.body = JSON.stringify({ repo: $("#publish-repo").value.trim(), private: $("#publish-private").checked });
    opts.headers = { "Content-Type": "application/json" };
  }
  try {
    const r = await api(`api/jobs/${id}/${btn.dataset.act}`, opts);
    say(btn.dataset.act === "publish" ? `publish: job ${r.id} (${r.name}) ${r.state}`
      : btn.dataset.act.endsWith("-now") ? `${btn.dataset.act}: asked at step ${r.step ?? 0}` : "", true);
  } catch (err) { say(`${btn.dataset.act}: ${err.message}`); }
});

async function select(id) {
  selected = id;
  logSeq = null;
  renderJobs();
  const j = await api(`api/jobs/${id}`);
  $("#detail").hidden = false;
  $("#detail-title").textContent = `job ${j.id}: ${j.name} (${j.kind})`;
  renderActions(j);
  const w = j.watchdog;
  $("#watchdog").innerHTML = [["state", `${j.state}: ${j.reason || ""}`], ["restarts", w.restarts],
    ["no-progress", w.no_progress], ["step limit", fmtDuration(w.step_limit_s)], ["GPU rule", w.gpu],
    ["runs on", j.executor === "slurm" ? `Slurm job ${j.external_id || "(not submitted yet)"}` +
      `${j.node ? " on " + j.node : ""}${j.external_state ? ", " + j.external_state : ""}` : "this machine"],
    ["stall floor", fmtDuration(w.limits.stall_floor_s)], ["kill grace", fmtDuration(w.limits.kill_grace_s)],
    ["LoRA", j.lora || "-"]].map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
  $("#history").innerHTML = j.events.slice().reverse().map((e) =>
    `<li>${new Date(e.at * 1000).toLocaleTimeString()} ${esc(e.from_state || "-")} → <b>${esc(e.to_state)}</b>: ${esc(e.reason)}</li>`).join("");
  const spec = j.spec || {};
  $("#settings").textContent = JSON.stringify(spec.train || spec.kohya || spec.command || spec, null, 2);
  metrics = (await api(`api/jobs/${id}/metrics`)).metrics;
  drawChart();
  await loadSamples(id);
  const log = await api(`api/jobs/${id}/log?lines=300`);
  $("#log").textContent = log.lines.join("\n");
  logSeq = log.seq;
  $("#log").scrollTop = $("#log").scrollHeight;
}

function onEvent(msg) {
  const { topic, data } = msg;
  if (topic === "gap") { loadJobs(); if (selected) select(selected); return; }
  if (topic === "state") {
    jobs.set(data.id, Object.assign(jobs.get(data.id) || {}, data));
    renderJobs();
    if (data.id === selected) select(selected);
  } else if (topic === "progress") {
    const j = jobs.get(data.job);
    if (!j) return;
    if (data.event === "step") {
      Object.assign(j, { step: data.step, total_steps: data.total ?? j.total_steps, loss: data.loss ?? j.loss });
      if (j.total_steps) j.progress = j.step / j.total_steps;
      if (data.job === selected && (data.loss !== undefined || data.lr !== undefined)) {
        metrics.push({ step: data.step, loss: data.loss ?? null, lr: data.lr ?? null });
        drawChart();
      }
    } else if (data.event === "phase") {
      j.phase = data.phase;
    } else if (data.event === "sample" && data.job === selected) {
      loadSamples(selected);
    }
    renderJobs();
  } else if (topic.startsWith("log.") && data.job === selected) {
    if (logSeq !== null && data.first <= logSeq) return;  // already shown
    const pre = $("#log");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 5;
    pre.textContent += "\n" + data.lines.join("\n");
    logSeq = data.first + data.lines.length - 1;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
}

function connect() {
  const es = new EventSource("api/events");
  es.onopen = () => { $("#live").classList.add("on"); loadJobs(); };
  es.onmessage = (e) => onEvent(JSON.parse(e.data));
  es.onerror = () => { $("#live").classList.remove("on"); };
}

$("#jobs tbody").addEventListener("click", async (e) => {
  const btn = e.target.closest("button");
  if (btn) {
    e.stopPropagation();
    try {
      await api(`api/jobs/${btn.dataset.id}/${btn.dataset.act}`, { method: "POST" });
      $("#message").textContent = "";
    } catch (err) { $("#message").textContent = `${btn.dataset.act}: ${err.message}`; }
    return;
  }
  const tr = e.target.closest("tr");
  if (tr) select(Number(tr.dataset.id));
});
$("#gallery").addEventListener("click", (e) => {
  if (e.target.tagName !== "IMG") return;
  $("#viewer img").src = e.target.src;
  $("#viewer").hidden = false;
});
$("#viewer").addEventListener("click", () => { $("#viewer").hidden = true; });
$("#smooth").addEventListener("input", drawChart);
$("#upload").addEventListener("change", async (e) => {
  const f = e.target.files[0];
  if (!f) return;
  try {
    const j = await api(`api/submit?filename=${encodeURIComponent(f.name)}`,
      { method: "POST", body: await f.text(), headers: { "Content-Type": "text/plain" } });
    $("#message").textContent = "";
    select(j.id);
  } catch (err) { $("#message").textContent = `submit: ${err.message}`; }
  e.target.value = "";
});

loadJobs().catch((e) => { $("#message").textContent = e.message; });
loadGpus().catch(() => {});
setInterval(() => loadGpus().catch(() => {}), 5000);
connect();

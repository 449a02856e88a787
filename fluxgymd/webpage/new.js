// The new-LoRA page: a draft of uploaded photos, their captions, the form, and "Start
// training", which is the daemon's `new` operation (the chain `fluxgymctl new` queues).
// Uses app.js's api(), esc(), fmtBytes() and select().
"use strict";
const NEW = { draft: null, files: [], plans: {}, captionJob: null, poll: null, edited: false };
const form = $("#new-form");

async function newDraft() {
  NEW.draft = (await api("api/drafts", { method: "POST" })).id;
  NEW.files = [];
  renderThumbs();
}

function formArgs(dryRun) {
  const f = new FormData(form);
  const num = (k) => Number(f.get(k) || 0);
  const lines = (k) => String(f.get(k) || "").split("\n").map((l) => l.trim()).filter(Boolean);
  return {
    name: String(f.get("name") || "").trim(), trigger: String(f.get("trigger") || "").trim(),
    base: f.get("base") || "flux-dev", vram: f.get("vram") || "auto",
    resolution: num("resolution"), repeats: num("repeats"), epochs: num("epochs"),
    steps: num("steps"), lr: Number(f.get("lr")), rank: num("rank"), seed: num("seed"),
    sample_every: num("sample_every"), samples: lines("samples"),
    publish: String(f.get("publish") || "").trim(), private: f.get("private") === "on",
    set: lines("set"), caption: f.get("caption") === "on", dry_run: dryRun, job_file: NEW.edited ? $("#new-job-file").value : "",
  };
}

function expectedSteps() {
  const a = formArgs(true);
  const images = NEW.files.length;
  $("#new-steps").textContent = a.steps ? `${a.steps} steps`
    : `${images} photos × ${a.repeats} repeats × ${a.epochs} epochs = ${images * a.repeats * a.epochs} steps`;
}

async function loadModels() {
  const r = await api("api/models");
  const base = $("#new-base");
  const chosen = base.value;
  base.innerHTML = r.models.filter((m) => m.part === "transformer").map((m) =>
    `<option value="${esc(m.name)}">${esc(m.name)} (${m.present ? "on disk"
      : "will download" + (m.size ? ", " + fmtBytes(m.size) : "")})</option>`).join("");
  if (chosen) base.value = chosen;
  else if ([...base.options].some((o) => o.value === "flux-dev")) base.value = "flux-dev";
}

async function loadPlan() {
  const base = $("#new-base").value;
  const res = Number(form.elements.resolution.value) || 512;
  if (!base) return;
  let r;
  try { r = await api(`api/plan?base=${encodeURIComponent(base)}&resolution=${res}`); }
  catch (e) { $("#new-free").textContent = e.message; return; }
  const vram = $("#new-vram");
  const chosen = vram.value || "auto";
  const gib = (b) => (b / 2 ** 30).toFixed(1);
  vram.innerHTML = `<option value="auto">auto</option>` + ["24G", "16G", "12G", "8G"].map((t) =>
    `<option value="${t}">${t}${r.tiers[t] ? ` (peak ${gib(r.tiers[t])} GiB)` : ""}</option>`).join("");
  vram.value = chosen;
  $("#new-free").textContent = r.gpus.length
    ? r.gpus.map((g) => `GPU ${g.index}: ${gib(g.free)} GiB free`).join(", ")
    : (r.why || "no GPU here");
}

function renderThumbs() {
  $("#thumbs").innerHTML = NEW.files.map((f) => `<figure data-name="${esc(f.name)}">
      <img src="api/drafts/${NEW.draft}/files/${encodeURIComponent(f.name)}" alt="${esc(f.name)}">
      <figcaption>${esc(f.name)}</figcaption>
      <textarea rows="3" aria-label="caption of ${esc(f.name)}">${esc(f.caption ?? "")}</textarea>
    </figure>`).join("");
  expectedSteps();
}

async function refreshDraft() {
  const r = await api(`api/drafts/${NEW.draft}`);
  NEW.files = r.files;
  NEW.captionJob = r.caption_job;
  renderThumbs();
  previewSoon();
  return r;
}

async function uploadFiles(list) {
  const files = [...list].sort((a, b) => (a.name.endsWith(".txt") ? 1 : 0) - (b.name.endsWith(".txt") ? 1 : 0));
  const msgs = [];
  for (const f of files) {  // one request per file: each is checked and limited alone
    try {
      await api(`api/drafts/${NEW.draft}/files?name=${encodeURIComponent(f.name)}`,
        { method: "POST", body: f, headers: { "Content-Type": "application/octet-stream" } });
    } catch (e) { msgs.push(e.message); }
  }
  $("#new-message").textContent = msgs.join("; ");
  await refreshDraft();
}

async function captionProgress() {
  const r = await refreshDraft();
  const j = r.caption_job;
  if (!j) return;
  const done = ["succeeded", "failed", "cancelled"].includes(j.state);
  $("#caption-state").textContent = `job ${j.id} ${j.state}` +
    (j.total_steps && !done ? `: ${j.step ?? 0}/${j.total_steps} photos` : "") +
    (j.state === "failed" ? `: ${j.reason}` : "") + (j.waiting ? `, ${j.waiting}` : "");
  if (done) { clearInterval(NEW.poll); NEW.poll = null; }
}

$("#new-open").addEventListener("click", async () => {
  $("#new").hidden = false;
  try {
    if (!NEW.draft) await newDraft();
    await loadModels();
    await loadPlan();
    expectedSteps();
  } catch (e) { $("#new-message").textContent = e.message; }
});
$("#new-close").addEventListener("click", () => { $("#new").hidden = true; });
$("#new-base").addEventListener("change", loadPlan);
form.elements.resolution.addEventListener("change", loadPlan);
form.addEventListener("input", expectedSteps);
$("#new-pick").addEventListener("change", async (e) => { await uploadFiles(e.target.files); e.target.value = ""; });
$("#drop").addEventListener("dragover", (e) => { e.preventDefault(); $("#drop").classList.add("over"); });
$("#drop").addEventListener("dragleave", () => $("#drop").classList.remove("over"));
$("#drop").addEventListener("drop", async (e) => {
  e.preventDefault();
  $("#drop").classList.remove("over");
  await uploadFiles(e.dataTransfer.files);
});
$("#thumbs").addEventListener("change", async (e) => {  // a caption edited: saved at once
  const fig = e.target.closest("figure");
  if (!fig || e.target.tagName !== "TEXTAREA") return;
  try {
    await api(`api/drafts/${NEW.draft}/captions/${encodeURIComponent(fig.dataset.name)}`,
      { method: "PUT", body: e.target.value, headers: { "Content-Type": "text/plain" } });
    const f = NEW.files.find((x) => x.name === fig.dataset.name);
    if (f) f.caption = e.target.value;
  } catch (err) { $("#new-message").textContent = `caption: ${err.message}`; }
});
$("#caption-btn").addEventListener("click", async () => {
  try {
    const trigger = encodeURIComponent(formArgs(true).trigger);
    const j = await api(`api/drafts/${NEW.draft}/caption?trigger=${trigger}`, { method: "POST" });
    $("#caption-state").textContent = `job ${j.id} ${j.state}`;
    if (!NEW.poll) NEW.poll = setInterval(() => captionProgress().catch(() => {}), 1000);
  } catch (e) { $("#caption-state").textContent = e.message; }
});
async function preview() {  // the job files `new` would submit, while "advanced" is open
  if (!$("#advanced").open || !NEW.draft) return;
  try {
    const r = await api(`api/drafts/${NEW.draft}/start`, { method: "POST",
      body: JSON.stringify(formArgs(true)), headers: { "Content-Type": "application/json" } });
    const a = formArgs(true);
    if (!NEW.edited) $("#new-job-file").value = r.files[a.name] || "";
    $("#new-preview").textContent = Object.entries(r.files).filter(([n]) => n !== a.name)
      .map(([n, t]) => `# --- ${n}.toml ---\n${t}`).join("\n");
    $("#new-steps").textContent = `${r.steps} steps` + (NEW.edited ? " (from the edited file)" : "");
  } catch (e) { $("#new-preview").textContent = e.message; }
}
let previewTimer = null;
function previewSoon() { clearTimeout(previewTimer); previewTimer = setTimeout(preview, 300); }
$("#advanced").addEventListener("toggle", preview);
$("#new-job-file").addEventListener("input", (e) => { e.stopPropagation(); NEW.edited = true; });
$("#new-reset").addEventListener("click", () => { NEW.edited = false; preview(); });
form.addEventListener("input", previewSoon);
form.addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const r = await api(`api/drafts/${NEW.draft}/start`, { method: "POST",
      body: JSON.stringify(formArgs(false)), headers: { "Content-Type": "application/json" } });
    say(`queued: ${r.jobs.map((j) => `${j.id} ${j.name}`).join(", ")}`, true);
    $("#new").hidden = true;
    form.reset();
    NEW.draft = null;
    NEW.edited = false;
    const lora = r.jobs.find((j) => j.kind === "lora");
    if (lora) select(lora.id);
  } catch (err) { $("#new-message").textContent = err.message; }
});

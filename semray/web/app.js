// semray web app: pick an image and a model, see noisy vs denoised with a swipe divider and zoom.
// Plain browser JavaScript, no libraries and no network beyond this server (the page works offline).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

const METRIC_LABELS = [
  ["psnr", "PSNR (dB)", 2],
  ["ssim", "SSIM", 4],
  ["ms_ssim", "MS-SSIM", 4],
  ["edge_preservation", "Edge F1", 3],
  ["gradient_correlation", "Grad. corr.", 3],
];
const MAX_HISTORY = 12;
const ZOOM_MIN = 0.25;
const ZOOM_MAX = 64;

const state = {
  limits: { max_request_mib: 64, max_image_pixels: 0 },
  choices: new Map(), // select value -> {method, model, entry}
  image: null, // File or Blob with a name
  reference: null,
  sample: null,
  busy: false,
  pending: false,
  results: [], // history, newest first
  current: null,
  downloadUrl: null,
  // view: zoom relative to "fit", centre in preview-image pixels, swipe split as a fraction of width
  view: { zoom: 1, cx: 0, cy: 0, split: 0.5, w: 0, h: 0, scaleToOriginal: 1 },
};

// ------------------------------------------------------------------------------------ helpers
function toast(message) {
  const el = $("#toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 7000);
}

async function apiJson(url, options) {
  const resp = await fetch(url, options);
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  if (!resp.ok) {
    let detail = body && body.detail !== undefined ? body.detail : resp.statusText;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    throw new Error(`${resp.status}: ${detail}`);
  }
  return body;
}

function fmtMs(ms) {
  if (ms === undefined || ms === null) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function fmtBytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(0)} KiB`;
  return `${n} B`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

// ------------------------------------------------------------------------------------- health
async function pollHealth() {
  const dot = $("#health-dot");
  const text = $("#health-text");
  try {
    const h = await apiJson("/api/health");
    dot.className = "dot ok";
    const cached = h.cached_models.length;
    text.textContent = `online · v${h.version} · ${cached} model${cached === 1 ? "" : "s"} cached`;
  } catch (_) {
    dot.className = "dot down";
    text.textContent = "service unreachable";
  }
}

// ------------------------------------------------------------------------------------- models
async function loadModels() {
  const data = await apiJson("/api/models");
  state.limits = data.limits || state.limits;
  $("#drop-sub").textContent = `grayscale, 8/16-bit or float · up to ${state.limits.max_request_mib} MiB`;
  const select = $("#model-select");
  select.textContent = "";
  state.choices.clear();
  const groups = [
    ["Trained models", data.models.filter((m) => m.source !== "mlflow")],
    ["MLflow registry", data.models.filter((m) => m.source === "mlflow")],
  ];
  for (const [label, models] of groups) {
    if (!models.length) continue;
    const group = el("optgroup", { label });
    for (const m of models) {
      const value = `unet|${m.name}`;
      state.choices.set(value, { method: "unet", model: m.name, entry: m });
      const suffix = m.source === "mlflow" ? "" : ` · ${m.source}`;
      group.append(el("option", { value, text: `${m.name}${suffix}` }));
    }
    select.append(group);
  }
  const classical = el("optgroup", { label: "Classical methods" });
  for (const m of data.methods) {
    const value = `method|${m.name}`;
    state.choices.set(value, { method: m.name, model: null, entry: m });
    classical.append(el("option", { value, text: m.name, title: m.description }));
  }
  select.append(classical);
  const d = data.default;
  select.value = d.method === "unet" ? `unet|${d.model}` : `method|${d.method}`;
  if (!select.value && select.options.length) select.selectedIndex = 0;
  renderModelCard();
}

function currentChoice() {
  return state.choices.get($("#model-select").value);
}

function renderModelCard() {
  const card = $("#model-card");
  card.textContent = "";
  const choice = currentChoice();
  if (!choice) return;
  const row = (k, v) => el("div", { class: "row" }, el("span", { text: k }), el("span", { text: v }));
  if (choice.method !== "unet") {
    card.append(row("Type", ""), el("div", { class: "desc", text: choice.entry.description }));
    card.firstChild.lastChild.append(el("span", { class: "badge classical", text: "classical" }));
    return;
  }
  const m = choice.entry;
  const c = m.card || {};
  const source = el("span", { class: `badge ${m.source === "mlflow" ? "mlflow" : ""}`, text: m.source });
  const first = row("Source", "");
  first.lastChild.append(source);
  card.append(first, row("Version", String(m.version)));
  if (c.params) card.append(row("Parameters", Number(c.params).toLocaleString("en-US")));
  const mc = c.model_config || {};
  if (mc.depth) card.append(row("U-Net", `depth ${mc.depth} · width ${mc.base_width} · ${mc.norm} norm`));
  if (c.loss) card.append(row("Loss", typeof c.loss === "string" ? c.loss : (c.loss.kind || JSON.stringify(c.loss))));
  for (const [k, v] of Object.entries(c.metrics || {}).slice(0, 4)) {
    if (typeof v === "number") card.append(row(k, v.toFixed(Math.abs(v) >= 10 ? 2 : 4)));
  }
  if (c.created) card.append(row("Created", String(c.created).slice(0, 10)));
  if (c.description) card.append(el("div", { class: "desc", text: c.description }));
}

// ------------------------------------------------------------------------------------ samples
async function loadSamples() {
  const data = await apiJson("/api/samples");
  const box = $("#samples");
  box.textContent = "";
  for (const s of data.samples) {
    const btn = el(
      "button",
      { class: "sample", type: "button", title: s.description, "data-sample": s.name },
      el("img", { src: s.preview_url, alt: s.name }),
      el("span", { text: s.name.replace("_", " ") }),
    );
    btn.addEventListener("click", () => pickSample(s));
    box.append(btn);
  }
}

async function pickSample(s) {
  try {
    const ext = s.format === "tiff" ? "tif" : "png";
    const [noisy, clean] = await Promise.all(
      [s.noisy_url, s.clean_url].map((u) => fetch(u).then((r) => {
        if (!r.ok) throw new Error(`sample download failed (${r.status})`);
        return r.blob();
      })),
    );
    state.image = new File([noisy], `${s.name}_noisy.${ext}`, { type: noisy.type });
    state.reference = new File([clean], `${s.name}_clean.${ext}`, { type: clean.type });
    state.sample = s.name;
    $("#image-input").value = "";
    $("#reference-input").value = "";
    $$(".sample").forEach((b) => b.classList.toggle("active", b.dataset.sample === s.name));
    describeInput();
    if ($("#auto").checked) runDenoise();
  } catch (e) {
    toast(String(e.message || e));
  }
}

function describeInput() {
  const info = $("#input-info");
  $("#run").disabled = !state.image;
  if (!state.image) { info.textContent = ""; return; }
  const ref = state.reference ? ` + reference ${state.reference.name}` : "";
  info.textContent = `${state.image.name} (${fmtBytes(state.image.size)})${ref}`;
}

function setImageFile(file) {
  if (!file) return;
  const limit = state.limits.max_request_mib * 1024 * 1024;
  if (file.size > limit) {
    toast(`${file.name} is ${fmtBytes(file.size)}; the limit is ${state.limits.max_request_mib} MiB`);
    return;
  }
  state.image = file;
  state.reference = null; // a reference belongs to one image
  state.sample = null;
  $("#reference-input").value = "";
  $$(".sample").forEach((b) => b.classList.remove("active"));
  describeInput();
  if ($("#auto").checked) runDenoise();
}

// ------------------------------------------------------------------------------------ denoise
async function runDenoise() {
  if (!state.image) return;
  if (state.busy) { state.pending = true; return; }
  const choice = currentChoice();
  if (!choice) return;
  state.busy = true;
  $("#busy").hidden = false;
  $("#busy-text").textContent = `Denoising with ${choice.model || choice.method}…`;
  $("#run").disabled = true;
  const form = new FormData();
  form.append("image", state.image, state.image.name);
  if (state.reference) form.append("reference", state.reference, state.reference.name);
  form.append("method", choice.method);
  if (choice.model) form.append("model", choice.model);
  // lets Serve route the request to a replica that already holds this model
  const headers = choice.method === "unet" ? { serve_multiplexed_model_id: `unet:${choice.model}` } : {};
  try {
    const result = await apiJson("/api/denoise", { method: "POST", body: form, headers });
    result.label = result.model.method === "unet" ? result.model.name : result.model.method;
    result.inputName = state.image.name;
    // only the newest result keeps its full-resolution file: large 16-bit images add up quickly
    for (const r of state.results) r.result.data_b64 = null;
    state.results.unshift(result);
    state.results.length = Math.min(state.results.length, MAX_HISTORY);
    await showResult(result);
    renderHistory();
    pollHealth();
  } catch (e) {
    toast(String(e.message || e));
  } finally {
    state.busy = false;
    $("#busy").hidden = true;
    $("#run").disabled = !state.image;
    if (state.pending) { state.pending = false; runDenoise(); }
  }
}

async function showResult(r) {
  state.current = r;
  const p = r.previews;
  const byKind = { noisy: p.noisy, denoised: p.denoised, difference: p.difference, clean: p.clean || "" };
  const loads = [];
  for (const img of $$(".layer img")) {
    const kind = img.closest(".layer").dataset.kind;
    const src = byKind[kind];
    if (!src) { img.classList.remove("loaded"); img.removeAttribute("src"); continue; }
    if (img.getAttribute("src") !== src) {
      img.src = src;
      loads.push(img.decode().catch(() => undefined));
    }
    img.classList.add("loaded");
  }
  await Promise.all(loads);
  $("#clean-panel").hidden = !p.clean;
  const noisyImg = $("#img-noisy");
  const w = noisyImg.naturalWidth;
  const h = noisyImg.naturalHeight;
  // keep the zoom and position when only the model changed, so the same spot is compared
  if (w !== state.view.w || h !== state.view.h) {
    Object.assign(state.view, { w, h, zoom: 1, cx: w / 2, cy: h / 2 });
  }
  state.view.scaleToOriginal = w / r.input.shape[1];
  $("#compare").classList.remove("empty-state");
  $("#empty").hidden = true;
  layoutAll();

  // result card
  $("#result-card").hidden = false;
  $("#result-placeholder").hidden = true;
  const m = r.model;
  $("#result-model").textContent = r.label;
  $("#result-model").append(el("small", { text: m.method === "unet" ? ` · ${m.source} v${m.version}` : " · classical" }));
  $("#result-model").title = `${m.method} ${m.name} v${m.version} (${m.source})`;
  const t = r.timing_ms;
  const how = m.method !== "unet" ? "" : (m.loaded_now ? ` incl. load ${fmtMs(t.model_load_ms)}` : " · cached");
  $("#result-time").textContent = fmtMs(t.total_ms);
  $("#result-time").title = `decode ${fmtMs(t.decode_ms)}, denoise ${fmtMs(t.denoise_ms)}, `
    + `metrics ${fmtMs(t.metrics_ms)}, encode ${fmtMs(t.encode_ms)}${how}`;
  $("#result-denoise").textContent = fmtMs(t.denoise_ms);
  $("#result-denoise").append(el("small", { text: how }));
  const inp = r.input;
  $("#result-format").textContent = `${inp.format.toUpperCase()} · ${inp.dtype} · ${inp.shape[1]}×${inp.shape[0]}`;
  $("#diff-scale").textContent = `0 … ${r.difference.scale.toFixed(3)}`;
  $(".legend").hidden = false;
  renderMetrics(r.metrics);
  setDownload(r.result);
}

function renderMetrics(metrics) {
  const wrap = $("#metrics-wrap");
  const body = $("#metrics tbody");
  body.textContent = "";
  wrap.hidden = !metrics;
  $("#metrics-hint").hidden = !!metrics;
  if (!metrics) return;
  for (const [key, label, digits] of METRIC_LABELS) {
    const a = metrics.noisy[key];
    const b = metrics.denoised[key];
    if (a === undefined && b === undefined) continue;
    const delta = a !== undefined && b !== undefined ? b - a : null;
    const deltaCell = el("td", {
      class: delta === null ? "" : delta > 0 ? "up" : delta < 0 ? "down" : "",
      text: delta === null ? "–" : `${delta > 0 ? "+" : ""}${delta.toFixed(digits)}`,
    });
    body.append(el("tr", { "data-metric": key },
      el("td", { text: label }),
      el("td", { text: a === undefined ? "–" : a.toFixed(digits) }),
      el("td", { text: b === undefined ? "–" : b.toFixed(digits) }),
      deltaCell));
  }
}

function setDownload(result) {
  const a = $("#download");
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = null;
  if (!result.data_b64) {
    a.removeAttribute("href");
    a.textContent = "Download: run again to fetch this result";
    return;
  }
  const bin = atob(result.data_b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) bytes[i] = bin.charCodeAt(i);
  state.downloadUrl = URL.createObjectURL(new Blob([bytes], { type: result.media_type }));
  a.href = state.downloadUrl;
  a.download = result.filename;
  a.textContent = "Download result";
  a.append(el("small", { text: `${result.filename} · ${fmtBytes(result.bytes)}` }));
}

function renderHistory() {
  const list = $("#history");
  list.textContent = "";
  $("#history-card").hidden = state.results.length === 0;
  for (const r of state.results) {
    const psnr = r.metrics ? `${r.metrics.denoised.psnr.toFixed(2)} dB` : "";
    const li = el("li", { class: r === state.current ? "active" : "", title: `${r.label} on ${r.inputName}` },
      el("img", { src: r.previews.denoised, alt: "" }),
      el("div", {},
        el("div", { class: "h-name", text: r.label }),
        el("div", { class: "h-sub", text: `${r.inputName} · ${fmtMs(r.timing_ms.total_ms)}` })),
      el("div", { class: "h-val", text: psnr }));
    li.addEventListener("click", async () => { await showResult(r); renderHistory(); });
    list.append(li);
  }
}

// --------------------------------------------------------------------------------- the viewer
function transformFor(vp) {
  const v = state.view;
  const vw = vp.clientWidth;
  const vh = vp.clientHeight;
  const fit = Math.min(vw / v.w, vh / v.h);
  const s = fit * v.zoom;
  return { s, tx: vw / 2 - v.cx * s, ty: vh / 2 - v.cy * s, vw, vh };
}

function layoutAll() {
  const v = state.view;
  if (!v.w) return;
  for (const vp of $$(".viewport")) {
    const { s, tx, ty } = transformFor(vp);
    for (const img of $$(".layer img", vp)) {
      img.style.width = `${v.w}px`;
      img.style.height = `${v.h}px`;
      img.style.transform = `translate(${tx}px, ${ty}px) scale(${s})`;
    }
    vp.classList.toggle("pixelated", s >= 2);
  }
  const main = $("#compare");
  $("#compare-top").style.clipPath = `inset(0 0 0 ${v.split * 100}%)`;
  $("#handle").style.left = `${v.split * 100}%`;
  $("#handle").setAttribute("aria-valuenow", String(Math.round(v.split * 100)));
  const { s } = transformFor(main);
  $("#zoom-level").textContent = `${Math.round(s / v.scaleToOriginal * 100)}%`;
}

function zoomAt(vp, factor, mx, my) {
  const v = state.view;
  if (!v.w) return;
  const before = transformFor(vp);
  const px = (mx - before.tx) / before.s; // image point under the cursor stays put
  const py = (my - before.ty) / before.s;
  v.zoom = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, v.zoom * factor));
  const after = transformFor(vp);
  v.cx = px - (mx - after.vw / 2) / after.s;
  v.cy = py - (my - after.vh / 2) / after.s;
  layoutAll();
}

function zoomCentre(factor) {
  const vp = $("#compare");
  zoomAt(vp, factor, vp.clientWidth / 2, vp.clientHeight / 2);
}

function fitView() {
  const v = state.view;
  Object.assign(v, { zoom: 1, cx: v.w / 2, cy: v.h / 2 });
  layoutAll();
}

function oneToOne() {
  const v = state.view;
  if (!v.w) return;
  const vp = $("#compare");
  const fit = Math.min(vp.clientWidth / v.w, vp.clientHeight / v.h);
  v.zoom = v.scaleToOriginal / fit; // one original pixel per screen pixel
  layoutAll();
}

function setSplit(fraction) {
  state.view.split = Math.min(1, Math.max(0, fraction));
  layoutAll();
}

function bindViewer() {
  for (const vp of $$(".viewport")) {
    vp.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const r = vp.getBoundingClientRect();
      zoomAt(vp, Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
    }, { passive: false });
    vp.addEventListener("dblclick", fitView);
    vp.addEventListener("pointerdown", (ev) => {
      if (ev.button !== 0 || !state.view.w) return;
      const onHandle = ev.target.closest(".handle");
      vp.setPointerCapture(ev.pointerId);
      vp.classList.add("dragging");
      let last = { x: ev.clientX, y: ev.clientY };
      const move = (e) => {
        if (onHandle) {
          const r = vp.getBoundingClientRect();
          setSplit((e.clientX - r.left) / r.width);
        } else {
          const { s } = transformFor(vp);
          state.view.cx -= (e.clientX - last.x) / s;
          state.view.cy -= (e.clientY - last.y) / s;
          last = { x: e.clientX, y: e.clientY };
          layoutAll();
        }
      };
      const up = () => {
        vp.classList.remove("dragging");
        vp.removeEventListener("pointermove", move);
        vp.removeEventListener("pointerup", up);
        vp.removeEventListener("pointercancel", up);
      };
      vp.addEventListener("pointermove", move);
      vp.addEventListener("pointerup", up);
      vp.addEventListener("pointercancel", up);
    });
  }
  $("#handle").addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowLeft") setSplit(state.view.split - 0.02);
    else if (ev.key === "ArrowRight") setSplit(state.view.split + 0.02);
    else return;
    ev.preventDefault();
  });
  $("#zoom-in").addEventListener("click", () => zoomCentre(1.5));
  $("#zoom-out").addEventListener("click", () => zoomCentre(1 / 1.5));
  $("#zoom-fit").addEventListener("click", fitView);
  $("#zoom-1").addEventListener("click", oneToOne);
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input, select, textarea")) return;
    if (ev.key === "+" || ev.key === "=") zoomCentre(1.5);
    else if (ev.key === "-") zoomCentre(1 / 1.5);
    else if (ev.key === "0") fitView();
    else if (ev.key === "1") oneToOne();
  });
  new ResizeObserver(layoutAll).observe($("#compare"));
}

// ----------------------------------------------------------------------------------- wiring up
function bindInputs() {
  $("#image-input").addEventListener("change", (ev) => setImageFile(ev.target.files[0]));
  $("#reference-input").addEventListener("change", (ev) => {
    state.reference = ev.target.files[0] || null;
    describeInput();
    if (state.image && $("#auto").checked) runDenoise();
  });
  const drop = $("#drop");
  drop.addEventListener("dragenter", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", () => drop.classList.remove("over"));
  $("#model-select").addEventListener("change", () => {
    renderModelCard();
    if (state.image && $("#auto").checked) runDenoise();
  });
  $("#run").addEventListener("click", runDenoise);
}

async function main() {
  bindInputs();
  bindViewer();
  $("#compare").classList.add("empty-state");
  pollHealth();
  setInterval(pollHealth, 15000);
  const results = await Promise.allSettled([loadModels(), loadSamples()]);
  for (const r of results) if (r.status === "rejected") toast(String(r.reason.message || r.reason));
  document.body.dataset.ready = "true"; // for tests and scripts: models and samples are listed
}

main();

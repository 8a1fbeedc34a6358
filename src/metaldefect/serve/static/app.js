// metaldefect inspection page: upload images to POST /v1/detect, draw the boxes, filter them live.
// Plain browser JavaScript, no build step, no external assets.
"use strict";

// Detections are requested down to this score, so the slider can show weaker ones without a new request.
const REQUEST_CONF = 0.05;
const MAX_RETRIES = 3; // on 503 (server busy), retried after its Retry-After
// Vivid colours that stand out on grey steel; class i gets PALETTE[i % length].
const PALETTE = ["#ff3b30", "#ff9500", "#ffd60a", "#34c759", "#00c7be", "#0a84ff",
                 "#bf5af2", "#ff2d55", "#a2845e", "#64d2ff"];

const state = { classes: [], threshold: 0.3, results: [] };
const el = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

function colourOf(label) {
  let index = state.classes.indexOf(label);
  if (index < 0) { // a label outside the model's list: a stable colour from its name
    index = [...label].reduce((sum, ch) => sum + ch.charCodeAt(0), 0);
  }
  return PALETTE[index % PALETTE.length];
}

function textColourOn(hex) {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#111" : "#fff";
}

function formatBytes(bytes) {
  return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(bytes % 1e6 ? 1 : 0)} MB` : `${Math.round(bytes / 1e3)} kB`;
}

async function loadModel() {
  try {
    const [model, health] = await Promise.all(["/v1/model", "/v1/health"].map(async (url) => {
      const response = await fetch(url);
      if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
      return response.json();
    }));
    state.classes = model.classes;
    setThreshold(model.score_threshold);
    const weights = model.backbone_weights && model.backbone_weights.source;
    el("model-info").innerHTML = "";
    el("model-info").append(
      chip("Model", model.name), chip("Backbone", model.backbone || "n/a"),
      ...(weights ? [chip("Weights", weights)] : []), chip("Classes", String(model.classes.length)),
      ...(model.box_refiner ? [chip("Box refiner", "on")] : []));
    el("drop-hint").textContent = `JPEG, PNG, BMP or TIFF · up to ${formatBytes(health.max_upload_bytes)} each · several at once`;
    renderLegend();
  } catch (error) {
    el("model-info").textContent = `Service not reachable (${error.message})`;
    el("model-info").classList.add("error");
  }
}

function chip(name, value) {
  const span = document.createElement("span");
  span.className = "chip";
  span.innerHTML = `<span class="chip-name"></span><span class="chip-value"></span>`;
  span.firstChild.textContent = name;
  span.lastChild.textContent = value;
  span.title = `${name}: ${value}`;
  return span;
}

function setThreshold(value) {
  const slider = el("conf");
  slider.value = String(Math.max(Number(slider.min), Math.min(1, value)));
  state.threshold = Number(slider.value);
  el("conf-value").textContent = state.threshold.toFixed(2);
}

function visible(result) {
  return result.detections.filter((d) => d.score >= state.threshold - 1e-9);
}

function renderLegend() {
  const counts = {};
  for (const result of state.results) {
    for (const d of result.detections ? visible(result) : []) counts[d.label] = (counts[d.label] || 0) + 1;
  }
  const labels = [...state.classes, ...Object.keys(counts).filter((l) => !state.classes.includes(l))];
  const legend = el("legend");
  legend.innerHTML = "";
  for (const label of labels) {
    const item = document.createElement("span");
    item.className = "legend-item" + (counts[label] ? "" : " legend-zero");
    item.dataset.label = label;
    item.innerHTML = `<span class="swatch"></span><span class="legend-label"></span><span class="legend-count"></span>`;
    item.querySelector(".swatch").style.background = colourOf(label);
    item.querySelector(".legend-label").textContent = label;
    item.querySelector(".legend-count").textContent = counts[label] || 0;
    legend.append(item);
  }
  const done = state.results.filter((r) => r.detections);
  const shown = done.reduce((sum, r) => sum + visible(r).length, 0);
  el("summary").textContent = done.length
    ? `${shown} defect${shown === 1 ? "" : "s"} in ${done.length} image${done.length === 1 ? "" : "s"}` : "";
}

function addFiles(files) {
  const images = [...files];
  if (!images.length) return;
  el("empty-state").hidden = true;
  el("clear").disabled = false;
  const results = images.map((file) => {
    const card = el("result-template").content.firstElementChild.cloneNode(true);
    card.querySelector(".result-name").textContent = file.name;
    card.querySelector(".result-name").title = file.name;
    el("results").append(card);
    const result = { file, card, detections: null, url: URL.createObjectURL(file) };
    state.results.push(result);
    const image = card.querySelector(".stage-image");
    image.alt = file.name;
    image.addEventListener("error", () => showPlaceholder(result));
    image.src = result.url;
    new ResizeObserver(() => drawBoxes(result)).observe(card.querySelector(".stage"));
    return result;
  });
  detectAll(results);
}

let queue = Promise.resolve();
function detectAll(results) {
  // One request at a time from this page: the server runs detections in turn anyway.
  for (const result of results) queue = queue.then(() => detect(result));
}

async function detect(result) {
  const form = new FormData();
  form.append("file", result.file, result.file.name);
  try {
    let response;
    for (let attempt = 0; ; attempt++) {
      response = await fetch(`/v1/detect?conf=${REQUEST_CONF}`, { method: "POST", body: form });
      if (response.status !== 503 || attempt >= MAX_RETRIES) break;
      const wait = Number(response.headers.get("Retry-After") || 1);
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`;
      throw new Error(detail);
    }
    if (!state.results.includes(result)) return; // cleared meanwhile
    Object.assign(result, { detections: body.detections, width: body.width, height: body.height,
                            elapsed: body.elapsed_ms });
    result.card.dataset.state = "done";
    render(result);
    renderLegend();
  } catch (error) {
    result.card.dataset.state = "error";
    const status = result.card.querySelector(".status");
    status.textContent = error.message;
    status.classList.add("error");
  }
}

function showPlaceholder(result) {
  result.card.querySelector(".stage-image").hidden = true;
  result.card.querySelector(".stage-placeholder").hidden = false;
  if (result.width) sizeStage(result);
}

function sizeStage(result) {
  const stage = result.card.querySelector(".stage");
  result.card.style.setProperty("--w", result.width);
  stage.style.aspectRatio = `${result.width} / ${result.height}`;
}

function render(result) {
  if (!result.detections) return;
  sizeStage(result);
  const shown = visible(result);
  const total = result.detections.length;
  result.card.querySelector(".result-meta").textContent =
    `${result.width} × ${result.height} px · ${Math.round(result.elapsed)} ms · ${shown.length} of ${total} shown`;
  const status = result.card.querySelector(".status");
  status.textContent = shown.length ? "" : (total
    ? `No defect scores ${state.threshold.toFixed(2)} or more (${total} below).`
    : "No defects found.");
  status.hidden = shown.length > 0;
  const table = result.card.querySelector(".detections");
  table.hidden = shown.length === 0;
  const tbody = table.querySelector("tbody");
  tbody.innerHTML = "";
  shown.forEach((d, i) => {
    const row = tbody.insertRow();
    row.dataset.index = i;
    row.insertCell().textContent = i + 1;
    const label = row.insertCell();
    label.innerHTML = `<span class="class-name"><span class="swatch"></span><span></span></span>`;
    label.querySelector(".swatch").style.background = colourOf(d.label);
    label.querySelector(".swatch + span").textContent = d.label;
    const score = row.insertCell();
    score.className = "num";
    score.textContent = d.score.toFixed(2);
    const box = row.insertCell();
    box.className = "num mono";
    box.textContent = d.box.map((v) => Math.round(v)).join(", ");
    row.addEventListener("mouseenter", () => highlight(result, i, true));
    row.addEventListener("mouseleave", () => highlight(result, i, false));
  });
  drawBoxes(result);
}

function drawBoxes(result) {
  if (!result.detections) return;
  const svg = result.card.querySelector(".overlay");
  const stage = result.card.querySelector(".stage");
  svg.setAttribute("viewBox", `0 0 ${result.width} ${result.height}`);
  svg.innerHTML = "";
  // Label text in image pixels that shows at ~12 screen pixels whatever the display scale.
  const scale = result.width / Math.max(1, stage.clientWidth);
  const font = 12 * scale;
  visible(result).forEach((d, i) => {
    const [x1, y1, x2, y2] = d.box;
    const colour = colourOf(d.label);
    const group = document.createElementNS(SVG_NS, "g");
    group.dataset.index = i;
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("class", "box");
    Object.entries({ x: x1, y: y1, width: Math.max(0, x2 - x1), height: Math.max(0, y2 - y1) })
      .forEach(([k, v]) => rect.setAttribute(k, v));
    rect.style.stroke = colour;
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const tagHeight = font * 1.45;
    const tagWidth = text.length * font * 0.6 + font * 0.6;
    const tagY = y1 - tagHeight >= 0 ? y1 - tagHeight : y1; // above the box, or inside it at the top edge
    const tagX = Math.min(x1, Math.max(0, result.width - tagWidth));
    const tag = document.createElementNS(SVG_NS, "rect");
    tag.setAttribute("class", "tag");
    Object.entries({ x: tagX, y: tagY, width: tagWidth, height: tagHeight }).forEach(([k, v]) => tag.setAttribute(k, v));
    tag.style.fill = colour;
    const label = document.createElementNS(SVG_NS, "text");
    label.setAttribute("x", tagX + font * 0.3);
    label.setAttribute("y", tagY + font * 1.08);
    label.setAttribute("font-size", font);
    label.style.fill = textColourOn(colour);
    label.textContent = text;
    group.append(rect, tag, label);
    group.addEventListener("mouseenter", () => highlight(result, i, true));
    group.addEventListener("mouseleave", () => highlight(result, i, false));
    svg.append(group);
  });
}

function highlight(result, index, on) {
  result.card.querySelectorAll(`[data-index="${index}"]`).forEach((node) => node.classList.toggle("active", on));
}

function clearAll() {
  for (const result of state.results) URL.revokeObjectURL(result.url);
  state.results = [];
  el("results").innerHTML = "";
  el("empty-state").hidden = false;
  el("clear").disabled = true;
  renderLegend();
}

function setUp() {
  const input = el("file-input");
  const zone = el("dropzone");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  // Dropping anywhere on the page adds the images (and keeps the browser from opening the file).
  let depth = 0;
  document.addEventListener("dragenter", (event) => { event.preventDefault(); depth++; zone.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; zone.classList.remove("dragging"); } });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
  el("conf").addEventListener("input", (event) => {
    setThreshold(Number(event.target.value));
    state.results.forEach(render);
    renderLegend();
  });
  el("clear").addEventListener("click", clearAll);
  loadModel();
}

setUp();

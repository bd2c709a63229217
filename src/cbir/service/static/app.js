// The search page: pick or drop a photo, optionally drag a box on it, see the matches.
// Plain JavaScript, no build step; talks to the JSON API under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  query: null,      // {kind: "upload", blob, name} | {kind: "id", id, name}
  size: null,       // the query's size in pixels {w, h} (EXIF orientation applied)
  box: null,        // {x0, y0, x1, y1} as fractions of the image
  limits: null,
  seq: 0,
  objectUrl: null,
  objects: [],      // the objects the server found in the query: [{box, polygon, identified, results}]
};

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function api(url, options) {
  let res;
  try {
    res = await fetch(url, options);
  } catch (e) {
    throw new Error("the server cannot be reached (" + e.message + ")");
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) {
    throw new Error((body && body.detail) || ("the server answered " + res.status));
  }
  return body;
}

async function loadStats() {
  try {
    const s = await api("/api/stats");
    state.limits = s.limits;
    const type = s.index_type_resolved && s.index_type_resolved !== s.index_type
      ? `${s.index_type} (${s.index_type_resolved})` : s.index_type;
    $("stats").textContent = `${s.count} images · ${s.pipeline} · ${s.dim}-d ${type}`;
  } catch (e) {
    $("stats").textContent = "index statistics unavailable: " + e.message;
  }
}

// -- the query ---------------------------------------------------------------------------
function showQuery(src, caption) {
  state.objects = [];
  drawOutlines();
  $("drop").hidden = true;
  $("query").hidden = false;
  $("query-img").src = src;
  $("query-caption").textContent = caption;
  setBox(null);
}

function useFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image (${file.type}); pick a JPEG, PNG, WebP, GIF, BMP or TIFF file.`, true);
    return;
  }
  if (state.limits && file.size > state.limits.max_upload_bytes) {
    const mb = (n) => (n / 1048576).toFixed(1) + " MiB";
    setStatus(`${file.name} is ${mb(file.size)}, over this server's limit of ${mb(state.limits.max_upload_bytes)}.`, true);
    return;
  }
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = URL.createObjectURL(file);
  state.query = { kind: "upload", blob: file, name: file.name || "photo" };
  state.size = null;
  const img = $("query-img");
  img.onload = () => { state.size = { w: img.naturalWidth, h: img.naturalHeight }; drawOutlines(); };
  img.onerror = () => { state.size = null; };  // the browser cannot show it; the server may still read it
  showQuery(state.objectUrl, state.query.name);
  search();
}

async function useResult(r) {
  state.query = { kind: "id", id: r.id, name: r.name };
  state.size = null;
  $("query-img").onload = null;
  $("query-img").onerror = null;
  showQuery(r.thumbnail_url + "?size=1024", `${r.name} (indexed image ${r.id})`);
  window.scrollTo({ top: 0, behavior: "smooth" });
  search();
  try {
    const info = await api(`/api/images/${r.id}`);
    if (state.query && state.query.kind === "id" && state.query.id === r.id && info.width) {
      state.size = { w: info.width, h: info.height };
    }
  } catch (e) { /* the box is then unavailable for this query */ }
}

// -- the box -----------------------------------------------------------------------------
function setBox(box) {
  state.box = box;
  const el = $("box");
  el.hidden = !box;
  $("clear-box").disabled = !box;
  if (box) {
    el.style.left = box.x0 * 100 + "%";
    el.style.top = box.y0 * 100 + "%";
    el.style.width = (box.x1 - box.x0) * 100 + "%";
    el.style.height = (box.y1 - box.y0) * 100 + "%";
  }
}

function boxPixels() {
  if (!state.box || !state.size) return null;
  const { w, h } = state.size;
  const b = state.box;
  return [b.x0 * w, b.y0 * h, b.x1 * w, b.y1 * h].map((v) => Math.round(v)).join(",");
}

function setupBoxDrawing() {
  const ov = $("overlay");
  let start = null;
  const frac = (ev) => {
    const r = ov.getBoundingClientRect();
    return {
      x: Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)),
      y: Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height)),
    };
  };
  const current = (ev) => {
    const p = frac(ev);
    return { x0: Math.min(start.x, p.x), y0: Math.min(start.y, p.y), x1: Math.max(start.x, p.x), y1: Math.max(start.y, p.y) };
  };
  ov.addEventListener("pointerdown", (ev) => {
    if (!state.size) return;
    start = frac(ev);
    ov.setPointerCapture(ev.pointerId);
    ev.preventDefault();
  });
  ov.addEventListener("pointermove", (ev) => { if (start) setBox(current(ev)); });
  const end = (ev) => {
    if (!start) return;
    const b = current(ev);
    start = null;
    if (b.x1 - b.x0 < 0.03 || b.y1 - b.y0 < 0.03) {  // a click, not a drag
      setBox(null);
      return;
    }
    setBox(b);
    search();
  };
  ov.addEventListener("pointerup", end);
  ov.addEventListener("pointercancel", () => { start = null; });
}

// -- searching ---------------------------------------------------------------------------
async function search() {
  if (!state.query) return;
  const k = $("k").value;
  const seq = ++state.seq;
  const box = boxPixels();
  setStatus("searching…");
  const t0 = performance.now();
  try {
    let body;
    if (state.query.kind === "upload") {
      const form = new FormData();
      form.append("file", state.query.blob, state.query.name);
      form.append("k", k);
      if (box) form.append("bbox", box);
      body = await api("/api/search", { method: "POST", body: form });
    } else {
      const q = new URLSearchParams({ k });
      if (box) q.set("bbox", box);
      body = await api(`/api/images/${state.query.id}/similar?${q}`);
    }
    if (seq !== state.seq) return;  // a newer search has started
    const total = performance.now() - t0;
    const objects = body.objects || [];
    state.objects = box ? [] : objects;
    drawOutlines();
    if (!box && objects.length > 1) renderObjects(objects);
    else render(body.results);
    const what = box ? " for the boxed region"
      : objects.length > 1 ? ` for each of ${objects.length} objects found` : "";
    const verdict = !box && objects.length === 1 && !objects[0].identified ? " · not in the collection" : "";
    setStatus(`${body.results.length} results${what}${verdict} in ${Math.round(total)} ms ` +
              `(server ${Math.round(body.ms)} ms, of which ${Math.round(body.extract_ms)} ms extracting) · ${body.count} images indexed`);
  } catch (e) {
    if (seq !== state.seq) return;
    state.objects = [];
    drawOutlines();
    render([]);
    setStatus(e.message, true);
  }
}

function metaLines(r) {
  const m = r.meta || {};
  const lines = [];
  if (m.title) lines.push(["title", String(m.title)]);
  if (m.artist) lines.push(["meta", String(m.artist)]);
  for (const [key, value] of Object.entries(m)) {
    if (key === "title" || key === "artist" || key === "filename") continue;
    if (value === null || typeof value === "object") continue;
    lines.push(["meta", `${key}: ${value}`]);
  }
  return lines;
}

// -- objects found in the query -----------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";

function corners(o) {
  if (o.polygon) return o.polygon;
  const [x0, y0, x1, y1] = o.box;
  return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
}

function drawOutlines() {
  const svg = $("outlines");
  svg.replaceChildren();
  if (!state.size || state.objects.length < 1 || (state.objects.length === 1 && isWhole(state.objects[0]))) return;
  svg.setAttribute("viewBox", `0 0 ${state.size.w} ${state.size.h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  state.objects.forEach((o, i) => {
    const poly = document.createElementNS(SVG, "polygon");
    poly.setAttribute("points", corners(o).map((p) => p.join(",")).join(" "));
    poly.setAttribute("class", "object" + (o.identified ? "" : " unknown"));
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", corners(o)[0][0] + 6);
    label.setAttribute("y", corners(o)[0][1] + 18);
    label.textContent = String(i + 1);
    svg.append(poly, label);
  });
}

function isWhole(o) {
  return state.size && o.box[0] <= 0 && o.box[1] <= 0 && o.box[2] >= state.size.w && o.box[3] >= state.size.h;
}

function objectTitle(o, i) {
  const h = document.createElement("h2");
  h.append(`Object ${i + 1}: `);
  const v = document.createElement("span");
  v.className = "verdict" + (o.identified ? "" : " unknown");
  const m = o.identified ? o.identified.meta || {} : {};
  v.textContent = o.identified ? (m.title ? `${m.title}${m.artist ? " — " + m.artist : ""}` : o.identified.name)
    : "not in the collection";
  h.append(v);
  return h;
}

function renderObjects(objects) {
  const list = $("results");
  list.replaceChildren();
  list.classList.add("by-object");
  objects.forEach((o, i) => {
    const row = document.createElement("li");
    row.className = "object-row";
    const ol = document.createElement("ol");
    o.results.forEach((r, j) => ol.append(resultItem(r, j)));
    row.append(objectTitle(o, i), ol);
    list.append(row);
  });
}

function render(results) {
  const list = $("results");
  list.replaceChildren();
  list.classList.remove("by-object");
  results.forEach((r, i) => list.append(resultItem(r, i)));
}

function resultItem(r, i) {
  {
    const li = document.createElement("li");
    li.className = "result";
    li.tabIndex = 0;
    li.dataset.id = r.id;
    li.title = "Search with this image";
    const img = document.createElement("img");
    img.src = r.thumbnail_url;
    img.alt = r.meta && r.meta.title ? String(r.meta.title) : r.name;
    img.loading = "lazy";
    const info = document.createElement("div");
    info.className = "info";
    const top = document.createElement("div");
    top.className = "top";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = "#" + (i + 1);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    top.append(rank, score);
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = r.name;
    info.append(top, name);
    for (const [cls, text] of metaLines(r)) {
      const d = document.createElement("div");
      d.className = cls;
      d.textContent = text;
      info.append(d);
    }
    li.append(img, info);
    li.addEventListener("click", () => useResult(r));
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); useResult(r); } });
    return li;
  }
}

// -- wiring ------------------------------------------------------------------------------
function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => { useFile(ev.target.files[0]); ev.target.value = ""; });
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); } });
  // Dropping works anywhere on the page, not only on the drop zone.
  document.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  document.addEventListener("dragleave", (ev) => { if (!ev.relatedTarget) drop.classList.remove("over"); });
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const f = ev.dataTransfer && ev.dataTransfer.files[0];
    if (f) useFile(f);
  });
  $("k").addEventListener("change", search);
  $("clear-box").addEventListener("click", () => { setBox(null); search(); });
  $("new-query").addEventListener("click", () => $("file").click());
  setupBoxDrawing();
  loadStats();
}

setup();

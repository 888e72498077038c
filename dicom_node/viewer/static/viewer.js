// RadVLM web viewer: plain JS, no build step. All data comes from /api/studies with the node's
// bearer token, entered once and kept in sessionStorage (this tab only).
"use strict";

const TOKEN_KEY = "radvlm.token";
const $ = (id) => document.getElementById(id);
let current = null;      // Study Instance UID shown
let imageUrl = null;     // object URL of the PNG

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class AuthError extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, options.headers || {});
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401 || response.status === 503 && (await peekCode(response)) === "api_disabled") {
    throw new AuthError(await errorText(response));
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function peekCode(response) {
  try { return (await response.clone().json()).error.code; } catch (e) { return null; }
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token-input").focus();
}

async function guarded(action) {
  try { return await action(); }
  catch (e) { if (e instanceof AuthError) showLogin(e.message); else throw e; }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- study list (auto-refreshed every 5 s: states change after inference and delivery) -------
let studies = [];
const REFRESH_MS = 5000;

function studyText(s) {
  return [s.state, s.reason, s.patient_name, s.accession_number, s.study_date, s.study_description, s.study_instance_uid]
    .filter(Boolean).join(" ").toLowerCase();
}

function renderStudyList() {
  const list = $("study-list");
  const query = $("study-search").value.trim().toLowerCase();
  list.replaceChildren();
  const shown = studies.filter((s) => !query || studyText(s).includes(query));
  for (const s of shown) {
    const meta = [s.accession_number && "Acc " + s.accession_number, s.study_date, s.study_description]
      .filter(Boolean).join(" · ");
    const item = el("li", { "data-uid": s.study_instance_uid, "data-state": s.state },
      el("span", { class: "state " + s.state, text: s.state }), " ",
      el("span", { class: "hint", text: s.updated || "" }),
      el("div", { class: "patient", text: (s.patient_name || "").replace(/\^/g, " ").trim() }),
      el("div", { class: "meta", text: meta }),
      el("div", { class: "uid", text: s.study_instance_uid }));
    if (s.reason) item.title = s.reason;
    if (s.study_instance_uid === current) item.classList.add("active");
    item.addEventListener("click", () => { location.hash = "study=" + encodeURIComponent(s.study_instance_uid); });
    list.append(item);
  }
  if (!shown.length) list.append(el("li", { class: "hint", text: studies.length ? "no study matches" : "no studies received yet" }));
}

async function loadStudies() {
  const data = await (await api("/api/studies")).json();
  studies = data.studies;
  renderStudyList();
  $("list-status").textContent = "updated " + new Date().toLocaleTimeString() + " · refreshes every 5 s";
}

async function refreshTick() {
  if ($("app").hidden || document.hidden) return;
  try {
    await loadStudies();
    const row = studies.find((s) => s.study_instance_uid === current);
    if (row && shown && (row.state !== shown.state || row.updated !== shown.updated)) await openStudy(current, true);
  } catch (e) {
    if (e instanceof AuthError) return showLogin(e.message);
    $("list-status").textContent = "refresh failed: " + e.message;
  }
}

// ---- colours, boxes and labels --------------------------------------------------------------
const PALETTE = ["#ffd54f", "#4dd0e1", "#f06292", "#81c784", "#ba68c8", "#ff8a65", "#90caf9", "#e6ee9c",
  "#bcaaa4", "#f48fb1", "#80cbc4", "#fff176"];
let colours = new Map();   // finding / sentence → colour, in order of first appearance in the study

function colourFor(name) {
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
  return colours.get(name);
}

function addLegend(name, kind) {
  const legend = $("legend");
  if ([...legend.children].some((li) => li.dataset.name === name)) return;
  legend.append(el("li", { "data-name": name, "data-kind": kind, "data-colour": colourFor(name), style: "--c:" + colourFor(name), title: name },
    el("span", { class: "swatch" }), el("span", { text: name.length > 70 ? name.slice(0, 67) + "…" : name })));
}

function drawBox(box, kind, label, key) {
  const [x1, y1, x2, y2] = box;
  const div = el("div", { class: "box " + kind, "data-key": key, "data-name": label, style: "--c:" + colourFor(label) });
  Object.assign(div.style, { left: x1 * 100 + "%", top: y1 * 100 + "%",
    width: (x2 - x1) * 100 + "%", height: (y2 - y1) * 100 + "%" });
  if (label) div.append(el("span", { text: label, title: label }));
  $("overlay").append(div);
  addLegend(label, kind);
  return div;
}

// labels go above their box's top-left corner; one that would overlap a label already placed is
// pushed down below it (simple vertical stacking), computed in the unzoomed image's pixels.
function layoutLabels() {
  const img = $("study-image");
  const W = parseFloat(img.style.width), H = parseFloat(img.style.height);  // exact, unlike offsetWidth
  if (!W || !H) return;
  const placed = [];
  const spans = [...document.querySelectorAll("#overlay .box:not(.hidden) > span")];
  const items = spans.map((span) => {
    const box = span.parentElement;
    return { span, left: parseFloat(box.style.left) / 100 * W, top: parseFloat(box.style.top) / 100 * H,
      w: span.offsetWidth + 1, h: (span.offsetHeight || 16) + 1 };
  }).sort((a, b) => a.top - b.top || a.left - b.left);
  for (const it of items) {
    let x = Math.min(it.left, Math.max(0, W - it.w));
    let y = it.top - it.h >= 0 ? it.top - it.h : it.top;
    for (let moved = true, n = 0; moved && n < 50; n++) {
      moved = false;
      for (const p of placed) {
        if (x < p.x + p.w && p.x < x + it.w && y < p.y + p.h && p.y < y + it.h) { y = p.y + p.h; moved = true; }
      }
    }
    placed.push({ x, y, w: it.w, h: it.h });
    it.span.style.left = (x - it.left - 2) + "px";
    it.span.style.top = (y - it.top - 2) + "px";
  }
}

function toggleRow(key, text, checked = true, colour = null) {
  const box = el("input", { type: "checkbox", "data-key": key });
  box.checked = checked;
  box.addEventListener("change", () => {
    document.querySelectorAll(`.box[data-key="${key}"]`).forEach((b) => b.classList.toggle("hidden", !box.checked));
    layoutLabels();
  });
  const label = el("label", {}, box, " ");
  if (colour) label.append(el("span", { class: "swatch", style: "--c:" + colour }), " ");
  label.append(text);
  return label;
}

function regionName(r) {
  return r.label || r.text || r.finding || "region";  // phrase boxes are named by their sentence
}

function renderResult(study) {
  const sr = study.sr;
  $("findings-text").textContent = sr.available ? (sr.findings_text || "(no findings text)") : sr.reason;
  const labels = $("labels");
  labels.replaceChildren();
  for (const [name, present] of Object.entries(sr.labels || {})) {
    labels.append(el("span", { class: present ? "present" : "", text: (present ? "✓ " : "") + name }));
  }
  const regions = $("regions");
  regions.replaceChildren();
  (sr.regions || []).forEach((r, i) => {
    const key = "sr-" + i;
    const name = regionName(r);
    drawBox(r.box, "finding", name, key);
    const text = name + (r.text && r.text !== name ? ": " + r.text : "") + " [" + r.box.map((v) => v.toFixed(3)).join(", ") + "]";
    regions.append(el("li", { "data-tracking-uid": r.tracking_uid }, toggleRow(key, text, true, colourFor(name))));
  });
  if (sr.available && !(sr.regions || []).length) regions.append(el("li", { class: "hint", text: "no boxes in the SR" }));
  $("sr-meta").textContent = sr.available
    ? `SR ${sr.sop_instance_uid} · ${sr.series_description} · verification ${sr.verification_flag} · ${sr.algorithm.name} ${sr.algorithm.version}`
    : "";
}

function renderTurn(turn, index) {
  const item = el("li", { class: turn.role }, el("span", { class: "who", text: turn.role === "user" ? "you" : "RadVLM (unverified)" }), turn.text || "(empty answer)");
  (turn.boxes || []).forEach((box, j) => {
    const key = `chat-${index}-${j}`;
    const name = "answer " + (index + 1) / 2;
    drawBox(box, "chat", name, key);
    item.append(el("div", {}, toggleRow(key, "box [" + box.map((v) => v.toFixed(3)).join(", ") + "]", true, colourFor(name))));
  });
  $("chat-log").append(item);
  item.scrollIntoView({ block: "nearest" });
}

async function loadChat(uid) {
  const data = await (await api(`/api/studies/${encodeURIComponent(uid)}/chat`)).json();
  if (uid !== current) return;
  $("chat-log").replaceChildren();
  document.querySelectorAll(".box.chat").forEach((b) => b.remove());
  document.querySelectorAll('#legend li[data-kind="chat"]').forEach((b) => b.remove());
  data.turns.forEach((t, i) => renderTurn(t, i));
  layoutLabels();
}

// ---- image: window/level (rendered server-side from the DICOM), zoom and pan ----------------------
let shown = null;          // the study detail on screen
let wl = null;             // {center, width} asked for; null = the image as the model saw it
let wlPending = null, wlBusy = false;
const view = { zoom: 1, x: 0, y: 0, base: 1 };

function presetValue(p) { return p && p.center != null ? { center: p.center, width: p.width } : null; }

function defaultPreset() {
  const presets = (shown && shown.image && shown.image.presets) || [];
  return presets.find((p) => p.default) || null;
}

function showWindowValues() {
  const w = wl || presetValue(defaultPreset());
  $("wl-values").textContent = w ? `C ${Math.round(w.center)} / W ${Math.round(w.width)}` : "as stored";
}

async function fetchImage(uid, w, preview = false) {
  let query = w ? `?center=${encodeURIComponent(w.center)}&width=${encodeURIComponent(w.width)}` : "";
  if (w && preview) query += "&preview=768";  // decimated while dragging; full resolution on release
  const blob = await (await api(`/api/studies/${encodeURIComponent(uid)}/image.png${query}`)).blob();
  if (uid !== current) return;
  const img = $("study-image");
  const old = imageUrl;
  imageUrl = URL.createObjectURL(blob);
  await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = imageUrl; });
  img.dataset.window = w ? `${w.center},${w.width}` + (preview ? ",preview" : "") : "model";
  if (old) URL.revokeObjectURL(old);
}

// one request in flight at a time; while dragging only the latest window is fetched next
function setWindow(w, preview = false) {
  wl = w;
  showWindowValues();
  wlPending = { uid: current, w, preview };
  if (!wlBusy) pumpWindow();
}

async function pumpWindow() {
  wlBusy = true;
  try {
    while (wlPending) {
      const { uid, w, preview } = wlPending;
      wlPending = null;
      try { await fetchImage(uid, w, preview); } catch (e) {
        if (e instanceof AuthError) return showLogin(e.message);
        $("image-note").textContent = "window not applied: " + e.message;
      }
    }
  } finally { wlBusy = false; }
}

function applyView() {
  $("image-wrap").style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.zoom})`;
}

function fitImage() {
  if (!shown || !shown.image) return;
  const vp = $("viewport");
  const nw = shown.image.columns, nh = shown.image.rows;
  const base = Math.min(vp.clientWidth / nw, vp.clientHeight / nh) || 1;
  const img = $("study-image");
  img.style.width = nw * base + "px";
  img.style.height = nh * base + "px";
  Object.assign(view, { zoom: 1, base, x: (vp.clientWidth - nw * base) / 2, y: (vp.clientHeight - nh * base) / 2 });
  applyView();
  layoutLabels();
}

function zoomAt(factor, mx, my) {
  const zoom = Math.min(12, Math.max(0.5, view.zoom * factor));
  view.x = mx - (mx - view.x) * zoom / view.zoom;
  view.y = my - (my - view.y) * zoom / view.zoom;
  view.zoom = zoom;
  applyView();
}

const OPPOSITE = { L: "R", R: "L", A: "P", P: "A", H: "F", F: "H" };
function opposite(code) { return [...code].map((c) => OPPOSITE[c] || c).join(""); }

function orientationMarkers(image) {
  let marks = { left: "", right: "", top: "", bottom: "" }, note = "";
  if (image && image.orientation && image.orientation.every((v) => v)) {
    const [row, col] = image.orientation;   // direction of the rows (→) and of the columns (↓)
    marks = { left: opposite(row), right: row, top: opposite(col), bottom: col };
    note = "orientation from Patient Orientation";
  } else if (image && ["PA", "AP"].includes(image.view_position)) {
    marks = { left: "R", right: "L", top: "", bottom: "" };
    note = `R/L assumed for a ${image.view_position} chest (no Patient Orientation)`;
  }
  for (const side of ["left", "right", "top", "bottom"]) $("orient-" + side).textContent = image ? marks[side] : "";
  return note;
}

function showImageState(kind, text) {
  const box = $("image-state");
  box.className = kind;
  box.textContent = text;
  box.hidden = !text;
}

function describeState(study) {
  const reason = study.reason ? `: ${study.reason}` : "";
  if (study.state === "skipped") return `Skipped — not sent to the model${reason}`;
  if (study.state === "failed") return `Failed${reason}`;
  return `No image selected yet (state ${study.state}${reason})`;
}

// ---- one study ----------------------------------------------------------------------------
const chatStatus = new Map();   // per study: the status line of its last question

async function openStudy(uid, refreshOnly = false) {
  const switching = uid !== current || !refreshOnly;
  current = uid;
  document.querySelectorAll("#study-list li").forEach((li) => li.classList.toggle("active", li.dataset.uid === uid));
  const study = await (await api(`/api/studies/${encodeURIComponent(uid)}`)).json();
  if (uid !== current) return;
  if (study.image) Object.assign(study.image, study.display || {});
  const hadImage = !!(shown && shown.study_instance_uid === uid && shown.image);
  shown = study;
  $("study").hidden = false;
  const row = studies.find((s) => s.study_instance_uid === uid) || {};
  const meta = [row.accession_number && "Acc " + row.accession_number, row.study_date, row.study_description].filter(Boolean).join(" · ");
  $("study-header").textContent = `Study ${uid}${meta ? " · " + meta : ""} · ${study.state}` + (study.reason ? ` (${study.reason})` : "");
  $("chat-status").textContent = chatStatus.get(uid) || "";
  $("overlay").replaceChildren();
  $("legend").replaceChildren();
  colours = new Map();
  const img = $("study-image");
  const image = study.image;
  $("toolbar").hidden = !image;
  if (!image) {
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = null;
    img.removeAttribute("src");
    $("image-wrap").hidden = true;
    showImageState(study.state === "failed" ? "failed" : "skipped", describeState(study));
    $("image-note").textContent = "";
    orientationMarkers(null);
  } else {
    $("image-wrap").hidden = false;
    showImageState(study.state === "failed" ? "banner" : "", study.state === "failed" ? describeState(study) : "");
    const presets = image.presets || [];
    const select = $("wl-preset");
    const chosen = select.value;   // kept across an auto-refresh of the same study
    select.replaceChildren(...presets.map((p, i) => el("option", { value: String(i), text: p.name + (p.default ? " (default)" : "") })));
    select.append(el("option", { value: "model", text: "As the model saw it" }));
    if (switching || !hadImage) {
      wl = presetValue(defaultPreset());
      select.value = presets.findIndex((p) => p.default) >= 0 ? String(presets.findIndex((p) => p.default)) : "model";
      showWindowValues();
      try {
        await fetchImage(uid, wl);
      } catch (e) {
        if (e instanceof AuthError) throw e;
        $("image-wrap").hidden = true;
        showImageState("failed", "The image cannot be shown: " + e.message);
      }
      if (uid !== current) return;
      fitImage();
    } else {
      select.value = chosen;
    }
    const orient = orientationMarkers(image);
    $("image-note").textContent = `${image.columns} × ${image.rows} (columns × rows)` + (orient ? " · " + orient : "")
      + (image.window_error ? " · window/level unavailable for this image" : "");
  }
  $("chat-form").hidden = !image;
  renderResult(study);
  await loadChat(uid);
}

async function ask(event) {
  event.preventDefault();
  const input = $("chat-input");
  const question = input.value.trim();
  if (!question || !current) return;
  const uid = current;
  $("chat-send").disabled = true;
  const status = (text) => { chatStatus.set(uid, text); if (uid === current) $("chat-status").textContent = text; };
  status("asking the model…");
  const index = $("chat-log").children.length;
  renderTurn({ role: "user", text: question }, index);
  input.value = "";
  try {
    const data = await (await api(`/api/studies/${encodeURIComponent(uid)}/chat`,
      { method: "POST", body: JSON.stringify({ question }) })).json();
    if (uid === current) renderTurn({ role: "assistant", text: data.answer, boxes: data.boxes }, index + 1);
    status(`answered in ${data.seconds}s by ${data.model}`);
    layoutLabels();
  } catch (e) {
    if (e instanceof AuthError) return showLogin(e.message);
    status("error: " + e.message);
  } finally {
    $("chat-send").disabled = false;
  }
}

async function route() {
  const match = /study=([^&]+)/.exec(location.hash);
  if (match) await openStudy(decodeURIComponent(match[1]));
}

async function start() {
  if (!token()) return showLogin();
  $("login").hidden = true;
  $("app").hidden = false;
  await guarded(async () => { await loadStudies(); await route(); });
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  $("token-input").value = "";
  start();
});
$("refresh").addEventListener("click", () => guarded(refreshTick));
$("logout").addEventListener("click", () => showLogin());
$("chat-form").addEventListener("submit", ask);
$("chat-clear").addEventListener("click", () => guarded(async () => {
  if (!current) return;
  const turns = $("chat-log").children.length;
  if (!turns) return;
  if (!window.confirm(`Delete this study's conversation (${turns} messages)? This cannot be undone.`)) return;
  await api(`/api/studies/${encodeURIComponent(current)}/chat`, { method: "DELETE" });
  chatStatus.delete(current);
  $("chat-status").textContent = "conversation cleared";
  await loadChat(current);
}));
$("study-search").addEventListener("input", renderStudyList);
$("wl-preset").addEventListener("change", () => {
  const value = $("wl-preset").value;
  setWindow(value === "model" ? null : presetValue(shown.image.presets[Number(value)]));
  if (value === "model") $("wl-values").textContent = "as the model saw it";
});
$("zoom-in").addEventListener("click", () => { const vp = $("viewport"); zoomAt(1.25, vp.clientWidth / 2, vp.clientHeight / 2); });
$("zoom-out").addEventListener("click", () => { const vp = $("viewport"); zoomAt(1 / 1.25, vp.clientWidth / 2, vp.clientHeight / 2); });
function resetView() {
  if (!shown || !shown.image) return;
  fitImage();
  const presets = shown.image.presets || [];
  const i = presets.findIndex((p) => p.default);
  $("wl-preset").value = i >= 0 ? String(i) : "model";
  setWindow(presetValue(presets[i]));
}
$("view-reset").addEventListener("click", resetView);
$("viewport").addEventListener("dblclick", resetView);
$("viewport").addEventListener("contextmenu", (e) => e.preventDefault());
$("viewport").addEventListener("wheel", (e) => {
  if (!shown || !shown.image) return;
  e.preventDefault();
  const r = $("viewport").getBoundingClientRect();
  zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left, e.clientY - r.top);
}, { passive: false });
// left drag: window (horizontal) and level (vertical); shift+drag, right or middle drag: pan
$("viewport").addEventListener("mousedown", (e) => {
  if (!shown || !shown.image) return;
  e.preventDefault();
  const pan = e.shiftKey || e.button !== 0;
  const start = { x: e.clientX, y: e.clientY, vx: view.x, vy: view.y };
  const presets = shown.image.presets || [];
  const full = presets.find((p) => p.name === "Full range");
  const w0 = wl || presetValue(defaultPreset()) || presetValue(full);
  if (!pan && !w0) return;
  const step = full ? full.width / 400 : 1;   // modality units per screen pixel
  $("viewport").classList.toggle("panning", pan);
  const move = (m) => {
    const dx = m.clientX - start.x, dy = m.clientY - start.y;
    if (pan) { view.x = start.vx + dx; view.y = start.vy + dy; applyView(); return; }
    $("wl-preset").value = "";
    dragged = true;
    setWindow({ center: w0.center + dy * step, width: Math.max(1, w0.width + dx * step) }, true);
  };
  let dragged = false;
  const up = () => { window.removeEventListener("mousemove", move); window.removeEventListener("mouseup", up);
    $("viewport").classList.remove("panning");
    if (dragged && wl) setWindow(wl); };
  window.addEventListener("mousemove", move);
  window.addEventListener("mouseup", up);
});
window.addEventListener("resize", () => { if (shown && shown.image) fitImage(); });
setInterval(refreshTick, REFRESH_MS);
window.addEventListener("hashchange", () => guarded(route));
start();

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

// ---- study list ---------------------------------------------------------------------------
async function loadStudies() {
  const data = await (await api("/api/studies")).json();
  const list = $("study-list");
  list.replaceChildren();
  for (const s of data.studies) {
    const item = el("li", { "data-uid": s.study_instance_uid, "data-state": s.state },
      el("span", { class: "state " + s.state, text: s.state }), " ",
      el("span", { class: "hint", text: s.updated || "" }),
      el("div", { class: "uid", text: s.study_instance_uid }));
    if (s.reason) item.title = s.reason;
    if (s.study_instance_uid === current) item.classList.add("active");
    item.addEventListener("click", () => { location.hash = "study=" + encodeURIComponent(s.study_instance_uid); });
    list.append(item);
  }
  if (!data.studies.length) list.append(el("li", { class: "hint", text: "no studies received yet" }));
}

// ---- one study ----------------------------------------------------------------------------
function drawBox(box, kind, label, key) {
  const [x1, y1, x2, y2] = box;
  const div = el("div", { class: "box " + kind, "data-key": key });
  Object.assign(div.style, { left: x1 * 100 + "%", top: y1 * 100 + "%",
    width: (x2 - x1) * 100 + "%", height: (y2 - y1) * 100 + "%" });
  if (label) div.append(el("span", { text: label }));
  $("overlay").append(div);
  return div;
}

function toggleRow(key, text, checked = true) {
  const box = el("input", { type: "checkbox", "data-key": key });
  box.checked = checked;
  box.addEventListener("change", () => {
    document.querySelectorAll(`.box[data-key="${key}"]`).forEach((b) => b.classList.toggle("hidden", !box.checked));
  });
  return el("label", {}, box, " " + text);
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
    const name = r.label || r.finding || "region";
    drawBox(r.box, "finding", name, key);
    const text = name + (r.text && r.text !== name ? ": " + r.text : "") + " [" + r.box.map((v) => v.toFixed(3)).join(", ") + "]";
    regions.append(el("li", { "data-tracking-uid": r.tracking_uid }, toggleRow(key, text)));
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
    drawBox(box, "chat", "answer " + (index + 1) / 2, key);
    item.append(el("div", {}, toggleRow(key, "box [" + box.map((v) => v.toFixed(3)).join(", ") + "]")));
  });
  $("chat-log").append(item);
  item.scrollIntoView({ block: "nearest" });
}

async function loadChat(uid) {
  const data = await (await api(`/api/studies/${encodeURIComponent(uid)}/chat`)).json();
  $("chat-log").replaceChildren();
  document.querySelectorAll(".box.chat").forEach((b) => b.remove());
  data.turns.forEach((t, i) => renderTurn(t, i));
}

async function openStudy(uid) {
  current = uid;
  document.querySelectorAll("#study-list li").forEach((li) => li.classList.toggle("active", li.dataset.uid === uid));
  const study = await (await api(`/api/studies/${encodeURIComponent(uid)}`)).json();
  $("study").hidden = false;
  $("study-header").textContent = `Study ${uid} · ${study.state}` + (study.reason ? ` (${study.reason})` : "");
  $("overlay").replaceChildren();
  const img = $("study-image");
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = null;
  img.removeAttribute("src");
  if (study.image) {
    const blob = await (await api(`/api/studies/${encodeURIComponent(uid)}/image.png`)).blob();
    imageUrl = URL.createObjectURL(blob);
    img.src = imageUrl;
    $("image-note").textContent = `${study.image.columns} × ${study.image.rows} (columns × rows), windowed as the model saw it`;
  } else {
    $("image-note").textContent = "no frontal image selected for this study";
  }
  $("chat-form").hidden = !study.image;
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
  $("chat-status").textContent = "asking the model…";
  const index = $("chat-log").children.length;
  renderTurn({ role: "user", text: question }, index);
  input.value = "";
  try {
    const data = await (await api(`/api/studies/${encodeURIComponent(uid)}/chat`,
      { method: "POST", body: JSON.stringify({ question }) })).json();
    if (uid === current) renderTurn({ role: "assistant", text: data.answer, boxes: data.boxes }, index + 1);
    $("chat-status").textContent = `answered in ${data.seconds}s by ${data.model}`;
  } catch (e) {
    if (e instanceof AuthError) return showLogin(e.message);
    $("chat-status").textContent = "error: " + e.message;
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
$("refresh").addEventListener("click", () => guarded(loadStudies));
$("logout").addEventListener("click", () => showLogin());
$("chat-form").addEventListener("submit", ask);
$("chat-clear").addEventListener("click", () => guarded(async () => {
  if (!current) return;
  await api(`/api/studies/${encodeURIComponent(current)}/chat`, { method: "DELETE" });
  await loadChat(current);
}));
window.addEventListener("hashchange", () => guarded(route));
start();

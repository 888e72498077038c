// RadVLM operations page: plain JS, no build step. Data from /api/operations with the node's
// bearer token (the viewer's: same sessionStorage key). Patient data is shown, never logged.
"use strict";

const TOKEN_KEY = "radvlm.token";
const STATES = ["received", "selected", "skipped", "inferring", "written", "delivered", "failed"];
const $ = (id) => document.getElementById(id);
let current = null;   // Study Instance UID in the detail pane
let rows = [];        // last list
let timer = null;

class AuthError extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
  if (response.status === 401 || (response.status === 503 && body && body.error && body.error.code === "api_disabled")) {
    throw new AuthError(message);
  }
  if (!response.ok) throw new Error(message);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function stateTag(state) { return el("span", { class: "state " + state }, state); }
function when(iso) { return iso ? iso.replace("T", " ").replace("+00:00", " UTC") : "–"; }
function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token-input").focus();
}

function failed(error, where) {
  if (error instanceof AuthError) return showLogin(error.message);
  $(where).textContent = error.message;
}

// ---- confirmation ---------------------------------------------------------------------------
function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
  });
}

// ---- queue ------------------------------------------------------------------------------------
function renderQueue(status) {
  const q = status.queue, hour = status.throughput.last_hour, five = status.throughput.last_5_minutes;
  const box = $("queue");
  box.replaceChildren(
    "queue: ", el("b", { id: "queue-studies" }, q.studies_waiting), " waiting, ",
    el("b", {}, q.studies_inferring), " inferring, ", el("b", { id: "queue-deliveries" }, q.deliveries_pending + q.deliveries_sending),
    " deliveries pending, ", el("b", {}, q.deliveries_dead), " dead · throughput: ",
    el("b", { id: "throughput-hour" }, hour.studies_written), " studies/h written, ",
    el("b", {}, hour.studies_delivered), " delivered/h (", five.studies_written, " in 5 min)");
}

// ---- list -------------------------------------------------------------------------------------
async function loadList() {
  const state = $("state-filter").value;
  const data = await api("/api/operations/studies?limit=500" + (state ? "&state=" + state : ""));
  rows = data.studies;
  renderQueue(data);
  renderList();
  $("list-status").textContent = "updated " + new Date().toLocaleTimeString();
}

function renderList() {
  const q = $("search").value.trim().toLowerCase();
  const body = $("studies").querySelector("tbody");
  const shown = rows.filter((r) => !q || [r.patient_name, r.patient_id, r.accession_number, r.study_instance_uid]
    .some((v) => v && v.toLowerCase().includes(q)));
  body.replaceChildren(...shown.map((r) => {
    const deliveries = Object.entries(r.deliveries).map(([d, s]) => d + ": " + s).join(", ");
    const rule = r.matched_rule ? r.matched_rule.name : r.selection_rule;
    const tr = el("tr", { "data-uid": r.study_instance_uid, "data-state": r.state },
      el("td", {}, r.patient_name || "–"), el("td", {}, r.patient_id || "–"), el("td", {}, r.accession_number || "–"),
      el("td", {}, r.study_date || "–"), el("td", {}, stateTag(r.state)), el("td", {}, rule || "–"),
      el("td", { class: "hint" }, deliveries || "–"), el("td", { class: "hint" }, when(r.updated)));
    if (r.study_instance_uid === current) tr.classList.add("active");
    tr.addEventListener("click", () => openStudy(r.study_instance_uid));
    return tr;
  }));
  if (!shown.length) body.replaceChildren(el("tr", {}, el("td", { colSpan: 8, class: "hint" }, "no studies")));
}

// ---- detail -----------------------------------------------------------------------------------
async function openStudy(uid) {
  current = uid;
  $("action-status").textContent = "";
  for (const tr of document.querySelectorAll("#studies tbody tr")) tr.classList.toggle("active", tr.dataset.uid === uid);
  await loadDetail();
}

async function loadDetail() {
  if (!current) return;
  const uid = current;
  const s = await api("/api/operations/studies/" + encodeURIComponent(uid));
  if (uid !== current) return;
  $("detail").hidden = false;
  $("detail").dataset.uid = uid;
  $("detail").dataset.state = s.state;
  $("detail-title").replaceChildren((s.patient_name || "unnamed patient") + " · ", stateTag(s.state));
  $("detail-meta").textContent = "Study " + uid;
  const facts = [
    ["Patient ID", s.patient_id], ["Accession", s.accession_number], ["Study date", s.study_date],
    ["Description", s.study_description], ["Sender (AE)", s.calling_ae], ["Instances", s.instances],
    ["Selection rule", s.selection_rule], ["Reason", s.reason], ["Flags", s.flags],
  ];
  if ("matched_rule" in s) {
    const m = s.matched_rule;
    facts.splice(6, 0, ["Matched rule", m ? m.name + " → " + m.action + (m.why && m.why.length ? " (" + m.why.join("; ") + ")" : "") : "none recorded"]);
  }
  $("detail-facts").replaceChildren(...facts.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));

  $("timeline").replaceChildren(...s.timeline.stages.map((st) => el("li",
    { class: st.at ? "reached" : "missing", "data-stage": st.stage },
    el("b", {}, st.stage), when(st.at),
    st.seconds_to_next !== null ? el("div", { class: "took" }, "→ " + seconds(st.seconds_to_next)) : null)));
  const end = s.timeline.ended;
  $("timeline-end").replaceChildren(end ? el("span", {}, stateTag(end.state), " " + when(end.at) + ": " + (end.reason || "")) : "",
    s.timeline.total_seconds !== null ? el("span", { class: "hint" }, "  total " + seconds(s.timeline.total_seconds)) : "");

  $("deliveries").replaceChildren(...(s.deliveries.length ? s.deliveries.map(renderDelivery)
    : [el("p", { class: "hint" }, "no deliveries (results not written yet, or no destinations)")]));
  $("decisions").replaceChildren(...s.decisions.map((d) => el("li", {},
    el("span", { class: "uid" }, d.sop_instance_uid), " ", el("b", {}, d.decision || "undecided"), ": ", d.reason || "")));
  $("rerun").disabled = ["received", "selected", "inferring"].includes(s.state);
}

function renderDelivery(d) {
  const label = d.state === "delivered" ? "Re-send…" : "Retry…";
  const button = el("button", { class: "retry", "data-id": d.id, disabled: d.state === "sending" }, label);
  button.addEventListener("click", () => retryDelivery(d));
  const attempts = el("table", { class: "attempts" }, ...d.attempts.map((a) => el("tr", { "data-outcome": a.outcome },
    el("td", {}, a.outcome === "requeued" ? "retry requested" : "try " + a.try), el("td", {}, when(a.started)),
    el("td", {}, stateTag(a.outcome)), el("td", {}, a.seconds !== null && a.outcome !== "requeued" ? seconds(a.seconds) : ""),
    el("td", { class: "err" }, a.outcome === "requeued" ? "" : a.error || ""))));
  return el("div", { class: "delivery", "data-id": d.id, "data-state": d.state },
    el("header", {}, el("span", { class: "dest" }, d.destination + " (" + d.kind + ")"), stateTag(d.state),
      el("span", { class: "hint" }, d.attempts_total + " attempts"), button),
    d.last_error ? el("div", { class: "error" }, "last error: " + d.last_error) : null, attempts);
}

// ---- actions ----------------------------------------------------------------------------------
async function retryDelivery(d) {
  const verb = d.state === "delivered" ? "Re-send" : "Retry";
  if (!(await confirmAction(verb + " delivery #" + d.id + " to " + d.destination + " now? Earlier attempts stay in the history."))) return;
  try {
    const r = await api("/api/operations/deliveries/" + d.id + "/retry", { method: "POST" });
    $("action-status").textContent = "delivery #" + r.id + " queued again (was " + r.was + ")";
    await refresh();
  } catch (error) { failed(error, "action-status"); }
}

async function rerunStudy() {
  if (!current) return;
  if (!(await confirmAction("Re-run study " + current + "? Selection and inference run again; its results and deliveries are replaced, not duplicated."))) return;
  try {
    const r = await api("/api/operations/studies/" + encodeURIComponent(current) + "/rerun", { method: "POST" });
    $("action-status").textContent = "study queued again (was " + r.was + ")";
    await refresh();
  } catch (error) { failed(error, "action-status"); }
}

async function refresh() {
  try {
    await loadList();
    await loadDetail();
  } catch (error) { failed(error, "list-status"); }
}

function schedule() {
  clearInterval(timer);
  if ($("auto").checked) timer = setInterval(refresh, 5000);
}

function start() {
  if (!token()) return showLogin();
  $("login").hidden = true;
  $("app").hidden = false;
  refresh();
  schedule();
}

for (const s of STATES) $("state-filter").append(el("option", { value: s }, s));
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  $("token-input").value = "";
  start();
});
$("refresh").addEventListener("click", refresh);
$("logout").addEventListener("click", () => { clearInterval(timer); showLogin(); });
$("search").addEventListener("input", renderList);
$("state-filter").addEventListener("change", refresh);
$("auto").addEventListener("change", schedule);
$("rerun").addEventListener("click", rerunStudy);
$("close-detail").addEventListener("click", () => { current = null; $("detail").hidden = true; renderList(); });
start();

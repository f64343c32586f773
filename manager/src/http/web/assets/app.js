// Baton administrator UI: plain JavaScript over /api/v1 with the session cookie.
// Views are chosen by the URL fragment: #/fleet, #/segments, #/groups[/name|/new],
// #/policies[/name|/new], #/jobs[/new|/id], #/audit[/before-id]. Changing requests carry
// X-CSRF-Token. Actions the session's role may not take (see `GET /api/v1/me`; the page
// carries the role) are not shown: a `read` administrator sees no create, edit, delete,
// start or cancel buttons, and only an `admin` sees the fleet's Revoke buttons; the server
// refuses them anyway (403).
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const ROLE = document.querySelector('meta[name="baton-role"]').content;
// Whether the session may publish, push, cancel and change groups and policies.
const CAN_OPERATE = ROLE === "operate" || ROLE === "admin";
// `el` when the session may operate, else nothing.
function ifOperate(el) { return CAN_OPERATE ? el : null; }
// Whether the session may change who belongs to the fleet (enrol, place, revoke agents).
const CAN_ADMIN = ROLE === "admin";
const view = document.getElementById("view");
let cleanup = null; // closes the current view's event stream and timers

// ---------- helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElementNS(
    tag === "svg" || attrs?.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false || k === "svg") continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", v);
    else if (k === "style") el.style.cssText = v; // not an attribute: the CSP allows no inline styles
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
function s(tag, attrs, ...children) { return h(tag, Object.assign({ svg: true }, attrs), ...children); }

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : "HTTP " + status);
    this.status = status;
    this.field = body && body.field;
  }
}

async function api(method, path, body, raw) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = CSRF;
  if (raw !== undefined) {
    opts.body = raw;
    opts.headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, opts);
  if (resp.status === 401) { location.reload(); throw new ApiError(401, { error: "signed out" }); }
  let data = null;
  const text = await resp.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}
async function apiOr(path, fallback) {
  try { return await api("GET", path); } catch (e) { if (e.status === 404) return fallback; throw e; }
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  if (n >= 2 ** 60) return "unlimited";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, v = Number(n);
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 1 : 0)) + " " + u[i];
}
function rate(bps) { return bps ? bytes(bps) + "/s" : "—"; }
function ago(unix) {
  if (!unix) return "never";
  const d = Math.max(0, Date.now() / 1000 - unix);
  if (d < 5) return "just now";
  if (d < 60) return Math.floor(d) + " s ago";
  if (d < 3600) return Math.floor(d / 60) + " min ago";
  if (d < 86400) return Math.floor(d / 3600) + " h ago";
  return Math.floor(d / 86400) + " d ago";
}
function when(unix) { return unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "—"; }
function ms(us) { return us === null || us === undefined ? "—" : (us / 1000).toFixed(us < 10000 ? 1 : 0) + " ms"; }
function pct(a, b) { return b ? Math.round((100 * a) / b) : 0; }

const STATE_CLASS = {
  confirmed: "ok", finished: "ok", connected: "ok",
  fetching: "run", running: "run",
  waiting: "", pending: "", offline: "",
  failed: "bad", refused: "bad", cancelled: "warn",
  installing: "run", installed: "run", rolled_back: "warn",
  held: "", aborted: "warn", paused: "warn", soaking: "run", awaiting_approval: "warn", complete: "ok",
};
// Where a staged rollout stands (the job's `rollout` record), as the API's state names.
function rolloutName(r) {
  if (r.aborted) return "aborted";
  if (r.paused) return "paused";
  if (r.awaiting_approval) return "awaiting_approval";
  if (r.soak_until !== null && r.soak_until !== undefined) return "soaking";
  return r.opened < r.ends.length ? "running" : "complete";
}
// A running job's rollout buttons: pause or resume, approve when a wave waits, abort (a
// job without waves can be paused too).
function rolloutButtons(job, refresh) {
  const r = job.rollout;
  const state = r ? rolloutName(r) : "running";
  const act = (action, question) => async () => {
    if (question && !confirm(question)) return;
    try { await api("POST", "/api/v1/jobs/" + job.id + "/" + action); } catch (e) { alert(e.message); }
    refresh();
  };
  return [
    state === "paused" ? h("button", { class: "btn", id: "rollout-resume", onclick: act("resume") }, "Resume")
      : h("button", { class: "btn", id: "rollout-pause", onclick: act("pause") }, "Pause"),
    state === "awaiting_approval" ? h("button", { class: "btn primary", id: "rollout-approve", onclick: act("approve") }, "Approve wave " + (r.opened + 1)) : null,
    // Without waves, Cancel job does what Abort would.
    r ? h("button", { class: "btn danger", id: "rollout-abort", onclick: act("abort", "Abort job #" + job.id + "? Participants not reached yet are left out.") }, "Abort") : null,
  ];
}
// The waves of a staged rollout and where it stands.
function rolloutCard(job) {
  const r = job.rollout;
  if (!r) return null;
  const state = rolloutName(r);
  const why = r.aborted || r.paused || (state === "soaking" && r.soak_until ? "next wave opens " + when(r.soak_until) : state === "awaiting_approval" ? "wave " + (r.opened + 1) + " waits for approval" : "");
  return h("div", { class: "card", id: "rollout", "data-rollout": state },
    h("div", { class: "card-head" }, h("div", {}, h("h2", {}, "Rollout ", pill(state, state.replace("_", " "))),
      h("span", { class: "muted small", id: "rollout-why" }, why))),
    table([["Wave"], ["State"], ["Participants", "num"], ["Running", "num"], ["Failed", "num"]],
      (job.waves || []).map((w) => h("tr", { class: "wave", "data-wave": w.wave, "data-open": w.open ? "yes" : "no" },
        h("td", {}, "Wave " + w.wave),
        h("td", {}, !w.open ? pill("held", "not open") : w.wave === r.opened ? pill(state, state.replace("_", " ")) : pill("running", "open")),
        h("td", { class: "num" }, w.participants),
        h("td", { class: "num" }, w.running),
        h("td", { class: "num" }, w.failed)))));
}
// A participant's install state past delivery (`—` before it confirmed), with the deciding
// command's exit code and the end of its output on hover.
function installCell(install) {
  if (!install) return h("span", { class: "muted" }, "—");
  const label = install.state === "pending" ? "awaiting install" : install.state.replace("_", " ");
  const title = [install.exit_code !== null && install.exit_code !== undefined ? "exit " + install.exit_code : null,
    install.output || null].filter(Boolean).join("\n");
  return h("span", { class: "install", "data-install": install.state, title },
    pill(install.state, label + (install.exit_code !== null && install.exit_code !== undefined && install.state !== "running" ? " (exit " + install.exit_code + ")" : "")));
}
// `name vN` of each content name running on an agent.
function runningCell(running) {
  if (!running || !running.length) return h("span", { class: "muted" }, "—");
  return h("span", { class: "running-versions" }, running.map((r) => h("span", { class: "chip", "data-running": r.name }, r.name + " v" + r.version)));
}
function pill(state, text) { return h("span", { class: "pill " + (STATE_CLASS[state] || ""), "data-state": state }, text || state); }
function progress(done, total, cls) {
  const p = pct(done, total);
  return h("div", { class: "progress" },
    h("div", { class: "bar " + (cls || "") }, h("span", { style: "width:" + p + "%" })),
    h("span", { class: "pct" }, p + "%"));
}
function pageHead(title, sub, ...actions) {
  return h("div", { class: "page-head" },
    h("div", {}, h("h1", {}, title), sub ? h("p", {}, sub) : null),
    h("div", { class: "toolbar" }, actions));
}
function table(headers, rows, empty) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, headers.map(([t, cls]) => h("th", { class: cls || null }, t)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { class: "empty", colspan: headers.length }, empty || "Nothing here yet.")))));
}
function stat(label, value, cls) {
  return h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value " + (cls || "") }, value));
}
function failure(e) {
  return h("div", { class: "card" }, h("div", { class: "card-body" }, h("p", { class: "form-error" }, e.message)));
}
function labelsOf(report) {
  const out = {};
  for (const l of (report && report.labels) || []) {
    if (Array.isArray(l)) out[l[0]] = l[1];
    else if (l && typeof l === "object") out[l.key ?? l.k ?? Object.keys(l)[0]] = l.value ?? l.v ?? Object.values(l)[0];
  }
  return out;
}
function managerRtt(report) {
  for (const d of (report && report.delays) || []) {
    if (d.to === "Manager" || d.to === null || (d.to && d.to.Manager !== undefined)) return d.rtt_us;
  }
  return null;
}
function parseKv(text, field) {
  const out = {};
  for (const raw of text.split(/\n|,/)) {
    const line = raw.trim();
    if (!line) continue;
    const i = line.indexOf("=");
    if (i <= 0) throw new ApiError(400, { error: "write label=value, one per line", field });
    out[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
  return out;
}
function kvText(obj) { return Object.entries(obj || {}).map(([k, v]) => k + "=" + v).join("\n"); }

// Forms: fields with id "f-<name>", errors shown in "e-<name>" next to the field.
function field(name, label, input, hint, cls) {
  return h("div", { class: "field " + (cls || ""), id: "w-" + name },
    h("label", { for: "f-" + name }, label), input,
    hint ? h("span", { class: "hint" }, hint) : null,
    h("span", { class: "field-error", id: "e-" + name, role: "alert" }));
}
function clearErrors(form) {
  form.querySelectorAll(".field-error").forEach((e) => (e.textContent = ""));
  form.querySelectorAll(".has-error").forEach((e) => e.classList.remove("has-error"));
  const top = form.querySelector(".form-error");
  if (top) top.textContent = "";
}
function showError(form, err) {
  let f = err.field;
  if (f && err.message.startsWith(f + ": ")) err.message = err.message.slice(f.length + 2);
  while (f) {
    const slot = form.querySelector("#e-" + CSS.escape(f));
    if (slot) {
      slot.textContent = err.message;
      slot.parentElement.classList.add("has-error");
      const input = slot.parentElement.querySelector("input,select,textarea");
      if (input) input.focus();
      return;
    }
    f = f.includes(".") ? f.slice(0, f.lastIndexOf(".")) : f.includes("[") ? f.slice(0, f.indexOf("[")) : null;
  }
  form.querySelector(".form-error").textContent = err.message;
}
function numberValue(form, name) {
  const v = form.querySelector("#f-" + name).value.trim();
  if (v === "") return 0;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new ApiError(400, { error: "must be a number, 0 or more", field: name });
  return n;
}

// ---------- router ----------

const routes = [
  [/^#\/fleet$/, fleet, "fleet"],
  [/^#\/segments$/, segments, "segments"],
  [/^#\/groups$/, groups, "groups"],
  [/^#\/groups\/new$/, () => groupForm(null), "groups"],
  [/^#\/groups\/(.+)$/, (m) => groupForm(decodeURIComponent(m[1])), "groups"],
  [/^#\/policies$/, policies, "policies"],
  [/^#\/policies\/new$/, () => policyForm(null), "policies"],
  [/^#\/policies\/(.+)$/, (m) => policyForm(decodeURIComponent(m[1])), "policies"],
  [/^#\/jobs$/, jobs, "jobs"],
  [/^#\/jobs\/new$/, newJob, "jobs"],
  [/^#\/jobs\/(\d+)$/, (m) => jobPage(Number(m[1])), "jobs"],
  [/^#\/audit$/, () => audit(null), "audit"],
  [/^#\/audit\/(\d+)$/, (m) => audit(Number(m[1])), "audit"],
];

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const hash = location.hash || "#/fleet";
  for (const [re, fn, nav] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
    try {
      const node = await fn(m);
      if (node) view.replaceChildren(node);
    } catch (e) {
      view.replaceChildren(failure(e));
    }
    return;
  }
  location.hash = "#/fleet";
}
window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", route);

// ---------- fleet ----------

async function fleet() {
  const [agents, segs, jobList] = await Promise.all([
    api("GET", "/api/v1/agents"), apiOr("/api/v1/segments", []), api("GET", "/api/v1/jobs")]);
  const leaders = new Set(segs.map((s) => s.leader));
  const segNames = [...new Set(agents.map((a) => a.segment).filter(Boolean))].sort();
  const search = h("input", { type: "search", placeholder: "Filter by id, site or label…", "aria-label": "Filter", id: "fleet-filter" });
  const segSel = h("select", { "aria-label": "Segment", id: "fleet-segment" },
    h("option", { value: "" }, "All segments"), segNames.map((n) => h("option", { value: n }, n)));
  const stateSel = h("select", { "aria-label": "Status", id: "fleet-status" },
    h("option", { value: "" }, "Any status"), h("option", { value: "connected" }, "Connected"), h("option", { value: "offline" }, "Offline"));
  const leaderOnly = h("input", { type: "checkbox", id: "fleet-leaders" });
  const body = h("tbody");
  const rows = agents.map((a) => {
    const r = a.report || {};
    const link = r.link || {};
    const labels = labelsOf(r);
    const isLeader = leaders.has(a.id);
    const tr = h("tr", { "data-agent": a.id },
      h("td", {}, h("strong", {}, a.id), isLeader ? h("span", { class: "badge leader", title: "Segment leader" }, "leader") : null,
        h("div", {}, Object.entries(labels).map(([k, v]) => h("span", { class: "chip" }, k + "=" + v)))),
      h("td", {}, a.connected ? pill("connected") : pill("offline")),
      h("td", { class: "opt" }, a.site || "—"),
      h("td", {}, a.segment || "—"),
      h("td", { class: "num opt" }, a.performance ?? "—"),
      h("td", { class: "num opt" }, bytes(a.free_storage)),
      h("td", { class: "num" }, h("span", { title: "upload" }, "↑ " + rate(a.up_bps)), " ", h("span", { class: "muted", title: "download" }, "↓ " + rate(a.down_bps))),
      h("td", { class: "num opt" }, link.loss_ppm !== undefined ? (link.loss_ppm / 10000).toFixed(2) + " %" : "—"),
      h("td", { class: "num opt" }, ms(managerRtt(r))),
      h("td", { title: when(a.last_seen) }, a.connected ? "now" : ago(a.last_seen)),
      h("td", { class: "wrap" }, runningCell(a.running)),
      CAN_ADMIN ? h("td", { class: "num" }, h("button", { type: "button", class: "btn danger small", "data-revoke": a.id, onclick: async (ev) => {
        if (!confirm("Revoke agent " + a.id + "? Its session ends now, the manager refuses it and its peers get the revocation list within seconds. Enrolling it again starts it afresh.")) return;
        ev.target.disabled = true;
        try {
          await api("POST", "/api/v1/agents/" + encodeURIComponent(a.id) + "/revoke", {});
          route();
        } catch (e) {
          ev.target.disabled = false;
          alert("Revoking " + a.id + " failed: " + e.message);
        }
      } }, "Revoke")) : null);
    tr._match = { text: (a.id + " " + (a.site || "") + " " + Object.entries(labels).map(([k, v]) => k + "=" + v).join(" ")).toLowerCase(),
      seg: a.segment || "", state: a.connected ? "connected" : "offline", leader: isLeader };
    return tr;
  });
  const count = h("span", { class: "muted small" });
  function apply() {
    const q = search.value.trim().toLowerCase();
    let shown = 0;
    body.replaceChildren();
    for (const tr of rows) {
      const m = tr._match;
      if ((q && !m.text.includes(q)) || (segSel.value && m.seg !== segSel.value) ||
          (stateSel.value && m.state !== stateSel.value) || (leaderOnly.checked && !m.leader)) continue;
      body.append(tr);
      shown++;
    }
    if (!shown) body.append(h("tr", {}, h("td", { class: "empty", colspan: CAN_ADMIN ? 12 : 11 }, agents.length ? "No agent matches the filters." : "No agent is enrolled yet. Enrol one with baton enroll.")));
    count.textContent = shown + " of " + agents.length + " agents";
  }
  [search, segSel, stateSel, leaderOnly].forEach((el) => el.addEventListener("input", apply));
  apply();
  const connected = agents.filter((a) => a.connected).length;
  const running = jobList.filter((j) => j.state === "running" || j.state === "pending").length;
  return h("div", {},
    pageHead("Fleet", "Enrolled agents and what they last reported."),
    h("div", { class: "stats" },
      stat("Agents", agents.length), stat("Connected", connected, connected ? "ok" : ""),
      stat("Segments", segs.length || segNames.length), stat("Active jobs", running)),
    h("div", { class: "card" },
      h("div", { class: "card-head" },
        h("div", { class: "toolbar" }, search, segSel, stateSel, h("label", { class: "small" }, leaderOnly, " Leaders only")), count),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Agent", "Status", ["Site", "opt"], "Segment", ["Perf.", "num opt"], ["Free storage", "num opt"], ["Link", "num"], ["Loss", "num opt"], ["RTT", "num opt"], "Last seen", "Running", ...(CAN_ADMIN ? [["", "num"]] : [])]
          .map((x) => Array.isArray(x) ? h("th", { class: x[1] }, x[0]) : h("th", {}, x)))),
        body))));
}

// ---------- segments ----------

async function segments() {
  const segs = await api("GET", "/api/v1/segments");
  const cards = segs.map((seg) => {
    seg.members.sort((a, b) => (b.id === seg.leader) - (a.id === seg.leader) || b.score - a.score);
    const ids = seg.members.map((m) => m.id);
    const rtt = (m, to) => {
      const d = (m.delays || []).find((x) => x.to === to);
      return d ? ms(d.rtt_us) : "—";
    };
    return h("div", { class: "card", "data-segment": seg.name },
      h("div", { class: "card-head" },
        h("div", {}, h("h2", {}, seg.name), h("span", { class: "muted small" }, seg.members.length + " members · leader ", h("strong", {}, seg.leader), " · term " + seg.term)),
        h("span", { class: "muted small" }, "reported " + ago(seg.reported_at_ms / 1000))),
      table([["Member"], ["Score", "num"], ["Perf.", "num opt"], ["Free storage", "num opt"], ["Link", "num"], ["Loss", "num opt"], ["RTT manager", "num"], ["Heard", "opt"]],
        seg.members.map((m) => h("tr", { "data-agent": m.id },
          h("td", {}, h("strong", {}, m.id), m.id === seg.leader ? h("span", { class: "badge leader" }, "leader") : null,
            m.can_serve ? null : h("span", { class: "badge" }, "leaf"), m.known === false ? h("span", { class: "badge", title: "not enrolled at this manager" }, "unknown") : null),
          h("td", { class: "num" }, m.score),
          h("td", { class: "num opt" }, m.performance),
          h("td", { class: "num opt" }, bytes(m.free_storage)),
          h("td", { class: "num" }, "↑ " + rate(m.link && m.link.up_bps) + "  ↓ " + rate(m.link && m.link.down_bps)),
          h("td", { class: "num opt" }, m.link ? (m.link.loss_ppm / 10000).toFixed(2) + " %" : "—"),
          h("td", { class: "num" }, rtt(m, null)),
          h("td", { class: "opt", title: "when the leader last heard from it, before its report" },
            m.last_heard_ms === undefined ? "—" : (m.last_heard_ms / 1000).toFixed(1) + " s before")))),
      ids.length > 1 ? h("div", { class: "card-body matrix" },
        h("h3", {}, "Round-trip times between members"),
        table([[""], ...ids.map((i) => [i, "num"])],
          seg.members.map((m) => h("tr", {}, h("th", {}, m.id), ids.map((to) => h("td", { class: "num" }, to === m.id ? "·" : rtt(m, to))))))) : null);
  });
  return h("div", {},
    pageHead("Segments", "LANs the agents discovered, their elected leaders, members and measured delays."),
    cards.length ? cards : h("div", { class: "card" }, h("div", { class: "empty" }, "No segment report yet. Leaders report once agents on a LAN have found each other.")));
}

// ---------- groups ----------

async function groups() {
  const list = await api("GET", "/api/v1/groups");
  return h("div", {},
    pageHead("Content groups", "Sets of agents that receive the same content: listed by id or matched by labels.",
      ifOperate(h("a", { class: "btn primary", href: "#/groups/new", id: "new-group" }, "New group"))),
    h("div", { class: "card" }, table([["Name"], ["Agents listed"], ["Selector", "opt"], ["Members now", "num"], [""]],
      list.map((g) => h("tr", { "data-group": g.name },
        h("td", {}, h("a", { href: "#/groups/" + encodeURIComponent(g.name) }, h("strong", {}, g.name))),
        h("td", { class: "wrap" }, g.agents.length ? g.agents.join(", ") : h("span", { class: "muted" }, "—")),
        h("td", { class: "opt" }, Object.entries(g.selector || {}).map(([k, v]) => h("span", { class: "chip" }, k + "=" + v))),
        h("td", { class: "num" }, (g.members || []).length),
        h("td", { class: "num" }, h("a", { class: "btn small", href: "#/groups/" + encodeURIComponent(g.name) }, CAN_OPERATE ? "Edit" : "View")))),
      "No content group yet.")));
}

async function groupForm(name) {
  const [group, agents] = await Promise.all([
    name ? api("GET", "/api/v1/groups/" + encodeURIComponent(name)) : null, api("GET", "/api/v1/agents")]);
  const listed = new Set(group ? group.agents : []);
  const form = h("form", { class: "card-body", novalidate: true, id: "group-form" },
    h("p", { class: "form-error", role: "alert" }),
    h("div", { class: "form" },
      field("name", "Name", h("input", { type: "text", id: "f-name", value: group ? group.name : "", disabled: !!group, required: true }), "Letters, digits, '.', '_' and '-'."),
      field("selector", "Label selector", h("textarea", { id: "f-selector", placeholder: "site=plant-3\nrole=edge" }, kvText(group && group.selector)),
        "An agent carrying every label=value listed here is a member. One per line."),
      field("agents", "Agents", h("div", { class: "checklist", id: "f-agents" },
        agents.length ? agents.map((a) => h("label", {}, h("input", { type: "checkbox", value: a.id, checked: listed.has(a.id) }), a.id)) : h("span", { class: "muted" }, "No agent enrolled.")),
        "Listed agents are members whatever their labels.", "full")),
    editActions("group", "groups", group, () => form));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form);
    try {
      const body = {
        name: form.querySelector("#f-name").value.trim(),
        agents: [...form.querySelectorAll("#f-agents input:checked")].map((i) => i.value),
        selector: parseKv(form.querySelector("#f-selector").value, "selector"),
      };
      await saveNamed("groups", group, body);
    } catch (e) { showError(form, e); }
  });
  return h("div", {},
    pageHead(group ? "Group " + group.name : "New content group",
      group ? "Members now: " + ((group.members || []).join(", ") || "none") : "Who receives content sent to this group."),
    h("div", { class: "card" }, form));
}

// Save / Cancel / Delete buttons of the form editing `record` (null = a new one), a named
// `kind` of record kept at /api/v1/`collection`; `formOf()` is the form, for errors.
function editActions(kind, collection, record, formOf) {
  if (!CAN_OPERATE) return h("div", { class: "form-actions" }, h("a", { class: "btn", href: "#/" + collection }, "Back"));
  return h("div", { class: "form-actions" },
    h("button", { type: "submit", class: "btn primary", id: "save-" + kind }, record ? "Save changes" : "Create " + kind),
    h("a", { class: "btn", href: "#/" + collection }, "Cancel"),
    record ? h("button", { type: "button", class: "btn danger", id: "delete-" + kind, onclick: async () => {
      if (!confirm("Delete " + kind + " " + record.name + "?")) return;
      try { await api("DELETE", "/api/v1/" + collection + "/" + encodeURIComponent(record.name)); location.hash = "#/" + collection; }
      catch (e) { showError(formOf(), e); }
    } }, "Delete") : null);
}

// Stores `body` as `record` (PUT) or as a new record (POST) of /api/v1/`collection`, then
// goes back to its list.
async function saveNamed(collection, record, body) {
  if (record) await api("PUT", "/api/v1/" + collection + "/" + encodeURIComponent(record.name), body);
  else await api("POST", "/api/v1/" + collection, body);
  location.hash = "#/" + collection;
}

// ---------- policies ----------

const POLICY_NUMBERS = [
  ["max_peers_per_source", "Peers per source", "Most peers one agent serves in a job; 0 = the agent's own limit."],
  ["max_stripes", "Stripes", "Most stripes the content is cut into, relayed separately."],
  ["manager_max_copies", "Manager copies", "Copies the manager sends by plan (at least 1)."],
  ["leaf_below_up_bps", "Leaf below upload (B/s)", "Agents with less upload only receive; 0 = off."],
  ["agent_rate_cap_bps", "Per-agent rate cap (B/s)", "0 = none."],
  ["segment_rate_cap_bps", "Per-segment WAN cap (B/s)", "Split over a segment's fetchers from outside; 0 = none."],
  ["max_wan_transfers_per_segment", "WAN transfers per segment", "Entry nodes per segment at once; 0 = no limit."],
  ["max_retries", "Retries", "Times a failed participant is instructed again; 0 = never."],
  ["retry_after_secs", "Retry after (s)", "Seconds between a failure and its retry."],
];
const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
// `mon-fri 09:00-17:00 Europe/Berlin`; every day is left out.
function windowText(w) {
  const days = (w.days || DAYS).slice().sort((a, b) => DAYS.indexOf(a) - DAYS.indexOf(b));
  const prefix = days.length === 7 ? "" : days.join(",") + " ";
  return prefix + minutesText(w.start_minute) + "-" + minutesText(w.end_minute) + " " + (w.zone || "UTC");
}
function policyWindows(p) {
  const list = p.windows || (p.window ? [p.window] : []);
  return list.length ? list.map(windowText).join(", ") : "any time";
}
// One window per line, `[DAYS ]HH:MM-HH:MM[ ZONE]` (the server checks the zone).
function parseWindows(text) {
  return text.split("\n").map((l) => l.trim()).filter(Boolean).map((line) => {
    const m = /^(?:([a-z,-]+)\s+)?(\d{1,2}:\d{2})-(\d{1,2}:\d{2})(?:\s+(\S+))?$/i.exec(line);
    if (!m) throw new ApiError(400, { error: JSON.stringify(line) + " is not [DAYS ]HH:MM-HH:MM[ ZONE]", field: "windows" });
    let days = DAYS;
    if (m[1]) {
      days = [];
      for (const part of m[1].toLowerCase().split(",").filter(Boolean)) {
        const [a, b] = part.split("-").map((d) => DAYS.indexOf(d.slice(0, 3)));
        if (a < 0 || (b !== undefined && b < 0)) throw new ApiError(400, { error: JSON.stringify(part) + " is not a day (mon..sun)", field: "windows" });
        for (let i = a; ; i = (i + 1) % 7) { days.push(DAYS[i]); if (b === undefined || i === b) break; }
      }
    }
    return { start_minute: textMinutes(m[2], "windows"), end_minute: textMinutes(m[3], "windows"), days: DAYS.filter((d) => days.includes(d)), zone: m[4] || "UTC" };
  });
}
function minutesText(m) { return m === undefined || m === null ? "" : String(Math.floor(m / 60)).padStart(2, "0") + ":" + String(m % 60).padStart(2, "0"); }
function textMinutes(t, field) {
  const m = /^(\d{1,2}):(\d{2})$/.exec(t.trim());
  if (!m || Number(m[1]) > 23 || Number(m[2]) > 59) throw new ApiError(400, { error: "write the time as HH:MM", field });
  return Number(m[1]) * 60 + Number(m[2]);
}

async function policies() {
  const list = await api("GET", "/api/v1/policies");
  return h("div", {},
    pageHead("Policies", "Rules a job runs under: relaying, fan-out, rate caps and time windows.",
      ifOperate(h("a", { class: "btn primary", href: "#/policies/new", id: "new-policy" }, "New policy"))),
    h("div", { class: "card" }, table([["Name"], ["Relay"], ["Segment-local", "opt"], ["Peers/source", "num opt"], ["Agent cap", "num"], ["Segment cap", "num opt"], ["Windows"], [""]],
      list.map((p) => h("tr", { "data-policy": p.name },
        h("td", {}, h("a", { href: "#/policies/" + encodeURIComponent(p.name) }, h("strong", {}, p.name))),
        h("td", {}, p.relay ? pill("ok", "relay") : pill("warn", "manager only")),
        h("td", { class: "opt" }, p.segment_local ? "yes" : "no"),
        h("td", { class: "num opt" }, p.max_peers_per_source),
        h("td", { class: "num" }, rate(p.agent_rate_cap_bps)),
        h("td", { class: "num opt" }, rate(p.segment_rate_cap_bps)),
        h("td", {}, policyWindows(p)),
        h("td", { class: "num" }, h("a", { class: "btn small", href: "#/policies/" + encodeURIComponent(p.name) }, CAN_OPERATE ? "Edit" : "View")))),
      "No policy yet. Jobs without one use the planner's defaults.")));
}

async function policyForm(name) {
  const p = name ? await api("GET", "/api/v1/policies/" + encodeURIComponent(name)) : null;
  const d = p || { relay: true, segment_local: true, max_peers_per_source: 32, max_stripes: 8, manager_max_copies: 1,
    leaf_below_up_bps: 0, agent_rate_cap_bps: 0, segment_rate_cap_bps: 0, max_wan_transfers_per_segment: 0, leaf_only: [], leaf_only_labels: {},
    max_retries: 0, retry_after_secs: 30, windows: [] };
  const form = h("form", { class: "card-body", novalidate: true, id: "policy-form" },
    h("p", { class: "form-error", role: "alert" }),
    h("div", { class: "form" },
      field("name", "Name", h("input", { type: "text", id: "f-name", value: p ? p.name : "", disabled: !!p }), "Letters, digits, '.', '_' and '-'."),
      h("div", { class: "field" },
        h("label", { class: "field check" }, h("input", { type: "checkbox", id: "f-relay", checked: d.relay }), "Agents relay to each other"),
        h("label", { class: "field check" }, h("input", { type: "checkbox", id: "f-segment_local", checked: d.segment_local }), "Prefer sources on the same segment"),
        h("span", { class: "field-error", id: "e-relay" }), h("span", { class: "field-error", id: "e-segment_local" })),
      POLICY_NUMBERS.map(([k, label, hint]) => field(k, label, h("input", { type: "text", inputmode: "numeric", id: "f-" + k, value: d[k] ?? 0 }), hint)),
      field("windows", "Time windows", h("textarea", { id: "f-windows", placeholder: "22:00-06:00\nsat,sun 08:00-20:00 Europe/Berlin" },
        (d.windows || (d.window ? [d.window] : [])).map(windowText).join("\n")),
        "One per line: [days] HH:MM-HH:MM [time zone, default UTC]; may wrap midnight. Empty = any time. A running job stops at a close and resumes at the next opening."),
      field("leaf_only", "Leaf-only agents", h("input", { type: "text", id: "f-leaf_only", value: (d.leaf_only || []).join(", ") }), "Agent ids that only receive, comma separated."),
      field("leaf_only_labels", "Leaf-only labels", h("textarea", { id: "f-leaf_only_labels", placeholder: "class=sensor" }, kvText(d.leaf_only_labels)), "Agents with all these labels only receive.")),
    editActions("policy", "policies", p, () => form));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form);
    try {
      const body = Object.assign({}, p || {});
      body.name = form.querySelector("#f-name").value.trim();
      body.relay = form.querySelector("#f-relay").checked;
      body.segment_local = form.querySelector("#f-segment_local").checked;
      for (const [k] of POLICY_NUMBERS) body[k] = numberValue(form, k);
      delete body.window;
      body.windows = parseWindows(form.querySelector("#f-windows").value);
      body.leaf_only = form.querySelector("#f-leaf_only").value.split(",").map((x) => x.trim()).filter(Boolean);
      body.leaf_only_labels = parseKv(form.querySelector("#f-leaf_only_labels").value, "leaf_only_labels");
      await saveNamed("policies", p, body);
    } catch (e) { showError(form, e); }
  });
  return h("div", {}, pageHead(p ? "Policy " + p.name : "New policy", "Fields left at their defaults keep the planner's behaviour."), h("div", { class: "card" }, form));
}

// ---------- jobs ----------

async function jobs() {
  const list = await api("GET", "/api/v1/jobs");
  return h("div", {},
    pageHead("Jobs", "Content distributions, newest first.", ifOperate(h("a", { class: "btn primary", href: "#/jobs/new", id: "new-job" }, "New job"))),
    h("div", { class: "card" }, table([["Job"], ["Content"], ["State"], ["Confirmed"], ["Group", "opt"], ["Policy", "opt"], ["Warnings", "opt"], ["Created", "opt"]],
      list.map((j) => h("tr", { "data-job": j.id },
        h("td", {}, h("a", { href: "#/jobs/" + j.id }, h("strong", {}, "#" + j.id))),
        h("td", {}, j.name, h("span", { class: "muted" }, " v" + j.version + " · " + bytes(j.length))),
        h("td", {}, pill(j.state), j.rollout && j.state === "running" && j.rollout !== "running" ? [" ", pill(j.rollout, "rollout " + j.rollout.replace("_", " "))] : null),
        h("td", {}, h("div", { class: "progress" },
          h("div", { class: "bar " + (j.failed ? "bad" : j.confirmed === j.participants && j.participants ? "ok" : "") },
            h("span", { style: "width:" + pct(j.confirmed, j.participants) + "%" })),
          h("span", { class: "small muted" }, j.confirmed + "/" + j.participants))),
        h("td", { class: "opt" }, j.group || "—"),
        h("td", { class: "opt" }, j.policy || "—"),
        h("td", { class: "opt", "data-warnings": j.warnings || 0 }, j.warnings ? h("a", { href: "#/jobs/" + j.id, class: "pill warn", title: "Warnings: policy rules this job cannot meet, demoted trouble reporters" }, String(j.warnings)) : h("span", { class: "muted" }, "0")),
        h("td", { class: "opt", title: when(j.created_at) }, ago(j.created_at)))),
      "No job yet.")));
}

// ---------- audit log ----------

const AUDIT_PAGE = 50;
function auditWho(e) {
  if (e.via === "admin-token") return "admin token";
  return e.who ? e.via + " " + e.who : e.via;
}
async function audit(before) {
  const page = await api("GET", "/api/v1/audit?limit=" + AUDIT_PAGE + (before ? "&before=" + before : ""));
  const older = page.next ? h("a", { class: "btn", href: "#/audit/" + page.next, id: "audit-older" }, "Older") : null;
  const newest = before ? h("a", { class: "btn", href: "#/audit" }, "Newest") : null;
  return h("div", {},
    pageHead("Audit log", "Changes made through the manager and logins: who, from where, what, when and the result. Newest first.", newest, older),
    h("div", { class: "card" }, table([["When"], ["Who"], ["Address", "opt"], ["Action"], ["Target"], ["Result"]],
      page.entries.map((e) => h("tr", { "data-audit": e.id },
        h("td", { title: when(e.at) }, ago(e.at)),
        h("td", {}, auditWho(e)),
        h("td", { class: "opt" }, e.address),
        h("td", {}, h("code", {}, e.action)),
        h("td", {}, e.target || "—"),
        h("td", {}, e.result === "ok" ? pill("confirmed", "ok") : pill("refused", "refused " + (e.status || "")),
          e.error ? h("span", { class: "small muted" }, " " + e.error) : null))),
      "Nothing recorded yet.")));
}

async function newJob() {
  if (!CAN_OPERATE) return h("div", {}, pageHead("New job", "Starting jobs needs the operate role; this session has " + ROLE + "."));
  const [groupList, policyList, agents] = await Promise.all([
    api("GET", "/api/v1/groups"), api("GET", "/api/v1/policies"), api("GET", "/api/v1/agents")]);
  const targetSel = h("select", { id: "f-target" },
    groupList.map((g) => h("option", { value: "group:" + g.name }, "Group " + g.name + " (" + (g.members || []).length + ")")),
    h("option", { value: "all" }, "Every agent (and those that connect while it runs)"),
    h("option", { value: "agents" }, "Chosen agents"));
  const agentList = h("div", { class: "checklist", id: "f-agents", hidden: true },
    agents.map((a) => h("label", {}, h("input", { type: "checkbox", value: a.id }), a.id)));
  targetSel.addEventListener("input", () => (agentList.hidden = targetSel.value !== "agents"));
  const form = h("form", { class: "card-body", novalidate: true, id: "job-form" },
    h("p", { class: "form-error", role: "alert" }),
    h("div", { class: "form" },
      field("file", "Upload content", h("input", { type: "file", id: "f-file" }), "Or name a file the manager holds below."),
      field("path", "File on the manager", h("input", { type: "text", id: "f-path", placeholder: "/srv/firmware/fw-2.4.bin" }), "Absolute path, in a directory the manager publishes from (baton serve --content-dir)."),
      field("content_name", "Content name", h("input", { type: "text", id: "f-content_name", placeholder: "default: the file name" })),
      field("policy", "Policy", h("select", { id: "f-policy" }, h("option", { value: "" }, "Planner defaults"),
        policyList.map((p) => h("option", { value: p.name }, p.name)))),
      field("targets", "Send to", h("div", {}, targetSel, agentList), null, "full"),
      field("waves", "Waves", h("input", { type: "text", id: "f-waves", placeholder: "10, 50, 100" }),
        "Staged rollout: cumulative percentages of the participants; the next wave opens once the current one runs the content. Empty = everyone at once."),
      field("pause_after_failures", "Pause after failures", h("input", { type: "text", inputmode: "numeric", id: "f-pause_after_failures", placeholder: "none" }),
        "Pause the rollout when more than this many participants of a wave fail."),
      h("div", { class: "field" },
        h("label", { class: "field check" }, h("input", { type: "checkbox", id: "f-approval" }), "Each next wave waits for approval"),
        h("span", { class: "field-error", id: "e-approval" }))),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn primary", id: "start-job" }, "Start job"),
      h("a", { class: "btn", href: "#/jobs" }, "Cancel")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(form);
    const button = form.querySelector("#start-job");
    button.disabled = true;
    try {
      const file = form.querySelector("#f-file").files[0];
      let path = form.querySelector("#f-path").value.trim();
      const name = form.querySelector("#f-content_name").value.trim() || (file ? file.name : "");
      if (file) {
        button.textContent = "Uploading…";
        const up = await api("POST", "/api/v1/uploads?name=" + encodeURIComponent(name), undefined, file);
        path = up.path;
      }
      if (!path) throw new ApiError(400, { error: "upload a file or name one the manager holds", field: "path" });
      const body = { path };
      if (name) body.name = name;
      const t = targetSel.value;
      if (t.startsWith("group:")) body.group = t.slice(6);
      else if (t === "all") body.targets = { all: true };
      else body.targets = { agents: [...agentList.querySelectorAll("input:checked")].map((i) => i.value) };
      const policy = form.querySelector("#f-policy").value;
      if (policy) body.policy = policy;
      const waves = form.querySelector("#f-waves").value.split(",").map((x) => x.trim()).filter(Boolean);
      if (waves.length) {
        if (waves.some((w) => !/^\d+$/.test(w))) throw new ApiError(400, { error: "write percentages separated by commas, e.g. 10, 50, 100", field: "waves" });
        body.rollout = { waves: waves.map(Number), approval: form.querySelector("#f-approval").checked };
        const pause = form.querySelector("#f-pause_after_failures").value.trim();
        if (pause) {
          if (!/^\d+$/.test(pause)) throw new ApiError(400, { error: "a number of participants", field: "pause_after_failures" });
          body.rollout.pause_after_failures = Number(pause);
        }
      }
      button.textContent = "Starting…";
      const job = await api("POST", "/api/v1/jobs", body);
      location.hash = "#/jobs/" + job.id;
    } catch (e) {
      if (e.field === "name") e.field = "content_name";
      if (e.field === "group" || e.field === "agents") e.field = "targets";
      if (e.field === "rollout" || e.field === "rollout.waves") e.field = "waves";
      else if (e.field && e.field.startsWith("rollout.")) e.field = e.field.slice(8);
      showError(form, e);
      button.disabled = false;
      button.textContent = "Start job";
    }
  });
  return h("div", {}, pageHead("New job", "Publish content and distribute it by relay."), h("div", { class: "card" }, form));
}

// ---------- job page ----------

function transfersOf(job) {
  if (Array.isArray(job.transfers)) return job.transfers.map((t) => ({ from: t.from, to: t.to, bytes: t.bytes }));
  return (job.source_bytes || []).map((t) => ({ from: t.from, to: t.agent, bytes: t.bytes }));
}

// The relay tree, laid out from the bytes actually carried. Every agent hangs off the
// source that gave it the most bytes (its "main source"); its column is one more than that
// source's (the manager is column 0), so relays read left to right as a tree. Main-source
// edges are drawn bold with their bytes; other transfers thin, labelled when the graph is
// small and on hover otherwise (the transfers table lists them all). Agents of one network
// segment share a light box, with the segment's leader marked.
// The longest of `texts` (longest first) that fits `width` pixels at about `charWidth` each.
function fitText(width, charWidth, texts) {
  const last = texts[texts.length - 1];
  const fit = texts.find((t) => t.length * charWidth <= width);
  if (fit) return fit;
  const n = Math.max(1, Math.floor(width / charWidth) - 1);
  return last.length > n ? last.slice(0, n) + "…" : last;
}

function treeLayout(job) {
  const MANAGER = "\u0000manager";
  const key = (x) => (x === null || x === undefined ? MANAGER : x);
  const edges = transfersOf(job).filter((t) => t.bytes > 0).map((t) => ({ from: key(t.from), to: t.to, bytes: t.bytes }));
  const parts = new Map(job.participants.map((p) => [p.agent, p]));
  const names = [...new Set([...job.participants.map((p) => p.agent), ...edges.map((e) => e.to), ...edges.map((e) => e.from).filter((f) => f !== MANAGER)])];
  const incoming = new Map(names.map((n) => [n, []]));
  for (const e of edges) incoming.get(e.to).push(e);
  for (const list of incoming.values())
    list.sort((a, b) => b.bytes - a.bytes || (a.from === MANAGER ? -1 : b.from === MANAGER ? 1 : a.from.localeCompare(b.from)));
  // Main source of each agent; a cycle of main sources (agents that fed each other) is
  // broken at the member that took the most from the manager, which then hangs off it.
  const parent = new Map(names.map((n) => [n, incoming.get(n).length ? incoming.get(n)[0].from : MANAGER]));
  const fromManager = (n) => (incoming.get(n).find((e) => e.from === MANAGER) || { bytes: 0 }).bytes;
  const column = new Map([[MANAGER, 0]]);
  const loopHeads = new Set();
  for (const start of names) {
    const path = [];
    let n = start;
    while (!column.has(n) && !path.includes(n)) { path.push(n); n = parent.get(n); }
    if (!column.has(n)) {
      const cycle = path.slice(path.indexOf(n));
      const head = cycle.reduce((best, c) => (fromManager(c) > fromManager(best) || (fromManager(c) === fromManager(best) && c < best) ? c : best));
      parent.set(head, MANAGER);
      loopHeads.add(head);
      path.length = path.indexOf(head) + 1;
      n = MANAGER;
    }
    for (let i = path.length - 1; i >= 0; i--) column.set(path[i], column.get(parent.get(path[i])) + 1);
  }
  const isTreeEdge = (e) => parent.get(e.to) === e.from;
  // Segments: one band each (agents without a segment last), rows assigned depth first
  // within a band so that every sub-tree takes a contiguous run of rows.
  const segOf = (n) => (parts.get(n) && parts.get(n).segment) || "";
  const bands = new Map();
  for (const n of names) { const s = segOf(n); if (!bands.has(s)) bands.set(s, []); bands.get(s).push(n); }
  const bandList = [...bands.entries()].map(([name, members]) => ({ name, members, minCol: Math.min(...members.map((m) => column.get(m))) }))
    .sort((a, b) => (a.name === "") - (b.name === "") || a.minCol - b.minCol || a.name.localeCompare(b.name));
  const received = (n) => incoming.get(n).reduce((s, e) => s + e.bytes, 0);
  const row = new Map();
  let next = 0;
  for (const band of bandList) {
    band.firstRow = next;
    const inBand = new Set(band.members);
    const children = (n) => band.members.filter((c) => parent.get(c) === n).sort((a, b) => a.localeCompare(b));
    const roots = band.members.filter((n) => !inBand.has(parent.get(n)))
      .sort((a, b) => column.get(a) - column.get(b) || (parts.get(b)?.leader ? 1 : 0) - (parts.get(a)?.leader ? 1 : 0) || a.localeCompare(b));
    const place = (n) => {
      const kids = children(n);
      if (!kids.length) { row.set(n, next++); return; }
      kids.forEach(place);
      row.set(n, (row.get(kids[0]) + row.get(kids[kids.length - 1])) / 2);
    };
    roots.forEach(place);
    band.lastRow = next - 1;
  }
  return { MANAGER, edges, parts, names, parent, column, row, bands: bandList, rows: next, isTreeEdge, received, loopHeads };
}

function relayTree(job) {
  const L = treeLayout(job);
  const { MANAGER, edges, parts, column, row } = L;
  const compact = L.names.length > 10;
  const W = compact ? 150 : 172, H = compact ? 28 : 46, PITCH = H + (compact ? 8 : 16), GX = compact ? 96 : 120;
  const PAD = 18, BAND_HEAD = 22, BAND_GAP = 14, BAND_PAD = 8;
  const maxCol = Math.max(1, ...L.names.map((n) => column.get(n)));
  const segmented = L.bands.some((b) => b.name !== "");
  // y of each row: rows of a band follow its heading; bands are separated by a gap.
  const bandOfRow = [];
  L.bands.forEach((b, i) => { for (let r = b.firstRow; r <= b.lastRow; r++) bandOfRow[r] = i; });
  const rowTop = (r) => {
    const bi = bandOfRow[Math.floor(r)] ?? 0;
    const extra = segmented ? (bi + 1) * (BAND_HEAD + BAND_PAD) + bi * (BAND_GAP + BAND_PAD) : 0;
    return PAD + extra + r * PITCH;
  };
  const contentHeight = L.rows ? rowTop(L.rows - 1) + H - PAD + (segmented ? BAND_PAD : 0) : H;
  const height = PAD * 2 + Math.max(contentHeight, H);
  const width = PAD * 2 + (maxCol + 1) * W + maxCol * GX + 40;
  const pos = (n) => n === MANAGER
    ? { x: PAD, y: PAD + (contentHeight - H) / 2 }
    : { x: PAD + column.get(n) * (W + GX), y: rowTop(row.get(n)) };
  const maxBytes = Math.max(1, ...edges.map((e) => e.bytes));
  const labelAll = edges.length <= 14;
  const svg = s("svg", { class: "tree" + (compact ? " compact" : ""), id: "relay-tree", viewBox: "0 0 " + width + " " + height, width, height, role: "img",
    "aria-label": "Relay tree", style: "max-width:" + Math.round(width * 1.25) + "px" });
  svg.append(s("defs", {},
    ["manager", "peer", "extra"].map((k) => s("marker", { id: "arrow-" + k, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse", markerUnits: "userSpaceOnUse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-" + k })))));
  // Segment boxes behind everything.
  if (segmented) L.bands.forEach((b) => {
    if (b.name === "") return;
    const cols = b.members.map((n) => column.get(n));
    const x0 = PAD + Math.min(...cols) * (W + GX) - 10, x1 = PAD + Math.max(...cols) * (W + GX) + W + 10;
    const y0 = rowTop(b.firstRow) - BAND_HEAD - BAND_PAD, y1 = rowTop(b.lastRow) + H + BAND_PAD;
    const leader = b.members.find((n) => parts.get(n)?.leader);
    svg.append(s("g", { class: "segment-box", "data-segment": b.name },
      s("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 10 }),
      s("title", {}, "segment " + b.name + (leader ? ", leader " + leader : ", no leader reported") + ", " + b.members.length + (b.members.length === 1 ? " agent" : " agents")),
      s("text", { x: x0 + 10, y: y0 + 15 }, fitText(x1 - x0 - 20, 6.6,
        ["segment " + b.name + (leader ? " · leader " + leader : "") + " · " + b.members.length + (b.members.length === 1 ? " agent" : " agents"),
          "segment " + b.name + (leader ? " · leader " + leader : ""), "segment " + b.name, b.name]))));
  });
  const edgeGroup = s("g", { class: "edges" }), labelGroup = s("g", { class: "labels" }), nodeGroup = s("g", { class: "nodes" });
  svg.append(edgeGroup, labelGroup, nodeGroup);
  // Secondary edges into one node's right side get their own lanes; those drawn under the
  // nodes each their own depth.
  const lanes = new Map();
  let under = 0, lowest = 0;
  for (const e of edges) {
    const a = pos(e.from), b = pos(e.to);
    const tree = L.isTreeEdge(e);
    const receiver = parts.get(e.to);
    const active = receiver && receiver.state === "fetching";
    const kind = tree ? (e.from === MANAGER ? "manager" : "peer") : "extra";
    const stroke = (tree ? 1.6 : 1) + (tree ? 3.4 : 2) * Math.sqrt(e.bytes / maxBytes);
    let d, lx, ly, anchor;
    const span = column.get(e.to) - column.get(e.from);
    if (tree || span === 1) {
      // Next column: straight across, right side to left side.
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x - 3, y2 = b.y + H / 2, mx = x1 + (x2 - x1) * 0.5;
      d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`;
      if (tree) { lx = x2 - 10; ly = y2 - 6; anchor = "end"; }
      else { lx = mx; ly = (y1 + y2) / 2 - 4; anchor = "middle"; }
    } else if (span === 0) {
      // Same column: an arc out on the right, one lane per edge into a node.
      const lane = (lanes.get(e.to) || 0); lanes.set(e.to, lane + 1);
      const out = 26 + 14 * lane;
      const y1 = a.y + H / 2 + (a.y < b.y ? 4 : -4), y2 = b.y + H / 2 + (a.y < b.y ? -4 : 4);
      const xa = a.x + W, xb = b.x + W + 3, xo = Math.max(xa, xb) + out;
      d = `M${xa},${y1} C${xo},${y1} ${xo},${y2} ${xb},${y2}`;
      lx = xo - out * 0.22; ly = (y1 + y2) / 2 + 4; anchor = "start";
    } else {
      // Backwards or over a column: under the nodes, into the receiver from below.
      const lane = under++;
      const dip = 22 + 16 * (lane % 5);
      const x0 = a.x + (e.from === MANAGER ? W / 2 : W * 0.62), y0 = a.y + H;
      const x3 = b.x + W * 0.38 + (lane % 3) * 8, y3 = b.y + H + 3;
      const yl = Math.max(y0, y3) + dip;
      d = `M${x0},${y0} C${x0},${yl} ${x3},${yl} ${x3},${y3}`;
      lx = (x0 + x3) / 2; ly = (y0 + 3 * yl + 3 * yl + y3) / 8 + 4; anchor = "middle";
      lowest = Math.max(lowest, yl);
    }
    const from = e.from === MANAGER ? "manager" : e.from;
    const path = s("path", { class: "edge " + kind + (tree ? " main" : "") + (active ? " active" : ""), d, "stroke-width": stroke.toFixed(1),
      "marker-end": "url(#arrow-" + kind + ")", "data-from": from, "data-to": e.to, "data-bytes": e.bytes, "data-main": tree ? "1" : "0" },
      s("title", {}, from + " → " + e.to + ": " + bytes(e.bytes) + (tree ? " (main source)" : "")));
    edgeGroup.append(path);
    labelGroup.append(s("text", { class: "edge-label" + (tree ? "" : " extra") + (tree || labelAll ? "" : " on-hover"), x: lx, y: ly, "text-anchor": anchor, "data-from": from, "data-to": e.to }, bytes(e.bytes)));
  }
  for (const n of [MANAGER, ...L.names]) {
    const p = pos(n);
    const part = parts.get(n);
    const state = n === MANAGER ? "manager" : part ? part.state : "waiting";
    const done = part ? pct(part.verified, part.total || job.total_chunks) : 0;
    const label = n === MANAGER ? "Manager" : n;
    const maxChars = compact ? 15 : 18;
    const short = label.length > maxChars ? label.slice(0, maxChars - 1) + "…" : label;
    const g = s("g", { class: "node " + state + (part && part.leader ? " leader" : ""), transform: `translate(${p.x},${p.y})`, "data-node": n === MANAGER ? "manager" : n, "data-state": state,
      "data-column": column.get(n) },
      s("title", {}, n === MANAGER ? "Manager: the source" : n + " · " + state + " · " + done + "% · received " + bytes(L.received(n)) + (part && part.segment ? " · segment " + part.segment : "") + (part && part.leader ? " (leader)" : "") + (L.loopHeads.has(n) ? " · its biggest source was fed by it in turn, so it is drawn off the manager" : "")),
      s("rect", { width: W, height: H, rx: 7 }));
    if (compact) {
      g.append(s("text", { x: 10, y: H / 2 + 4 }, short));
      g.append(s("text", { class: "sub", x: W - 10, y: H / 2 + 4, "text-anchor": "end" }, n === MANAGER ? "source" : state === "confirmed" ? "✓" : done + "%"));
    } else {
      g.append(s("text", { x: 12, y: 19 }, short));
      g.append(s("text", { class: "sub", x: 12, y: 35 }, n === MANAGER ? "source of the content" : state + " · " + done + "%"));
      if (state === "confirmed") g.append(s("path", { class: "mark", d: `M${W - 26},${H / 2} l5,5 l9,-10`, fill: "none", stroke: "#16a34a", "stroke-width": 2.4, "stroke-linecap": "round", "stroke-linejoin": "round" }));
    }
    if (part && part.leader) g.append(s("g", { class: "leader-tag", transform: `translate(${W - 60},-9)` },
      s("rect", { width: 52, height: 15, rx: 7.5 }), s("text", { x: 26, y: 11, "text-anchor": "middle" }, "leader")));
    if (state !== "confirmed" && part && part.state === "fetching" && !compact)
      g.append(s("rect", { class: "done-bar", x: 12, y: H - 6, width: Math.max(2, (W - 24) * done / 100), height: 3, rx: 1.5 }));
    // Hover: this node's transfers stand out, the rest fade.
    g.addEventListener("mouseenter", () => {
      svg.classList.add("focus");
      const id = n === MANAGER ? "manager" : n;
      svg.querySelectorAll(".edge, .edge-label").forEach((el) => {
        const on = el.dataset.from === id || el.dataset.to === id;
        el.classList.toggle("hl", on);
        el.classList.toggle("hl-in", on && el.dataset.to === id);
      });
      g.classList.add("hl");
    });
    g.addEventListener("mouseleave", () => { svg.classList.remove("focus"); g.classList.remove("hl"); });
    nodeGroup.append(g);
  }
  const fullHeight = Math.max(height, lowest + 16);
  const fullWidth = width + (lanes.size ? 50 : 0);
  svg.setAttribute("viewBox", "0 0 " + fullWidth + " " + fullHeight);
  svg.setAttribute("width", fullWidth);
  svg.setAttribute("height", fullHeight);
  svg.style.maxWidth = Math.round(fullWidth * 1.25) + "px";
  return svg;
}

function transfersTable(job) {
  const list = transfersOf(job).filter((t) => t.bytes > 0).sort((a, b) => b.bytes - a.bytes);
  if (!list.length) return null;
  const max = list[0].bytes;
  return h("details", { class: "transfers", open: list.length <= 12 },
    h("summary", {}, "Transfers (" + list.length + ")"),
    table([["From"], ["To"], ["Bytes carried", "num"], [""]],
      list.map((t) => h("tr", { "data-from": t.from || "manager", "data-to": t.to },
        h("td", {}, t.from ? t.from : h("span", { class: "badge" }, "manager")),
        h("td", {}, t.to),
        h("td", { class: "num" }, bytes(t.bytes)),
        h("td", { class: "share" }, h("div", { class: "bar " + (t.from ? "peer" : "") }, h("span", { style: "width:" + pct(t.bytes, max) + "%" })))))));
}

async function jobPage(id) {
  let job = await api("GET", "/api/v1/jobs/" + id);
  const root = h("div", { id: "job-page", "data-job": id });
  const live = h("span", { class: "live", id: "live" }, "live");
  let source = null, refetch = null, stopped = false;
  const confirmedAt = () => new Map((job.confirmations || []).map((c) => [c.agent, c.confirmed_at]));

  function render() {
    const c = job.content || {};
    const over = !["pending", "running"].includes(job.state);
    const total = job.total_chunks;
    const conf = confirmedAt();
    live.hidden = over;
    root.replaceChildren(...[
      pageHead(h("span", {}, "Job #" + job.id + " ", pill(job.state)),
        (c.name || "?") + " v" + (c.version ?? "?") + " · " + bytes(c.length) + " in " + (c.chunks ?? 0) + " chunks of " + bytes(c.chunk_size),
        live,
        ...(over || !CAN_OPERATE ? [] : rolloutButtons(job, refresh)),
        over || !CAN_OPERATE ? null : h("button", { class: "btn danger", id: "cancel-job", onclick: async () => {
          if (!confirm("Cancel job #" + job.id + "? Agents keep the chunks they verified.")) return;
          try { await api("POST", "/api/v1/jobs/" + job.id + "/cancel"); } catch (e) { alert(e.message); }
          refresh();
        } }, "Cancel job")),
      job.warnings && job.warnings.length ? h("div", { class: "warnings", id: "warnings" }, h("strong", {}, "Warnings"), h("ul", {}, job.warnings.map((w) => h("li", {}, w)))) : null,
      h("div", { class: "stats" },
        stat("Participants", job.participants.length),
        stat("Confirmed", job.confirmed_count + " / " + job.participants.length, job.confirmed_count === job.participants.length && job.participants.length ? "ok" : ""),
        stat("Failed", job.failed_count, job.failed_count ? "bad" : ""),
        stat("Running", (job.install_counts || {}).running || 0, ((job.install_counts || {}).running || 0) === job.participants.length && job.participants.length ? "ok" : ""),
        stat("From manager", bytes(job.bytes_from_manager)),
        stat("From peers", bytes(job.bytes_from_peers))),
      rolloutCard(job),
      h("div", { class: "card" },
        h("div", { class: "card-head" }, h("div", {}, h("h2", {}, "Relay tree"), h("span", { class: "muted small" }, "Bytes actually carried, source → receiver. Each agent sits one column right of the source that gave it the most (bold, with bytes); grey edges are its other sources. Hover an agent for its transfers; dashed edges are still carrying.")),
          h("div", { class: "legend" }, h("span", { class: "l-e-manager" }, "from manager"), h("span", { class: "l-e-peer" }, "relayed"), h("span", { class: "l-e-extra" }, "other source"),
            h("span", { class: "l-confirmed" }, "confirmed"), h("span", { class: "l-fetching" }, "fetching"), h("span", { class: "l-waiting" }, "waiting"), h("span", { class: "l-failed" }, "failed"))),
        h("div", { class: "card-body tree-wrap" }, relayTree(job)),
        transfersTable(job)),
      h("div", { class: "card" },
        h("div", { class: "card-head" }, h("h2", {}, "Participants"),
          h("span", { class: "muted small" }, [job.group ? "group " + job.group : null, job.policy ? "policy " + job.policy : null, "created " + when(job.created_at)].filter(Boolean).join(" · "))),
        table([["Agent"], ["Wave"], ["State"], ["Progress"], ["Source", "opt"], ["Connection", "opt"], ["Confirmed"], ["Install"]],
          job.participants.map((p) => h("tr", { "data-agent": p.agent, "data-state": p.state, "data-wave": p.wave || "", class: "participant" },
            h("td", {}, h("strong", {}, p.agent)),
            h("td", {}, p.wave ? String(p.wave) : "—"),
            h("td", {}, pill(p.state), p.rollout ? [" ", pill(p.rollout)] : null),
            h("td", {}, progress(p.verified, p.total || total, p.state === "confirmed" ? "ok" : p.state === "failed" ? "bad" : ""), ),
            h("td", { class: "opt wrap small" }, p.reason ? h("span", { class: "muted" }, p.reason) : p.source || "—"),
            h("td", { class: "opt" }, p.connected ? pill("connected") : pill("offline")),
            h("td", {}, conf.has(p.agent) ? h("span", { class: "pill ok confirmed-mark", title: when(conf.get(p.agent)) }, "✓ " + when(conf.get(p.agent)).slice(11, 19)) : "—"),
            h("td", {}, installCell(p.install)))),
          "No participant yet."))].filter(Boolean));
  }
  async function refresh() {
    try { job = await api("GET", "/api/v1/jobs/" + id); render(); } catch (_) { /* keep the last view */ }
  }
  function scheduleRefresh() {
    if (refetch || stopped) return;
    refetch = setTimeout(() => { refetch = null; refresh(); }, 700);
  }
  render();
  if (["pending", "running"].includes(job.state)) {
    source = new EventSource("/api/v1/jobs/" + id + "/events");
    source.addEventListener("open", () => live.classList.add("on"));
    source.addEventListener("snapshot", (ev) => { job = JSON.parse(ev.data); render(); live.classList.add("on"); });
    source.addEventListener("event", (ev) => {
      const e = JSON.parse(ev.data);
      const p = job.participants.find((x) => x.agent === e.agent);
      if (e.kind === "progress" && p) { p.verified = e.verified; if (p.state === "waiting") p.state = "fetching"; }
      else if (e.kind === "confirmed" && p) { p.state = "confirmed"; p.verified = p.total || job.total_chunks; }
      else if (e.kind === "failed" && p) { p.state = "failed"; p.reason = e.reason; }
      else if (e.kind === "install" && p) { p.install = Object.assign({}, p.install, { state: e.state, exit_code: e.exit_code }); }
      render();
      live.classList.add("on");
      scheduleRefresh();
      if (e.kind === "finished" || e.kind === "cancelled") { source.close(); live.classList.remove("on"); refresh(); }
    });
    source.addEventListener("error", () => { live.classList.remove("on"); });
  }
  cleanup = () => { stopped = true; if (source) source.close(); if (refetch) clearTimeout(refetch); };
  return root;
}

// The STREAM web chat: sign-in, conversations, streamed answers with their routing badge,
// tier health, settings and the usage page. Plain ES modules, no framework, no build step.
//
// Secrets: the API key is read from the sign-in field once, sent to POST /ui/session and
// dropped; from then on the browser's HttpOnly session cookie authenticates every same-origin
// request. Nothing is written to localStorage, sessionStorage, IndexedDB or script cookies, and
// no request ever carries an Authorization header. Settings live in memory only.

import { renderMarkdown, markdownFragment } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const HEALTH_EVERY_MS = 15000;
const LEDGER_TRIES = 7; // the ledger row lands just after the stream ends; ~5 s in all
const TIER_LABEL = { local: "local", hpc: "HPC", cloud: "cloud" };

const state = {
  session: null,
  config: { tiers: [], judges: [], default_judge: null, allow_cloud: true },
  settings: { tier: "auto", allowCloud: true, judge: null },
  conversations: [],
  renamingId: null, // while a title is being edited, the list is not redrawn under it
  currentId: null,
  messages: [], // of the open conversation: {role, content, meta, failed?}
  stream: null, // the answer being written: {controller, convId, article}
  sending: false,
  opening: null, // the load of the conversation being opened, while it runs
  healthTimer: null,
  view: "chat",
  started: false,
};

// ---- HTTP --------------------------------------------------------------------------------

/** Loads into one part of the page where only the last one asked for counts: an answer that
 *  arrives after a later load began, or after `outdate()` (a change made here), comes back
 *  with `latest: false` and is not to be shown. The part is aria-busy while any load is under
 *  way. `load(fetch)` resolves to {latest, value} or {latest, error}. */
function latestLoads(elementId) {
  let version = 0;
  let running = 0;
  return {
    outdate() {
      version += 1;
    },
    async load(fetch) {
      const mine = ++version;
      const part = $(elementId);
      running += 1;
      part.setAttribute("aria-busy", "true");
      let outcome;
      try {
        outcome = { value: await fetch() };
      } catch (error) {
        outcome = { error };
      } finally {
        running -= 1;
        if (!running) part.removeAttribute("aria-busy");
      }
      return { ...outcome, latest: mine === version };
    },
  };
}

const loads = {
  list: latestLoads("conversation-list"), // refreshes, outdated by local changes
  messages: latestLoads("messages"), // the conversation opened last (or a new chat) wins
  usage: latestLoads("usage-view"), // the period asked for last
};

class ApiError extends Error {
  constructor(status, message, extra = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = extra.type || null;
    this.code = extra.code || null;
    this.retryAfter = extra.retryAfter || null;
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const envelope = body && typeof body === "object" ? body.error : null;
  let message = envelope && envelope.message;
  if (!message && body && typeof body.detail === "string") message = body.detail;
  if (!message) message = response.statusText || "The request failed.";
  return new ApiError(response.status, message, {
    type: envelope && envelope.type,
    code: envelope && envelope.code,
    retryAfter: response.headers.get("retry-after"),
  });
}

/** "429: You are over your budget. Retry after 30 s." */
function describeError(err) {
  if (err instanceof ApiError) {
    const status = err.status ? `${err.status}: ` : "";
    const retry = err.retryAfter ? ` Retry after ${err.retryAfter} s.` : "";
    return `${status}${err.message}${retry}`;
  }
  if (err && err.name === "TypeError") {
    return `Network error: ${err.message}. Is the gateway running?`;
  }
  return String((err && err.message) || err);
}

async function api(path, { method = "GET", body, signal } = {}) {
  const init = {
    method, credentials: "same-origin", headers: { accept: "application/json" }, signal,
  };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const err = await errorFrom(response);
    if (response.status === 401 && path !== "/ui/session") sessionLost();
    throw err;
  }
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- formatting --------------------------------------------------------------------------

function formatUsd(value) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "…";
  const v = Number(value);
  if (v === 0) return "$0";
  if (v < 0.0001) return "<$0.0001";
  if (v < 1) return "$" + String(Number(v.toPrecision(2)));
  return "$" + v.toFixed(2);
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "…";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

const formatInt = (n) => Number(n || 0).toLocaleString("en-US");

function relativeTime(seconds) {
  if (!seconds) return "";
  const diff = seconds - Date.now() / 1000;
  const rtf = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  const steps = [[60, "second"], [60, "minute"], [24, "hour"], [7, "day"], [4.35, "week"],
    [12, "month"], [Infinity, "year"]];
  let value = diff;
  for (const [size, unit] of steps) {
    if (Math.abs(value) < size) return rtf.format(Math.round(value), unit);
    value /= size;
  }
  return "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function announce(text) {
  const live = $("live");
  live.textContent = "";
  // A fresh text node after clearing makes screen readers announce repeated messages too.
  requestAnimationFrame(() => {
    live.textContent = text;
  });
}

// ---- sign-in -----------------------------------------------------------------------------

async function boot() {
  let session;
  try {
    session = await api("/ui/session");
  } catch (err) {
    $("boot").textContent = `STREAM could not start the web chat: ${describeError(err)}`;
    $("boot").classList.add("error-text");
    return;
  }
  state.session = session;
  if (session.auth_required && !session.signed_in) showLogin();
  else await startApp();
}

function showLogin(message = "", isError = false) {
  $("boot").hidden = true;
  $("app").hidden = true;
  $("login").hidden = false;
  const error = $("login-error");
  error.textContent = message;
  error.hidden = !message;
  error.classList.toggle("notice-text", !isError);
  $("login-key").value = "";
  $("login-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("login-key");
  const error = $("login-error");
  // The key lives only in this call: it is taken out of the field, sent once, and dropped.
  const key = input.value.trim();
  input.value = "";
  if (!key) {
    error.textContent = "Enter your API key.";
    error.classList.remove("notice-text");
    error.hidden = false;
    input.focus();
    return;
  }
  const submit = $("login-submit");
  submit.disabled = true;
  try {
    const session = await api("/ui/session", { method: "POST", body: { api_key: key } });
    state.session = { auth_required: true, ...session };
    error.hidden = true;
    await startApp();
  } catch (err) {
    error.textContent = err instanceof ApiError ? err.message : describeError(err);
    error.classList.remove("notice-text");
    error.hidden = false;
    input.focus();
  } finally {
    submit.disabled = false;
  }
}

async function signOut() {
  if (state.stream) state.stream.controller.abort();
  try {
    await api("/ui/session", { method: "DELETE" });
  } catch {
    // Signed out locally either way; the cookie expires on its own.
  }
  resetApp();
  showLogin("You are signed out.");
}

function sessionLost() {
  if (!state.session || !state.session.auth_required || !state.started) return;
  if (state.stream) state.stream.controller.abort();
  resetApp();
  showLogin("Your session has ended. Sign in again.");
}

function resetApp() {
  clearInterval(state.healthTimer);
  state.healthTimer = null;
  state.started = false;
  loads.list.outdate();
  state.conversations = [];
  state.renamingId = null;
  state.currentId = null;
  state.messages = [];
  state.stream = null;
  state.sending = false;
  $("conversation-list").replaceChildren();
  clearMessages();
  setStreaming(false);
}

// ---- the app shell -----------------------------------------------------------------------

async function startApp() {
  $("boot").hidden = true;
  $("login").hidden = true;
  $("app").hidden = false;
  state.started = true;
  const session = state.session || {};
  $("account-name").textContent = session.name
    ? `${session.name}${session.admin ? " (admin)" : ""}` : "";
  $("sign-out").hidden = !session.auth_required;
  try {
    state.config = { ...state.config, ...(await api("/ui/api/config")) };
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    state.config = { tiers: ["local", "hpc", "cloud"], judges: [], default_judge: null,
                     allow_cloud: true };
  }
  setupSettings();
  refreshHealth();
  clearInterval(state.healthTimer);
  state.healthTimer = setInterval(refreshHealth, HEALTH_EVERY_MS);
  await refreshConversations();
  await route();
  if (state.view === "chat") $("composer-input").focus();
}

function setupSettings() {
  const { config, settings } = state;
  const tier = $("setting-tier");
  tier.replaceChildren(el("option", { value: "auto", text: "auto" }),
    ...config.tiers.map((t) => el("option", { value: t, text: TIER_LABEL[t] || t })));
  if (settings.tier !== "auto" && !config.tiers.includes(settings.tier)) settings.tier = "auto";
  tier.value = settings.tier;

  const judge = $("setting-judge");
  judge.replaceChildren(...config.judges.map((j) => el("option", { value: j, text: j })));
  if (!settings.judge || !config.judges.includes(settings.judge)) {
    settings.judge = config.default_judge || config.judges[0] || null;
  }
  if (settings.judge) judge.value = settings.judge;
  $("judge-setting").hidden = config.judges.length === 0;

  const cloud = $("setting-cloud");
  if (!config.allow_cloud) settings.allowCloud = false;
  cloud.checked = settings.allowCloud;
  cloud.disabled = !config.allow_cloud;
  cloud.parentElement.title = config.allow_cloud ? "" : "The cloud is switched off on this server";
  $("setting-cloud").parentElement.hidden = !config.tiers.includes("cloud");
  syncSettings();
}

function syncSettings() {
  const { settings } = state;
  settings.tier = $("setting-tier").value;
  settings.judge = $("setting-judge").value || null;
  settings.allowCloud = $("setting-cloud").checked;
  // The judge only decides for auto.
  $("setting-judge").disabled = settings.tier !== "auto";
}

// ---- tier health -------------------------------------------------------------------------

async function refreshHealth() {
  let body = null;
  try {
    const response = await fetch("/health/ready", { credentials: "same-origin" });
    body = await response.json(); // 503 (nothing up) still carries the JSON
  } catch {
    body = null;
  }
  const list = $("health");
  if (!body || !body.tiers) {
    list.replaceChildren(el("li", { class: "light light-down", text: "gateway unreachable" }));
    return;
  }
  list.replaceChildren(...Object.entries(body.tiers).map(([tier, h]) => {
    let level = "down";
    let words = "down";
    if (h.state === "up" && h.routable && !h.simulated) {
      level = "up";
      words = "up";
    } else if (h.state === "up") {
      level = "warn";
      words = ["up", !h.routable && "not routable", h.simulated && "simulated"]
        .filter(Boolean).join(", ");
    } else if (h.state !== "down") {
      level = "unknown";
      words = h.state || "unknown";
    }
    const models = (h.models || []).join(", ");
    const title = `${tier}: ${words}${models ? ` (${models})` : ""}`;
    return el("li", { class: `light light-${level}`, title },
      el("span", { class: "dot", "aria-hidden": "true" }),
      el("span", { class: "light-name", text: TIER_LABEL[tier] || tier }),
      el("span", { class: "visually-hidden", text: `: ${words}` }),
      h.simulated
        ? el("span", { class: "light-note", "aria-hidden": "true", text: "simulated" }) : null);
  }));
}

// ---- conversations -----------------------------------------------------------------------

async function refreshConversations() {
  const { latest, value, error } = await loads.list.load(() => api("/ui/api/conversations"));
  if (error instanceof ApiError && error.status === 401) return;
  if (!latest) return; // a newer refresh or a local change came first
  state.conversations = (value && value.data) || [];
  renderConversationList();
}

/** A change made here, already accepted by the server: shown at once, and not undone by a
 *  refresh that was asked for before it. */
function changeConversations(update) {
  loads.list.outdate();
  state.conversations = update(state.conversations);
  renderConversationList();
}

// Drawn here rather than taken from an icon font: the page loads nothing but its own files.
const ICONS = {
  rename: ["M4 20h4L19 9l-4-4L4 16z", "M13 7l4 4"],
  delete: ["M5 7h14", "M10 7V4.5h4V7", "M7 7l1 13h8l1-13", "M10.5 11v5.5", "M13.5 11v5.5"],
};

function icon(name) {
  return svg("svg", { viewBox: "0 0 24 24", width: 16, height: 16, "aria-hidden": "true",
                      focusable: "false", class: "icon" },
    ...ICONS[name].map((d) => svg("path", { d })));
}

const conversationHash = (id) => `#chat/${encodeURIComponent(id)}`;

function renderConversationList() {
  if (state.renamingId) return; // drawn when the rename ends, with whatever changed meanwhile
  const list = $("conversation-list");
  const focusedId = document.activeElement && document.activeElement.closest
    && document.activeElement.closest("[data-id]")?.dataset.id;
  list.replaceChildren(...state.conversations.map((c) => {
    const current = c.id === state.currentId;
    const title = c.title || "Untitled";
    const count = typeof c.messages === "number" ? c.messages : (c.messages || []).length;
    const when = relativeTime(c.updated || c.created);
    return el("li", { class: `conversation${current ? " current" : ""}`, "data-id": c.id },
      el("a", { class: "conversation-open", href: conversationHash(c.id),
                "aria-current": current ? "page" : null, onclick: closeDrawer },
        el("span", { class: "conversation-title", text: title }),
        el("span", { class: "conversation-meta",
                     text: `${count} message${count === 1 ? "" : "s"} · ${when}` })),
      el("span", { class: "conversation-actions" },
        el("button", { type: "button", class: "icon-button", "aria-label": `Rename “${title}”`,
                       title: "Rename", onclick: () => startRename(c) }, icon("rename")),
        el("button", { type: "button", class: "icon-button", "aria-label": `Delete “${title}”`,
                       title: "Delete", onclick: () => deleteConversation(c) }, icon("delete"))));
  }));
  $("conversation-empty").hidden = state.conversations.length > 0;
  if (focusedId) list.querySelector(`[data-id="${CSS.escape(focusedId)}"] a`)?.focus();
  $("tab-chat").href = state.currentId ? conversationHash(state.currentId) : "#chat";
}

function startRename(conversation) {
  const item = $("conversation-list").querySelector(`[data-id="${CSS.escape(conversation.id)}"]`);
  if (!item) return;
  const input = el("input", { class: "rename-input", type: "text", "aria-label": "New title",
                              maxlength: 200 });
  input.value = conversation.title || "";
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    let renamed = false;
    if (save && title && title !== conversation.title) {
      try {
        await api(`/ui/api/conversations/${encodeURIComponent(conversation.id)}`,
                  { method: "PATCH", body: { title } });
        renamed = true;
        announce(`Renamed to ${title}`);
      } catch (err) {
        announce(`Could not rename: ${describeError(err)}`);
      }
    }
    state.renamingId = null;
    if (renamed) {
      const retitle = (c) => (c.id === conversation.id ? { ...c, title } : c);
      changeConversations((all) => all.map(retitle));
    } else {
      renderConversationList();
    }
    const item = `[data-id="${CSS.escape(conversation.id)}"] button`;
    $("conversation-list").querySelector(item)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      finish(true);
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  state.renamingId = conversation.id;
  item.replaceChildren(input);
  input.focus();
  input.select();
}

async function deleteConversation(conversation) {
  const title = conversation.title || "Untitled";
  if (!window.confirm(`Delete “${title}”? This cannot be undone.`)) return;
  try {
    await api(`/ui/api/conversations/${encodeURIComponent(conversation.id)}`, { method: "DELETE" });
  } catch (err) {
    announce(`Could not delete: ${describeError(err)}`);
    return;
  }
  if (state.stream && state.stream.convId === conversation.id) state.stream.controller.abort();
  changeConversations((all) => all.filter((c) => c.id !== conversation.id));
  if (state.currentId === conversation.id) newChat(false);
  announce("Conversation deleted");
  $("new-conversation").focus();
}

function newChat(focus = true) {
  loads.messages.outdate();
  state.currentId = null;
  state.messages = [];
  clearMessages();
  if (location.hash !== "#chat") history.replaceState(null, "", "#chat");
  renderConversationList();
  showView("chat");
  closeDrawer();
  if (focus) $("composer-input").focus();
}

async function openConversation(id) {
  if (state.currentId === id && state.messages.length) {
    loads.messages.outdate(); // already open: any slower open of another one is not shown
    return;
  }
  const opening = loads.messages.load(
    () => api(`/ui/api/conversations/${encodeURIComponent(id)}`));
  state.opening = opening; // a message sent meanwhile waits for it: it belongs in this one
  const { latest, value: conversation, error: err } = await opening;
  if (state.opening === opening) state.opening = null;
  if (!latest) return; // another conversation, or a new chat, came after
  if (err) {
    state.currentId = null;
    state.messages = [];
    clearMessages();
    showNotice(err instanceof ApiError && err.status === 404
      ? "That conversation does not exist (any more)." : describeError(err));
    renderConversationList();
    return;
  }
  state.currentId = id;
  state.messages = (conversation.messages || []).map((m) => ({ ...m }));
  clearMessages();
  const live = state.stream && state.stream.convId === id ? state.stream : null;
  const shown = live ? live.history : state.messages;
  if (live) state.messages = live.history;
  for (const message of shown) $("messages").append(messageNode(message));
  if (live) $("messages").append(live.article);
  $("welcome").hidden = shown.length > 0 || Boolean(live);
  renderConversationList();
  scrollToEnd(true);
}

// ---- routing -----------------------------------------------------------------------------

async function route() {
  let hash = location.hash.slice(1);
  try {
    hash = decodeURIComponent(hash);
  } catch {
    // A malformed address: treat it as the plain chat view.
  }
  if (hash === "usage") {
    showView("usage");
    await loadUsage();
    return;
  }
  showView("chat");
  if (hash.startsWith("chat/")) await openConversation(hash.slice(5));
}

function showView(view) {
  const was = state.view;
  state.view = view;
  $("chat-view").hidden = view !== "chat";
  $("usage-view").hidden = view !== "usage";
  if (view === "chat" && was !== "chat") scrollToEnd(true);
  $("tab-chat").toggleAttribute("aria-current", false);
  $("tab-usage").toggleAttribute("aria-current", false);
  $(view === "chat" ? "tab-chat" : "tab-usage").setAttribute("aria-current", "page");
}

// ---- messages ----------------------------------------------------------------------------

function clearMessages() {
  const box = $("messages");
  for (const node of [...box.children]) if (node.id !== "welcome") node.remove();
  $("welcome").hidden = false;
}

function showNotice(text) {
  $("welcome").hidden = true;
  $("messages").append(el("p", { class: "notice error-text", role: "alert", text }));
}

function messageNode(message) {
  if (message.role === "user") {
    const body = el("div", { class: "msg-body" });
    body.textContent = message.content; // the user's own words, shown as typed
    return el("article", { class: "msg user", "aria-label": "You" }, body);
  }
  const body = el("div", { class: "msg-body md" });
  body.append(markdownFragment(message.content || ""));
  const article = el("article", { class: "msg assistant", "aria-label": "STREAM" }, body);
  if (message.meta) {
    const badge = badgeNode();
    article.append(badge);
    fillBadge(article, {
      tier: message.meta.tier, model: message.meta.model, complexity: message.meta.complexity,
      confidence: message.meta.confidence, serverTtft: message.meta.ttft_ms,
      cost: message.meta.cost_usd, costKnown: true, outcome: message.meta.outcome,
      requestId: message.meta.request_id,
    });
    if (message.meta.outcome === "cancelled") article.classList.add("stopped");
  }
  return article;
}

const BADGE_FIELDS = [
  ["tier", "Tier"], ["model", "Model"], ["complexity", "Complexity"],
  ["confidence", "Judge confidence"], ["ttft", "First token"], ["cost", "Cost"],
  ["outcome", "Outcome"],
];

function badgeNode() {
  const badge = el("div", { class: "badge", role: "group",
                            "aria-label": "How this answer was made" });
  for (const [field, label] of BADGE_FIELDS) {
    badge.append(el("span", { class: `chip chip-${field}`, "data-field": field, hidden: true },
      el("span", { class: "chip-k", text: label }), " ",
      el("span", { class: "chip-v" })));
  }
  const details = el("details", { class: "msg-details" },
    el("summary", { text: "Details" }), el("dl", { class: "details-list" }));
  badge.append(details);
  return badge;
}

function setChip(article, field, value, extraClass) {
  const chip = article.querySelector(`.badge [data-field="${field}"]`);
  if (!chip) return;
  const empty = value === null || value === undefined || value === "" || value === "none";
  chip.hidden = empty;
  if (!empty) chip.querySelector(".chip-v").textContent = value;
  if (extraClass !== undefined) chip.dataset.value = extraClass;
}

/** Fill what is known so far; fields left out are not touched. */
function fillBadge(article, info) {
  const meta = (article._meta = { ...(article._meta || {}), ...info });
  setChip(article, "tier", meta.tier && meta.tier !== "none" ? meta.tier : null, meta.tier || "");
  setChip(article, "model", meta.model);
  setChip(article, "complexity", meta.complexity);
  const confidence = meta.confidence === null || meta.confidence === undefined
    || meta.confidence === "" ? null : Number(meta.confidence);
  setChip(article, "confidence", confidence === null || Number.isNaN(confidence)
    ? null : `${Math.round(confidence * 100)}%`);
  let ttft = null;
  if (meta.clientTtft !== undefined && meta.clientTtft !== null) {
    ttft = formatMs(meta.clientTtft);
    if (meta.serverTtft !== undefined && meta.serverTtft !== null) {
      ttft += ` (server ${formatMs(meta.serverTtft)})`;
    }
  } else if (meta.serverTtft !== undefined && meta.serverTtft !== null) {
    ttft = `${formatMs(meta.serverTtft)} (server)`;
  }
  setChip(article, "ttft", ttft);
  setChip(article, "cost", meta.costKnown ? (meta.cost === null || meta.cost === undefined
    ? "unknown" : formatUsd(meta.cost)) : "…");
  const outcome = meta.outcome && meta.outcome !== "completed" ? meta.outcome : null;
  setChip(article, "outcome", outcome === "cancelled" ? "stopped" : outcome, outcome || "");

  const rows = [
    ["Request id", meta.requestId], ["Route reason", meta.reason], ["Context", meta.context],
    ["Prompt tokens", meta.promptTokens], ["Completion tokens", meta.completionTokens],
    ["Server first token", meta.serverTtft != null ? formatMs(meta.serverTtft) : null],
    ["Duration", meta.duration != null ? formatMs(meta.duration) : null],
    ["Fallbacks", meta.fallbacks], ["Outcome", meta.outcome],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "" && v !== "none");
  const list = article.querySelector(".details-list");
  if (list) {
    list.replaceChildren(...rows.flatMap(([k, v]) => [
      el("dt", { text: k }),
      el("dd", { text: Array.isArray(v) ? (v.length ? v.join(", ") : "none") : String(v) })]));
    list.parentElement.hidden = rows.length === 0;
  }
}

function isNearBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 96;
}

function scrollToEnd(force = false) {
  const box = $("messages");
  if (force || isNearBottom()) box.scrollTop = box.scrollHeight;
  following = true;
}

// Whether the reader is at the end of the conversation: then a resize (a phone rotating, the
// message box growing) keeps the newest words in view instead of leaving them below the fold.
let following = true;

// ---- sending and streaming ---------------------------------------------------------------

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("composer").classList.toggle("streaming", on);
}

const titleFrom = (text) => {
  const line = text.split("\n").find((l) => l.trim()) || "New chat";
  return line.trim().length > 60 ? line.trim().slice(0, 57) + "…" : line.trim();
};

async function send(text) {
  if (state.stream || state.sending) return;
  state.sending = true;
  try {
    // Sent while the conversation in the address is still loading: it goes there, after its
    // history (else it would start a new conversation, which the load then hid).
    while (state.opening) await state.opening;
    $("welcome").hidden = true;
    const userMessage = { role: "user", content: text, created: Math.floor(Date.now() / 1000) };
    const userNode = messageNode(userMessage);
    $("messages").append(userNode);
    scrollToEnd(true);
    if (!state.currentId) {
      let created;
      try {
        created = await api("/ui/api/conversations",
                            { method: "POST", body: { title: titleFrom(text) } });
      } catch (err) {
        userNode.append(el("p", { class: "msg-error", role: "alert",
                                  text: `Could not start a conversation: ${describeError(err)}` }));
        restoreDraft(text);
        return;
      }
      state.currentId = created.id;
      state.messages = [];
      history.replaceState(null, "", conversationHash(created.id));
      changeConversations((all) => [created, ...all.filter((c) => c.id !== created.id)]);
    }
    state.messages.push(userMessage);
    await streamAnswer(state.currentId, state.messages, userMessage, userNode);
  } finally {
    state.sending = false;
  }
}

function restoreDraft(text) {
  const input = $("composer-input");
  if (!input.value.trim()) {
    input.value = text;
    autoGrow();
  }
}

function readRouteHeaders(headers) {
  const get = (name) => {
    const v = headers.get(name);
    return v === null || v === "" || v === "none" ? null : v;
  };
  return {
    requestId: headers.get("x-request-id"),
    tier: get("x-stream-tier"),
    model: get("x-stream-model"),
    complexity: get("x-stream-complexity"),
    confidence: get("x-stream-judge-confidence"),
    reason: get("x-stream-route-reason"),
    context: get("x-stream-context"),
  };
}

async function streamAnswer(convId, history, userMessage, userNode) {
  const { settings } = state;
  const controller = new AbortController();
  const body = el("div", { class: "msg-body md" });
  const article = el("article", { class: "msg assistant streaming", "aria-label": "STREAM",
                                  "aria-busy": "true" }, body, badgeNode());
  fillBadge(article, { costKnown: false });
  const typing = el("span", { class: "typing", "aria-hidden": "true" },
    el("span"), el("span"), el("span"));
  body.append(typing);
  $("messages").append(article);
  scrollToEnd(true);
  const stream = { controller, convId, article, history };
  state.stream = stream;
  setStreaming(true);
  announce("Waiting for the answer…");

  const payload = {
    model: settings.tier,
    messages: history.filter((m) => !m.failed).map(({ role, content }) => ({ role, content })),
    stream: true,
    stream_options: { include_usage: true },
    allow_cloud: settings.allowCloud,
  };
  const headers = { "content-type": "application/json", accept: "text/event-stream",
                    "x-stream-conversation": convId };
  if (settings.tier === "auto" && settings.judge) headers["x-stream-judge-kind"] = settings.judge;

  const started = performance.now();
  let text = "";
  let began = false; // the server accepted the request and started its stream
  let outcome = "completed";
  let requestId = null;
  let frame = 0;
  const render = () => {
    frame = 0;
    const follow = isNearBottom();
    renderMarkdown(body, text);
    if (follow) scrollToEnd(true);
  };
  const scheduleRender = () => {
    if (!frame) frame = requestAnimationFrame(render);
  };

  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", credentials: "same-origin", headers, body: JSON.stringify(payload),
      signal: controller.signal,
    });
    const route = readRouteHeaders(response.headers);
    requestId = route.requestId;
    if (!response.ok) {
      const err = await errorFrom(response);
      if (response.status === 401) sessionLost();
      throw err;
    }
    began = true;
    fillBadge(article, route);
    const where = `${route.tier || "the gateway"}${route.model ? ` (${route.model})` : ""}`;
    announce(`Answer streaming from ${where}…`);

    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += chunk.value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          done = true;
          break;
        }
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          continue;
        }
        if (event.error) {
          const e = event.error;
          throw new ApiError(null, e.message || "The answer failed part-way.", e);
        }
        for (const choice of event.choices || []) {
          const piece = choice.index ? null : choice.delta && choice.delta.content;
          if (!piece) continue;
          if (!text) {
            typing.remove();
            fillBadge(article, { clientTtft: performance.now() - started });
          }
          text += piece;
          scheduleRender();
        }
      }
    }
    if (!done) throw new ApiError(null, "The connection closed before the answer was complete.");
  } catch (err) {
    if (err && err.name === "AbortError") {
      outcome = "cancelled";
      article.classList.add("stopped");
    } else {
      outcome = "failed"; // the ledger's word for it
      const where = began ? article : userNode;
      where.append(el("p", { class: "msg-error", role: "alert", text: describeError(err) }));
      announce(`Error: ${describeError(err)}`);
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    typing.remove();
    render();
    article.classList.remove("streaming");
    article.removeAttribute("aria-busy");
    if (state.stream === stream) state.stream = null;
    setStreaming(false);
  }

  if (!began) {
    // Nothing was answered: this turn is left out of the history the next request sends.
    userMessage.failed = true;
    article.remove();
    restoreDraft(userMessage.content); // so that trying again is one key press away
  } else {
    const meta = { request_id: requestId, outcome };
    history.push({ role: "assistant", content: text, meta });
    fillBadge(article, { outcome });
    if (outcome === "cancelled") announce("Stopped. The partial answer is kept.");
    else if (outcome === "completed") {
      announce(`Answer complete from ${article._meta.tier || "the gateway"}.`);
    }
    if (requestId) await settleFromLedger(article, requestId, meta);
    else fillBadge(article, { costKnown: true, cost: null });
  }
  refreshConversations();
}

/** The ledger row arrives a moment after the stream; it has the cost and the server's view. */
async function settleFromLedger(article, requestId, meta) {
  let row = null;
  for (let attempt = 0; attempt < LEDGER_TRIES && !row; attempt++) {
    try {
      row = await api(`/v1/usage/requests/${encodeURIComponent(requestId)}`);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 404) break;
      await sleep(120 * 2 ** attempt);
    }
  }
  if (!row) {
    fillBadge(article, { costKnown: true, cost: null });
    return;
  }
  // The same shape as a stored message's meta, so a re-drawn conversation shows the same badge.
  Object.assign(meta, { tier: row.tier, model: row.model, complexity: row.complexity,
                        confidence: article._meta.confidence ?? null, cost_usd: row.cost_usd,
                        ttft_ms: row.ttft_ms, outcome: row.outcome || meta.outcome });
  fillBadge(article, {
    tier: row.tier || article._meta.tier, model: row.model || article._meta.model,
    complexity: row.complexity || article._meta.complexity,
    reason: row.route_reason || article._meta.reason,
    cost: row.cost_usd, costKnown: true, serverTtft: row.ttft_ms, duration: row.duration_ms,
    promptTokens: row.prompt_tokens, completionTokens: row.completion_tokens,
    fallbacks: row.fallbacks, outcome: row.outcome || meta.outcome,
  });
}

function stopStreaming() {
  if (state.stream) state.stream.controller.abort();
}

// ---- usage -------------------------------------------------------------------------------

const TIER_ORDER = ["local", "hpc", "cloud"];

async function loadUsage() {
  const days = Number($("usage-days").value) || 30;
  const status = $("usage-status");
  status.textContent = "Loading usage…";
  const { latest, value: usage, error } = await loads.usage.load(
    () => api(`/v1/usage?days=${days}`));
  if (!latest) return; // another period was asked for after this one
  if (error) {
    status.textContent = `Could not load usage: ${describeError(error)}`;
    return;
  }
  status.textContent = `Last ${days} days${usage.key ? ` for ${usage.key}` : ""}.`;
  state.usage = { usage, days };
  renderUsage();
}

function renderUsage() {
  if (!state.usage) return;
  const { usage, days } = state.usage;
  const totals = usage.totals || {};
  $("usage-totals").replaceChildren(...[
    ["Requests", formatInt(totals.requests), "requests"],
    ["Prompt tokens", formatInt(totals.prompt_tokens), "prompt_tokens"],
    ["Completion tokens", formatInt(totals.completion_tokens), "completion_tokens"],
    ["Cost", formatUsd(totals.cost_usd || 0), "cost_usd"],
  ].map(([k, v, field]) => el("div", { class: "total", "data-field": field },
    el("dt", { text: k }), el("dd", { text: v }))));

  const perTier = usage.per_tier || {};
  const tiers = [...TIER_ORDER.filter((t) => t in perTier),
    ...Object.keys(perTier).filter((t) => !TIER_ORDER.includes(t))];
  const tierTable = el("table", { class: "data-table" },
    el("caption", { text: "By tier (tokens: prompt and completion)" }),
    el("thead", {}, el("tr", {}, ...["Tier", "Requests", "Prompt", "Completion", "Cost"]
      .map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...tiers.map((t) => el("tr", {},
      el("th", { scope: "row" },
        el("span", { class: `swatch tier-${t}`, "aria-hidden": "true" }), ` ${t}`),
      el("td", { text: formatInt(perTier[t].requests) }),
      el("td", { text: formatInt(perTier[t].prompt_tokens) }),
      el("td", { text: formatInt(perTier[t].completion_tokens) }),
      el("td", { text: formatUsd(perTier[t].cost_usd || 0) })))));
  $("usage-tiers").replaceChildren(tiers.length ? tierTable
    : el("p", { class: "muted", text: "No requests in this period." }));

  const series = dailySeries(usage.per_day || [], days);
  const seenTiers = new Set(tiers);
  for (const d of series) for (const t of Object.keys(d.per_tier || {})) seenTiers.add(t);
  const shareTiers = [...TIER_ORDER.filter((t) => seenTiers.has(t)),
    ...[...seenTiers].filter((t) => !TIER_ORDER.includes(t))];
  drawSpendChart($("chart-spend"), series);
  drawShareChart($("chart-share"), series, shareTiers);
}

function dailySeries(perDay, days) {
  const byDay = new Map(perDay.map((d) => [d.day, d]));
  const out = [];
  const today = new Date();
  for (let k = days - 1; k >= 0; k--) {
    const day = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(),
                                  today.getUTCDate() - k)).toISOString().slice(0, 10);
    out.push(byDay.get(day) || { day, requests: 0, cost_usd: 0, per_tier: {} });
    byDay.delete(day);
  }
  // Days the server reports outside our window (clock or time-zone skew) are kept, in order.
  return [...out, ...byDay.values()].sort((a, b) => a.day.localeCompare(b.day));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const child of children) if (child) node.append(child);
  return node;
}

function chartFrame(figure, id, titleText, descText) {
  const width = Math.max(280, Math.min(900, Math.floor(figure.clientWidth || 640)));
  const height = 200;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                            "aria-labelledby": `${id}-title ${id}-desc`, class: "chart-svg" });
  root.append(svg("title", { id: `${id}-title` }), svg("desc", { id: `${id}-desc` }));
  root.querySelector("title").textContent = titleText;
  root.querySelector("desc").textContent = descText;
  return { root, width, height, pad: { left: 52, right: 8, top: 12, bottom: 26 } };
}

function niceCeiling(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function axisUsd(value, max) {
  if (value === 0) return "$0";
  const decimals = max >= 10 ? 0 : Math.max(2, 1 - Math.floor(Math.log10(max)));
  return "$" + value.toFixed(decimals);
}

const shortDay = (day) => day.slice(5);

function xAxis(root, series, x, bar, height, pad) {
  const last = series.length - 1;
  const picks = new Set([0, Math.floor(last / 2), last]);
  for (const k of picks) {
    // The end labels align with the plot's edges so that they are never cut off.
    const anchor = k === 0 ? "start" : k === last ? "end" : "middle";
    const at = k === 0 ? x(k) : k === last ? x(k) + bar : x(k) + bar / 2;
    const t = svg("text", { x: at, y: height - pad.bottom + 16, class: "axis-label",
                            "text-anchor": anchor });
    t.textContent = shortDay(series[k].day);
    root.append(t);
  }
}

// The plot area of a bar chart with n bars, its three horizontal grid lines labelled by
// label(fraction of the height), and where bar k goes.
function barGrid(root, width, height, pad, n, label) {
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const step = plotW / n;
  const bar = Math.max(1, step * 0.72);
  const x = (k) => pad.left + k * step + (step - bar) / 2;
  for (const frac of [0, 0.5, 1]) {
    const y = pad.top + plotH * (1 - frac);
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    const text = svg("text", { x: pad.left - 6, y: y + 4, class: "axis-label",
                               "text-anchor": "end" });
    text.textContent = label(frac);
    root.append(text);
  }
  return { plotH, bar, x };
}

function drawSpendChart(figure, series) {
  const total = series.reduce((s, d) => s + (d.cost_usd || 0), 0);
  const top = series.reduce(
    (best, d) => ((d.cost_usd || 0) > (best.cost_usd || 0) ? d : best), series[0]);
  const desc = total > 0
    ? `Total ${formatUsd(total)} over ${series.length} days; the most, `
      + `${formatUsd(top.cost_usd)}, on ${top.day}.`
    : `No spend over ${series.length} days.`;
  figure.replaceChildren();
  const { root, width, height, pad } = chartFrame(figure, "spend", "Spend per day (USD)", desc);
  const max = niceCeiling(Math.max(...series.map((d) => d.cost_usd || 0)));
  const { plotH, bar, x } = barGrid(root, width, height, pad, series.length,
    (frac) => axisUsd(max * frac, max));
  series.forEach((d, k) => {
    const h = ((d.cost_usd || 0) / max) * plotH;
    if (h <= 0) return;
    const rect = svg("rect", { x: x(k), y: pad.top + plotH - h, width: bar, height: h,
                               class: "bar-spend", rx: 1.5 });
    rect.append(svg("title"));
    rect.firstChild.textContent = `${d.day}: ${formatUsd(d.cost_usd)}`;
    root.append(rect);
  });
  xAxis(root, series, x, bar, height, pad);
  const table = dataTable("Spend per day", ["Day", "Requests", "Cost"],
    series.filter((d) => d.requests || d.cost_usd)
      .map((d) => [d.day, formatInt(d.requests), formatUsd(d.cost_usd || 0)]));
  figure.append(el("figcaption", { text: "Spend per day" }), root,
    el("p", { class: "muted chart-summary", text: desc }), table);
}

function drawShareChart(figure, series, tiers) {
  const counts = Object.fromEntries(tiers.map((t) => [t, 0]));
  for (const d of series) for (const t of tiers) counts[t] += (d.per_tier || {})[t] || 0;
  const all = Object.values(counts).reduce((a, b) => a + b, 0);
  const desc = all
    ? "Share of requests by tier, per day. Over the period: "
      + tiers.map((t) => `${t} ${Math.round((counts[t] / all) * 100)}%`).join(", ") + "."
    : "No requests in this period.";
  figure.replaceChildren();
  const { root, width, height, pad } = chartFrame(figure, "share", "Tier share per day", desc);
  const { plotH, bar, x } = barGrid(root, width, height, pad, series.length,
    (frac) => `${Math.round(frac * 100)}%`);
  series.forEach((d, k) => {
    const perTier = d.per_tier || {};
    const dayTotal = tiers.reduce((s, t) => s + (perTier[t] || 0), 0);
    if (!dayTotal) return;
    let y = pad.top + plotH;
    for (const t of tiers) {
      const n = perTier[t] || 0;
      if (!n) continue;
      const h = (n / dayTotal) * plotH;
      y -= h;
      const rect = svg("rect", { x: x(k), y, width: bar, height: h, class: `bar-tier tier-${t}` });
      rect.append(svg("title"));
      rect.firstChild.textContent = `${d.day}: ${t} ${n} of ${dayTotal} requests`;
      root.append(rect);
    }
  });
  xAxis(root, series, x, bar, height, pad);
  const legend = el("ul", { class: "legend", "aria-hidden": "true" }, ...tiers.map((t) =>
    el("li", {}, el("span", { class: `swatch tier-${t}` }), ` ${t}`)));
  const table = dataTable("Requests per day by tier", ["Day", ...tiers, "Total"],
    series.filter((d) => d.requests).map((d) => [
      d.day, ...tiers.map((t) => formatInt((d.per_tier || {})[t] || 0)), formatInt(d.requests)]));
  figure.append(el("figcaption", { text: "Tier share per day" }), root, legend,
    el("p", { class: "muted chart-summary", text: desc }), table);
}

function dataTable(caption, head, rows) {
  const table = el("table", { class: "data-table" },
    el("caption", { class: "visually-hidden", text: caption }),
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...(rows.length ? rows : [["No data", ...head.slice(1).map(() => "")]])
      .map((r) => el("tr", {}, el("th", { scope: "row", text: r[0] }),
        ...r.slice(1).map((v) => el("td", { text: v }))))));
  return el("details", { class: "chart-table" }, el("summary", { text: "Show as a table" }), table);
}

// ---- drawer and keyboard -----------------------------------------------------------------

const narrow = () => window.matchMedia("(max-width: 860px)").matches;

function openDrawer() {
  $("app").classList.add("drawer-open");
  $("drawer-toggle").setAttribute("aria-expanded", "true");
  $("drawer-toggle").setAttribute("aria-label", "Hide conversations");
  $("scrim").hidden = false;
  // While the drawer covers the page, what is behind it is out of reach (focus, clicks, AT).
  $("main").inert = true;
  $("new-conversation").focus();
}

function closeDrawer() {
  if (!$("app").classList.contains("drawer-open")) return;
  $("app").classList.remove("drawer-open");
  $("drawer-toggle").setAttribute("aria-expanded", "false");
  $("drawer-toggle").setAttribute("aria-label", "Show conversations");
  $("scrim").hidden = true;
  $("main").inert = false;
  if (narrow() && $("sidebar").contains(document.activeElement)) $("drawer-toggle").focus();
}

function autoGrow() {
  const input = $("composer-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight + 2, 220)}px`;
}

function wire() {
  // The skip link moves focus without touching the address, which holds the conversation.
  document.querySelector(".skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    if ($("app").hidden) return;
    if (state.view !== "chat") {
      history.replaceState(null, "", $("tab-chat").getAttribute("href"));
      showView("chat");
    }
    $("composer-input").focus();
  });
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("new-conversation").addEventListener("click", () => newChat(true));
  $("drawer-toggle").addEventListener("click", () => {
    if ($("app").classList.contains("drawer-open")) closeDrawer();
    else openDrawer();
  });
  $("scrim").addEventListener("click", closeDrawer);
  for (const id of ["setting-tier", "setting-judge", "setting-cloud"]) {
    $(id).addEventListener("change", syncSettings);
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("composer-input");
    const text = input.value.trim();
    if (!text || state.stream || state.sending) return;
    input.value = "";
    autoGrow();
    send(text);
  });
  $("composer-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer-input").addEventListener("input", autoGrow);
  $("stop").addEventListener("click", () => {
    stopStreaming();
    $("composer-input").focus();
  });
  $("usage-days").addEventListener("change", loadUsage);
  $("messages").addEventListener("scroll", () => {
    following = isNearBottom();
  }, { passive: true });
  new ResizeObserver(() => {
    if (following && state.view === "chat") $("messages").scrollTop = $("messages").scrollHeight;
  }).observe($("messages"));
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented) return;
    if ($("app").classList.contains("drawer-open")) closeDrawer();
    else if (state.stream) stopStreaming();
  });
  window.addEventListener("hashchange", () => {
    if (state.started) route();
  });
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (!narrow()) closeDrawer();
      if (state.view === "usage") renderUsage();
    }, 150);
  });
}

wire();
boot();

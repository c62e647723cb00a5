// The llmrec shop page: plain JavaScript over the REST API (no build step).
"use strict";

const state = { models: [], basket: [], session: null, recSeq: 0, results: [], focus: -1 };
const $ = (sel) => document.querySelector(sel);

function sessionId() {
  let id = localStorage.getItem("llmrec-session");
  if (!id) {
    id = "s-" + Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
    localStorage.setItem("llmrec-session", id);
  }
  return id;
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem("llmrec-api-key");
  if (key) headers["X-API-Key"] = key;
  const res = await fetch(path, { ...options, headers });
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = JSON.stringify((await res.json()).detail); } catch (e) { /* not JSON */ }
    throw new Error(`${res.status} ${detail}`);
  }
  return res.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const itemLink = (it) => el("a", { href: `#/item/${encodeURIComponent(it.item_id)}`, title: it.title }, it.title);
const addButton = (it, extra = {}) => el("button", {
  class: "add", type: "button", "aria-label": `add ${it.title} to the basket`,
  onclick: () => addToBasket(it.item_id, extra),
}, "+");

// --- basket (the session's cart events, kept by the server) ---------------------------------
async function loadBasket() {
  const h = await api(`/sessions/${state.session}/history`);
  state.basket = h.items;
  renderBasket();
}

async function addToBasket(itemId, extra = {}) {
  await api("/events", { method: "POST", body: JSON.stringify({ session_id: state.session, item_id: itemId, kind: "cart", ...extra }) });
  await loadBasket();
  refreshRecs();
}

async function removeFromBasket(itemId) {
  await api("/events", { method: "POST", body: JSON.stringify({ session_id: state.session, item_id: itemId, kind: "remove" }) });
  await loadBasket();
  refreshRecs();
}

function renderBasket() {
  const ul = $("#basket");
  ul.replaceChildren(...state.basket.map((it) => el("li", {}, itemLink(it),
    el("button", { class: "remove", type: "button", "aria-label": `remove ${it.title}`, onclick: () => removeFromBasket(it.item_id) }, "\u00d7"))));
  $("#basket-count").textContent = state.basket.length;
  $("#basket-empty").hidden = state.basket.length > 0;
}

// --- search ---------------------------------------------------------------------------------
let searchTimer = null;
function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 150);
}

async function runSearch() {
  const q = $("#search").value;
  state.results = await api(`/items?q=${encodeURIComponent(q)}&limit=25`);
  state.focus = -1;
  $("#results").replaceChildren(...state.results.map((it, i) => el("li", { "data-index": i, "data-item": it.item_id },
    itemLink(it), addButton(it))));
}

function onSearchKey(ev) {
  const items = [...document.querySelectorAll("#results li")];
  if (!items.length) return;
  if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
    ev.preventDefault();
    state.focus = Math.max(0, Math.min(items.length - 1, state.focus + (ev.key === "ArrowDown" ? 1 : -1)));
    items.forEach((li, i) => li.classList.toggle("focused", i === state.focus));
    items[state.focus].scrollIntoView({ block: "nearest" });
  } else if (ev.key === "Enter" && state.focus >= 0) {
    location.hash = `#/item/${encodeURIComponent(state.results[state.focus].item_id)}`;
  } else if (ev.key === "+" && state.focus >= 0) {
    ev.preventDefault();
    addToBasket(state.results[state.focus].item_id);
  }
}

// --- recommendation cards --------------------------------------------------------------------
function card(model, id) {
  return el("article", { class: "card", id, "data-model": model.name, "aria-live": "polite" },
    el("h3", {}, model.name), el("p", { class: "sub" }, `${model.model_type} \u00b7 loading\u2026`),
    el("div", { class: "interests" }), el("ol", {}, el("li", { class: "skeleton" }, "loading\u2026")));
}

function fillCard(node, out, model) {
  node.querySelector(".sub").textContent = `${model.model_type} \u00b7 ${out.latency_ms.toFixed(1)} ms`;
  const rows = out.items.map((it) => {
    const why = it.because.length ? el("span", { class: "why" }, "because of " + it.because.map((b) => b.title).join("; ")) : "";
    const extra = { recommendation_id: out.recommendation_id, model: out.model };
    return el("li", { "data-item": it.item_id }, el("div", { class: "row" }, el("span", {}, itemLink(it), why), addButton(it, extra)));
  });
  node.querySelector("ol").replaceChildren(...(rows.length ? rows : [el("li", { class: "skeleton" }, "nothing to recommend")]));
  node.dataset.items = out.items.map((it) => it.item_id).join(",");
  node.dataset.seq = String(state.recSeq);
}

function setInterests(node, status, phrases) {
  const box = node.querySelector(".interests");
  if (status === "ready") box.textContent = phrases && phrases.length ? "interests: " + phrases.join(", ") : "";
  else if (status === "pending") box.textContent = "interests: working\u2026";
}

async function pollInterests(node, model, seq) {
  for (let i = 0; i < 60 && seq === state.recSeq; i++) {
    await new Promise((r) => setTimeout(r, 700));
    const out = await api(`/sessions/${state.session}/interests?model=${encodeURIComponent(model)}`);
    if (seq !== state.recSeq) return;
    setInterests(node, out.status, out.phrases);
    if (out.status === "ready") return;
  }
}

async function refreshRecs() {
  const seq = ++state.recSeq;
  const box = $("#recs");
  if (box.children.length !== state.models.length) {
    box.replaceChildren(...state.models.map((m, i) => card(m, `rec-${i}`)));
  }
  await Promise.all(state.models.map(async (m, i) => {
    const node = document.getElementById(`rec-${i}`);
    try {
      const out = await api("/session/recommend", { method: "POST",
        body: JSON.stringify({ session_id: state.session, k: 10, model: m.name }) });
      if (seq !== state.recSeq) return;
      fillCard(node, out, m);
      setInterests(node, out.interests_status, out.interests);
      if (out.interests_status === "pending") pollInterests(node, m.name, seq);
    } catch (e) {
      node.querySelector(".sub").replaceChildren(el("span", { class: "error" }, e.message));
    }
  }));
  box.dataset.seq = String(seq);
}

// --- product page ----------------------------------------------------------------------------
async function showItem(itemId) {
  const it = await api(`/items/${encodeURIComponent(itemId)}`);
  $("#item-title").textContent = it.title;
  $("#item-meta").textContent = [it.brand ? `brand: ${it.brand}` : null, `item ${it.item_id}`, `${it.popularity} purchases`]
    .filter(Boolean).join(" \u00b7 ");
  $("#item-cats").replaceChildren(...it.categories.map((c) => el("span", { class: "chip" }, c)));
  $("#item-add").onclick = () => addToBasket(it.item_id);
  api("/events", { method: "POST", body: JSON.stringify({ session_id: state.session, item_id: it.item_id, kind: "view" }) })
    .catch(() => {});
  const sims = await Promise.all(state.models.map((m) =>
    api(`/items/${encodeURIComponent(itemId)}/similar?k=8&model=${encodeURIComponent(m.name)}`).then((rows) => [m, rows])));
  $("#similar").replaceChildren(...sims.map(([m, rows]) => el("article", { class: "card", "data-model": m.name },
    el("h3", {}, m.name), el("p", { class: "sub" }, m.model_type),
    el("ol", {}, ...rows.map((r) => el("li", {}, el("div", { class: "row" }, itemLink(r), addButton(r))))))));
}

// --- shoppers and models ---------------------------------------------------------------------
async function showUsers() {
  const pick = $("#user-pick");
  if (!pick.options.length) {
    const users = await api("/users?limit=50");
    pick.replaceChildren(...users.map((u) => el("option", { value: u.user_id }, `${u.user_id} (${u.n_items} items)`)));
    pick.onchange = () => showUser(pick.value);
  }
  if (pick.value) showUser(pick.value);
}

async function showUser(userId) {
  const h = await api(`/users/${encodeURIComponent(userId)}/history?limit=20`);
  $("#user-history").replaceChildren(...h.items.map((it) => el("li", {}, itemLink(it))));
  const box = $("#user-recs");
  box.replaceChildren(...state.models.map((m, i) => card(m, `user-rec-${i}`)));
  await Promise.all(state.models.map(async (m, i) => {
    const out = await api(`/users/${encodeURIComponent(userId)}/recommend?k=10&model=${encodeURIComponent(m.name)}`);
    fillCard(document.getElementById(`user-rec-${i}`), out, m);
  }));
}

async function showModels() {
  const models = await api("/models");
  const fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "\u2013");
  $("#models-table tbody").replaceChildren(...models.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, m.model_type),
    el("td", { class: "num" }, fmt(m.metrics && m.metrics["ndcg@10"])),
    el("td", { class: "num" }, fmt(m.metrics && m.metrics["hit_rate@10"])),
    el("td", { class: "num" }, m.metrics && m.metrics.n_users ? m.metrics.n_users : "\u2013"),
    el("td", { class: "num" }, m.batching.requests), el("td", { class: "num" }, Number(m.batching.mean_batch).toFixed(2)))));
}

// --- routing ---------------------------------------------------------------------------------
async function route() {
  const hash = location.hash || "#/";
  const [, page, arg] = hash.match(/^#\/?([^/]*)\/?(.*)$/) || [];
  const view = page === "item" ? "item" : page === "users" ? "users" : page === "models" ? "models" : "shop";
  for (const v of ["shop", "item", "users", "models"]) $(`#view-${v}`).hidden = v !== view;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (view === "item" ? "shop" : view)));
  if (view === "item") await showItem(decodeURIComponent(arg));
  else if (view === "users") await showUsers();
  else if (view === "models") await showModels();
  else $("#search").focus();
}

async function start() {
  state.session = sessionId();
  state.models = await api("/models");
  $("#search").addEventListener("input", onSearchInput);
  $("#search").addEventListener("keydown", onSearchKey);
  $("#basket-clear").addEventListener("click", async () => {
    for (const it of [...state.basket]) {
      await api("/events", { method: "POST", body: JSON.stringify({ session_id: state.session, item_id: it.item_id, kind: "remove" }) });
    }
    await loadBasket();
    refreshRecs();
  });
  window.addEventListener("hashchange", route);
  await Promise.all([loadBasket(), runSearch()]);
  await refreshRecs();
  await route();
  document.body.dataset.ready = "1";
}

start().catch((e) => { document.body.prepend(el("p", { class: "error" }, "could not start: " + e.message)); });

// The store page: plain DOM, no framework, no build step. The API key is kept in
// sessionStorage (this tab only) and sent as a Bearer token to the credit API.
"use strict";

(function () {
  const KEY = "llmp.apiKey";
  const SVG = "http://www.w3.org/2000/svg";
  const fmt = new Intl.NumberFormat("en-US");
  const $ = (id) => document.getElementById(id);
  const state = { period: "24h", cursor: null, demo: false };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function setNumber(id, value) {
    const node = $(id);
    node.textContent = fmt.format(value);
    node.dataset.value = String(value);
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = Object.assign({ Authorization: "Bearer " + sessionStorage.getItem(KEY) },
      opts.headers || {});
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, {
        method: opts.method || "GET",
        headers,
        body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      });
    } catch (e) {
      throw new ApiError(0, "The credit service cannot be reached. Check your connection.");
    }
    const data = await resp.json().catch(() => null);
    if (!resp.ok) {
      const msg = data && data.error && data.error.message;
      throw new ApiError(resp.status, msg || "Request failed (HTTP " + resp.status + ")");
    }
    return data;
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  // -- balance ---------------------------------------------------------------------

  async function loadBalance() {
    const b = await api("/v1/credit/balance");
    setNumber("balance", b.balance);
    setNumber("held", b.held);
    $("blocked").hidden = !b.blocked;
  }

  // -- consumption -----------------------------------------------------------------

  function drawChart(series) {
    const box = $("chart");
    box.replaceChildren();
    const w = 600, h = 120, pad = 2;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const max = Math.max(1, ...series.map((s) => s.credits));
    const step = w / Math.max(1, series.length);
    series.forEach((s, i) => {
      const bh = s.credits > 0 ? Math.max(3, (h - 8) * (s.credits / max)) : 2;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(i * step + pad / 2));
      rect.setAttribute("y", String(h - bh));
      rect.setAttribute("width", String(Math.max(1, step - pad)));
      rect.setAttribute("height", String(bh));
      rect.setAttribute("rx", "2");
      rect.setAttribute("class", s.credits > 0 ? "bar" : "bar zero");
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${when(s.start)}: ${fmt.format(s.credits)} credits, ` +
        `${fmt.format(s.tokens)} tokens`;
      rect.append(title);
      svg.append(rect);
    });
    box.append(svg);
  }

  async function loadUsage(period) {
    state.period = period;
    for (const b of document.querySelectorAll(".tabs button")) {
      b.classList.toggle("active", b.dataset.period === period);
      b.setAttribute("aria-selected", String(b.dataset.period === period));
    }
    const u = await api("/v1/credit/usage?period=" + encodeURIComponent(period));
    if (state.period !== period) return; // a newer click won
    setNumber("usage-credits", u.credits);
    setNumber("usage-tokens", u.tokens.total);
    setNumber("usage-requests", u.requests);
    drawChart(u.series);
    const box = $("by-alias");
    box.replaceChildren(...u.by_alias.map((a) =>
      el("span", { text: `${a.alias || "—"}: ${fmt.format(a.credits)}` })));
  }

  // -- packages and orders ---------------------------------------------------------

  function packageCard(p) {
    const price = el("div", { class: "price" });
    if (p.original_price !== p.price) price.append(el("s", { text: `${p.original_price}` }));
    price.append(`${p.price} ${p.currency}`);
    const buy = el("button", { class: "primary", type: "button", "data-testid": "buy",
      "data-package": p.id, text: "Buy" });
    buy.addEventListener("click", () => run(() => buyPackage(p, buy)));
    return el("div", { class: "package", "data-testid": "package", "data-package": p.id },
      el("div", { class: "name", text: p.name }),
      el("div", { class: "credits", text: fmt.format(p.credits) },
        el("span", { class: "unit", text: " credits" })),
      price, buy);
  }

  async function loadPackages() {
    const list = await api("/v1/credit/packages");
    const box = $("packages");
    box.replaceChildren(...list.map(packageCard));
    if (!list.length) box.append(el("div", { class: "empty", text: "No packages on offer." }));
  }

  function orderRow(o) {
    const row = el("div", { class: "order" + (o.status === "paid" ? " paid" : ""),
      "data-testid": "order", "data-order": o.id });
    row.append(el("span", { text: `${o.package_id}: ${fmt.format(o.credits)} credits, ` +
      `${o.price} ${o.currency}` }));
    if (o.status === "paid") {
      row.append(el("strong", { text: "Paid" }));
    } else if (state.demo) {
      const pay = el("button", { class: "primary", type: "button",
        "data-testid": "simulate-payment", text: "Simulate payment" });
      pay.addEventListener("click", () => run(async () => {
        pay.disabled = true;
        const paid = await api(`/demo/orders/${encodeURIComponent(o.id)}/simulate-payment`,
          { method: "POST", body: {} });
        row.replaceWith(orderRow(paid));
        await Promise.all([loadBalance(), loadHistory(true)]);
      }));
      row.append(pay);
    } else {
      row.append(el("span", { text: "Awaiting payment" }));
    }
    return row;
  }

  async function buyPackage(p, button) {
    button.disabled = true;
    try {
      const order = await api("/v1/credit/orders", {
        method: "POST", body: { package_id: p.id }, headers: { "Idempotency-Key": randomKey() },
      });
      $("orders").prepend(orderRow(order));
    } finally {
      button.disabled = false;
    }
  }

  // -- history ---------------------------------------------------------------------

  function describe(e) {
    if (e.kind === "charge") return `${e.alias || "request"}` + (e.scene ? ` · ${e.scene}` : "");
    const order = /^order \S+ \((.+)\)$/.exec(e.reason || "");
    if (order) return "Bought " + order[1];
    const reward = /^reward (\S+) /.exec(e.reason || "");
    if (reward) return "Reward: " + reward[1];
    if (e.kind === "grant") return e.reason || "Credit added";
    return e.reason || e.kind;
  }

  function historyRow(e) {
    const plus = e.amount > 0;
    const tokens = e.kind === "charge" ? ` · ${fmt.format(e.tokens.total)} tokens` : "";
    return el("li", { "data-testid": "history-row", "data-entry": String(e.id) },
      el("span", { class: "what", text: describe(e) }),
      el("span", { class: "amount" + (plus ? " plus" : ""),
        text: (plus ? "+" : "−") + fmt.format(Math.abs(e.amount)) }),
      el("span", { class: "when", text: when(e.occurred_at) + tokens }),
      el("span", { class: "after", text: "balance " + fmt.format(e.balance_after) }));
  }

  async function loadHistory(reset) {
    if (reset) state.cursor = null;
    const q = "/v1/credit/ledger?limit=10" +
      (state.cursor ? "&cursor=" + encodeURIComponent(state.cursor) : "");
    const page = await api(q);
    const list = $("history");
    if (reset) list.replaceChildren();
    list.append(...page.entries.map(historyRow));
    if (reset && !page.entries.length) {
      list.append(el("li", { class: "empty", text: "Nothing here yet." }));
    }
    state.cursor = page.next_cursor;
    $("load-more").hidden = !page.next_cursor;
  }

  // -- sign-in and the whole page --------------------------------------------------

  async function run(action) {
    clearError();
    try {
      await action();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        signOut();
      }
      showError(e.message || String(e));
    }
  }

  function signOut() {
    sessionStorage.removeItem(KEY);
    $("app").hidden = true;
    $("signin").hidden = false;
    $("sign-out").hidden = true;
  }

  async function loadAll() {
    await loadBalance(); // the first call checks the key
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    await Promise.all([loadUsage(state.period), loadPackages(), loadHistory(true),
      api("/v1/credit/orders").then((r) => {
        $("orders").replaceChildren(...r.orders.filter((o) => o.status === "pending")
          .slice(0, 5).map(orderRow));
      })]);
  }

  async function start() {
    try {
      const cfg = await fetch("/store/config.json").then((r) => r.json());
      state.demo = Boolean(cfg.demo);
    } catch (e) {
      state.demo = false;
    }
    $("signin-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      $("api-key").value = "";
      run(loadAll);
    });
    $("sign-out").addEventListener("click", signOut);
    $("load-more").addEventListener("click", () => run(() => loadHistory(false)));
    for (const b of document.querySelectorAll(".tabs button")) {
      b.addEventListener("click", () => run(() => loadUsage(b.dataset.period)));
    }
    if (sessionStorage.getItem(KEY)) run(loadAll);
  }

  start();
})();

// sessiongate webchat: a page that treats "session busy" as an answer, not a failure.
//
// Each message gets a client-side id, sent as its Idempotency-Key and kept on
// every retry, so a retry can never run a turn twice. 409/429/503 answers are
// retried after the server's retryAfterMs (else Retry-After, else full-jitter
// backoff) within a budget of attempts and time; other errors show the
// problem's title and detail. Messages of one tab go out one at a time; the
// transcript is refreshed after each reply and polled, so tabs see each other.
// Only the newest page of the transcript is loaded (and polled); older pages
// load as the reader scrolls up, following the server's Link rel="next".
"use strict";

(() => {
  const RETRY = { maxAttempts: 12, budgetMs: 90_000, backoffBaseMs: 250, backoffMaxMs: 5_000, hintJitter: 0.5 };
  const RETRYABLE_STATUSES = new Set([409, 429, 503]);
  const POLL_MS = 2_500;
  const PAGE_LIMIT = 50;
  const SESSION_PATTERN = /^[A-Za-z0-9._:@-]{1,128}$/;
  const STORAGE = { session: "sessiongate.session", token: "sessiongate.token" };

  const ui = {
    settings: document.getElementById("settings"),
    session: document.getElementById("session-id"),
    token: document.getElementById("token"),
    transcript: document.getElementById("transcript"),
    scroller: document.querySelector(".transcript-wrap"),
    empty: document.getElementById("empty"),
    status: document.getElementById("status"),
    composer: document.getElementById("composer"),
    message: document.getElementById("message"),
  };

  let sessionId = "";
  let serverMessages = []; // the loaded part of the transcript: older pages, then the newest page
  let olderBefore = null; // messageId whose older messages are not loaded yet (null: none remain)
  let loadingOlder = false;
  const pending = []; // messages of this tab not yet answered: {id, sessionId, text, state, note}
  let outbox = Promise.resolve();

  class ProblemError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function newId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function initialSession() {
    const fromQuery = new URLSearchParams(location.search).get("session");
    if (fromQuery && SESSION_PATTERN.test(fromQuery)) return fromQuery;
    const stored = localStorage.getItem(STORAGE.session);
    if (stored && SESSION_PATTERN.test(stored)) return stored;
    return `web-${newId().replaceAll("-", "").slice(0, 12)}`;
  }

  function headers(extra = {}) {
    const token = ui.token.value.trim();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  const messagesUrl = (id) => `v1/sessions/${encodeURIComponent(id)}/messages`;

  function pageUrl(id, before) {
    const query = new URLSearchParams({ limit: String(PAGE_LIMIT) });
    if (before) query.set("before", before);
    return `${messagesUrl(id)}?${query}`;
  }

  // The ``before`` of the response's Link rel="next" (older messages remain), else null.
  function nextBefore(response) {
    const link = /<([^>]*)>\s*;\s*rel="next"/.exec(response.headers.get("Link") || "");
    return link ? new URL(link[1], location.href).searchParams.get("before") : null;
  }

  async function readProblem(response) {
    try {
      const body = await response.json();
      if (body && typeof body === "object") return body;
    } catch { /* not JSON: fall through */ }
    return { title: response.statusText || `HTTP ${response.status}` };
  }

  // What the server asked for: retryAfterMs, else Retry-After (seconds or HTTP date); null if neither.
  function serverHintMs(response, problem) {
    if (Number.isFinite(problem.retryAfterMs) && problem.retryAfterMs >= 0) return problem.retryAfterMs;
    const header = (response.headers.get("Retry-After") || "").trim();
    if (/^\d+$/.test(header)) return Number(header) * 1000;
    const date = Date.parse(header);
    return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
  }

  function retryDelayMs(hintMs, attempt) {
    if (hintMs !== null) return hintMs + Math.random() * hintMs * RETRY.hintJitter;
    const ceiling = Math.min(RETRY.backoffMaxMs, RETRY.backoffBaseMs * 2 ** attempt);
    return Math.random() * ceiling; // full jitter
  }

  function setStatus(text, kind = "") {
    ui.status.textContent = text;
    ui.status.className = `status ${kind}`.trim();
  }

  // POST one message, retrying contention with the same Idempotency-Key. Resolves to the 200 body.
  async function deliver(item) {
    const started = Date.now();
    for (let attempt = 1; ; attempt += 1) {
      let hintMs = null;
      let reason;
      try {
        const response = await fetch(messagesUrl(item.sessionId), {
          method: "POST",
          headers: headers({ "Content-Type": "application/json", "Idempotency-Key": item.id }),
          body: JSON.stringify({ text: item.text }),
        });
        if (response.ok) return await response.json();
        const problem = await readProblem(response);
        if (!RETRYABLE_STATUSES.has(response.status)) throw new ProblemError(response.status, problem);
        hintMs = serverHintMs(response, problem);
        reason = "busy";
      } catch (error) {
        if (error instanceof ProblemError) throw error;
        reason = "gateway unreachable";
      }
      const waitMs = retryDelayMs(hintMs, attempt);
      if (attempt >= RETRY.maxAttempts || Date.now() - started + waitMs > RETRY.budgetMs) {
        throw new ProblemError(0, {
          title: "Not delivered",
          detail: `${reason}; gave up after ${attempt} attempts in ${Math.round((Date.now() - started) / 1000)} s`,
        });
      }
      const note = `${reason}, retrying in ${Math.max(1, Math.ceil(waitMs / 1000))} s`;
      setStatus(`${note[0].toUpperCase()}${note.slice(1)} (attempt ${attempt + 1} of ${RETRY.maxAttempts})`, "busy");
      updatePending(item, "pending", note);
      await sleep(waitMs);
    }
  }

  async function sendQueued(item) {
    updatePending(item, "pending", "sending…");
    setStatus("Sending…");
    try {
      await deliver(item);
      pending.splice(pending.indexOf(item), 1);
      setStatus(pending.length ? `${pending.length} waiting to send` : "");
    } catch (error) {
      const { title, detail } = error.problem || { title: "Error", detail: String(error) };
      updatePending(item, "failed", [title, detail].filter(Boolean).join(": "));
      setStatus(`${title}${detail ? `: ${detail}` : ""}`, "error");
    }
    await refresh();
  }

  function enqueue(item) {
    outbox = outbox.then(() => sendQueued(item));
  }

  function updatePending(item, state, note) {
    item.state = state;
    item.note = note;
    render();
  }

  async function refresh() {
    const forSession = sessionId;
    try {
      const response = await fetch(pageUrl(forSession), { headers: headers(), cache: "no-store" });
      if (forSession !== sessionId) return;
      if (!response.ok) {
        const problem = await readProblem(response);
        if (!ui.status.classList.contains("busy")) {
          setStatus(`${problem.title || "Error"}${problem.detail ? `: ${problem.detail}` : ""}`, "error");
        }
        return;
      }
      const body = await response.json();
      const newest = Array.isArray(body.messages) ? body.messages : [];
      const merged = mergeNewest(newest, nextBefore(response));
      if (signature(merged) !== signature(serverMessages)) {
        serverMessages = merged;
        render();
        fillViewport();
      }
    } catch {
      if (!pending.length) setStatus("Gateway unreachable; will keep trying", "error");
    }
  }

  // The loaded messages with the newest page in place; if it does not reach what is
  // loaded (more than a page arrived meanwhile), the older pages are dropped and reloaded on scroll.
  function mergeNewest(newest, before) {
    const overlap = newest.length ? serverMessages.findIndex((message) => message.id === newest[0].id) : -1;
    if (overlap >= 0) return [...serverMessages.slice(0, overlap), ...newest];
    olderBefore = before;
    return newest;
  }

  async function loadOlder() {
    if (loadingOlder || olderBefore === null) return;
    loadingOlder = true;
    const forSession = sessionId;
    try {
      const response = await fetch(pageUrl(forSession, olderBefore), { headers: headers(), cache: "no-store" });
      if (forSession !== sessionId || !response.ok) return;
      const body = await response.json();
      const older = Array.isArray(body.messages) ? body.messages : [];
      olderBefore = nextBefore(response);
      const heightBefore = ui.scroller.scrollHeight;
      serverMessages = [...older, ...serverMessages];
      render();
      ui.scroller.scrollTop += ui.scroller.scrollHeight - heightBefore; // the reader stays where they were
    } catch {
      setStatus("Gateway unreachable; will keep trying", "error");
    } finally {
      loadingOlder = false;
    }
    fillViewport();
  }

  // Older pages load when the reader reaches the top, or while the loaded messages do not fill the view.
  function fillViewport() {
    if (ui.scroller.scrollTop < 40 || ui.scroller.scrollHeight <= ui.scroller.clientHeight) loadOlder();
  }

  const signature = (messages) => `${messages.length}:${messages.length ? messages[messages.length - 1].id : ""}`;

  function formatTime(at) {
    const date = new Date(at);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function messageElement(role, meta, text, extraClass = "") {
    const li = document.createElement("li");
    li.className = `message ${role} ${extraClass}`.trim();
    const metaEl = document.createElement("span");
    metaEl.className = "meta";
    metaEl.textContent = meta;
    const textEl = document.createElement("div");
    textEl.className = "text";
    textEl.textContent = text;
    li.append(metaEl, textEl);
    return li;
  }

  function serverMessageElement(message) {
    const who = message.role === "user"
      ? message.sender || "user"
      : `assistant${message.provider ? ` · ${message.provider}` : ""}`;
    const role = message.role === "user" ? "user" : "assistant";
    return messageElement(role, [who, formatTime(message.at)].filter(Boolean).join(" · "), message.text ?? "");
  }

  function pendingElement(item) {
    const li = messageElement("user", `you · ${item.note}`, item.text, item.state);
    li.dataset.clientId = item.id;
    if (item.state === "failed") {
      const again = document.createElement("button");
      again.type = "button";
      again.textContent = "Retry";
      again.className = "retry";
      again.addEventListener("click", () => enqueue(item)); // same id: the same Idempotency-Key
      li.append(again);
    }
    return li;
  }

  function render() {
    const atBottom = ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight < 40;
    const mine = pending.filter((item) => item.sessionId === sessionId);
    ui.transcript.replaceChildren(...serverMessages.map(serverMessageElement), ...mine.map(pendingElement));
    ui.empty.hidden = serverMessages.length + mine.length > 0;
    if (atBottom) ui.scroller.scrollTop = ui.scroller.scrollHeight;
  }

  function openSession(id) {
    sessionId = id;
    ui.session.value = id;
    localStorage.setItem(STORAGE.session, id);
    const url = new URL(location.href);
    url.searchParams.set("session", id);
    history.replaceState(null, "", url);
    serverMessages = [];
    olderBefore = null;
    render();
    refresh();
  }

  ui.settings.addEventListener("submit", (event) => {
    event.preventDefault();
    const id = ui.session.value.trim();
    if (!SESSION_PATTERN.test(id)) {
      setStatus("Session ids are 1-128 characters of letters, digits and . _ : @ -", "error");
      return;
    }
    sessionStorage.setItem(STORAGE.token, ui.token.value.trim());
    openSession(id);
  });

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.message.value.trim();
    if (!text) return;
    ui.message.value = "";
    const item = { id: newId(), sessionId, text, state: "pending", note: "queued" };
    pending.push(item);
    render();
    enqueue(item);
  });

  ui.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });

  ui.scroller.addEventListener("scroll", fillViewport, { passive: true });

  ui.token.value = sessionStorage.getItem(STORAGE.token) || "";
  openSession(initialSession());
  setInterval(() => { if (document.visibilityState === "visible") refresh(); }, POLL_MS);
})();

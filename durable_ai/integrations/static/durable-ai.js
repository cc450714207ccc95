/**
 * durable-ai.js: follow a durable-ai session from a browser, through the native gateway.
 *
 * No dependencies and no build step: an ES module that the gateway serves next to its routes
 * (`GET /sessions/durable-ai.js`). It
 *
 * - follows the session over the gateway's WebSocket (`/sessions/{id}/ws?after=<cursor>`) and keeps the
 *   session's view (messages with their parts, the runs still working) up to date, event by event;
 * - keeps the cursor, with the view it stands for, in `localStorage`, so a reloaded page shows what it had at
 *   once and continues after that cursor: nothing is read twice and nothing is skipped;
 * - reconnects after a dropped connection with exponential backoff (and jitter), from its cursor;
 * - sends controls (`cancel`, `steer`, `prompt`) and resolves each with the agent side's acknowledgement.
 *
 *     import { DurableSession } from "/sessions/durable-ai.js";
 *
 *     const chat = new DurableSession("chat-42");
 *     chat.addEventListener("change", () => render(chat.view));
 *     await chat.open();
 *     const ack = await chat.cancel();             // { outcome: "applied" | "rejected" | "ignored", ... }
 *
 * docs/integrations/js-client.md documents every option, property, method and event.
 */

const STORAGE_PREFIX = "durable-ai:";
const STORAGE_VERSION = 1;
const SAVED_AT = /^\{"v":\d+,"at":(\d+)[,}]/; // the head of a kept record: when it was saved
const SESSION_ID = /^[A-Za-z0-9_-]{1,128}$/;

/** A failure the gateway reported (its `error` name is in `code`), or one of the client's own. */
export class DurableAIError extends Error {
  /**
   * @param {string} code the error's name: the gateway's (`PermissionDenied`, `MalformedFrame`, ...) or the
   *   client's (`ConnectionLost`, `AckTimeout`, `Closed`, `HTTPError`)
   * @param {string} message what happened
   */
  constructor(code, message) {
    super(message);
    this.name = "DurableAIError";
    this.code = code;
  }
}

/** An empty view of `session`, in the shape of the gateway's `GET /sessions/{id}/view`. */
export function emptyView(session) {
  return { session, cursor: null, messages: [], active_runs: [], truncated: false };
}

/**
 * Folds events into a view, the way the server builds `GET /sessions/{id}/view`: text and reasoning deltas join
 * into their parts by part id, tool calls and results pair by call id, a run's `run-end` gives its message a
 * status. The view is a plain object (JSON-serialisable) that `view` always returns, up to date.
 */
export class ViewFold {
  /** @param {object} view a view to continue from (the gateway's JSON, or one kept in storage) */
  constructor(view) {
    this.view = view;
    this._byId = new Map();
    this._byRun = new Map();
    for (const message of view.messages) this._index(message);
  }

  _index(message) {
    this._byId.set(message.id, message);
    if (message.role === "assistant" && message.run_id) this._byRun.set(message.run_id, message);
  }

  _add(message) {
    this.view.messages.push(message);
    this._index(message);
  }

  /**
   * Apply one event; returns the message it changed (`null` when it changed none).
   * @param {object} event the event's wire JSON
   * @param {string|null} cursor its cursor
   */
  apply(event, cursor) {
    const view = this.view;
    if (cursor != null) view.cursor = cursor;
    switch (event.type) {
      case "run-start": {
        if (!event.run_id || this._byRun.has(event.run_id)) return null;
        const message = {
          id: event.message_id,
          role: "assistant",
          run_id: event.run_id,
          agent: event.agent ?? null,
          parent_run_id: event.parent_run_id ?? null,
          input_message_id: event.input_message_id ?? null,
          parts: [],
          status: "streaming",
          status_text: null,
          reason: null,
          error: null,
          ts: event.ts,
        };
        this._add(message);
        view.active_runs.push({
          run_id: event.run_id,
          agent: event.agent ?? null,
          parent_run_id: event.parent_run_id ?? null,
          message_id: event.message_id,
          started_ts: event.ts,
          input_message_id: event.input_message_id ?? null,
          start_cursor: cursor ?? null,
        });
        return message;
      }
      case "user-message": {
        if (this._byId.has(event.message_id)) return null;
        const message = {
          id: event.message_id,
          role: "user",
          run_id: event.run_id ?? null,
          agent: null,
          parent_run_id: null,
          input_message_id: null,
          parts: [{ type: "text", id: event.message_id, text: event.content }],
          status: null,
          status_text: null,
          reason: null,
          error: null,
          ts: event.ts,
        };
        this._add(message);
        return message;
      }
      default:
        return this._applyToRun(event);
    }
  }

  _applyToRun(event) {
    const message = event.run_id ? this._byRun.get(event.run_id) : undefined;
    if (message === undefined) return null;
    switch (event.type) {
      case "text-delta":
      case "reasoning-delta": {
        let part = message.parts.find((p) => (p.type === "text" || p.type === "reasoning") && p.id === event.part_id);
        if (part === undefined) {
          part = { type: event.type === "text-delta" ? "text" : "reasoning", id: event.part_id, text: "" };
          message.parts.push(part);
        }
        part.text += event.delta;
        return message;
      }
      case "tool-call":
        message.parts.push({
          type: "tool",
          call_id: event.call_id,
          name: event.name,
          input: event.input ?? null,
          state: "called",
          output: null,
          error: null,
        });
        return message;
      case "tool-result": {
        const tool = message.parts.find((p) => p.type === "tool" && p.call_id === event.call_id);
        if (tool === undefined) return null;
        tool.output = event.output ?? null;
        tool.error = event.error ?? null;
        tool.state = event.error != null ? "failed" : "completed";
        return message;
      }
      case "data":
        message.parts.push({ type: "data", name: event.name, value: event.value ?? null });
        return message;
      case "status":
        message.status_text = event.text;
        return message;
      case "error":
        message.error = event.message;
        return message;
      case "run-end":
        message.status = event.status;
        message.reason = event.reason ?? null;
        this.view.active_runs = this.view.active_runs.filter((run) => run.run_id !== message.run_id);
        return message;
      default:
        return null; // control-ack and event types this client does not know: passed on, not folded
    }
  }
}

/** The text of a message: its text parts joined (reasoning, tools and data left out). */
export function messageText(message) {
  return message.parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");
}

function defaultBase() {
  // The gateway serves this file at {prefix}/durable-ai.js: its folder is the gateway's prefix.
  return new URL(".", import.meta.url).href;
}

function defaultStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null; // storage disabled (a sandboxed frame, some private modes)
  }
}

function randomId() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * One session, followed through the gateway. An `EventTarget` that dispatches:
 *
 * - `event` (`detail: { event, cursor }`): every event, in order, as it arrives (unknown types too);
 * - `change` (`detail: { message, event }`): the view changed: `message` is the one that changed, or `null` when
 *   the whole view was replaced (opened, or rebuilt after a `reset`);
 * - `connection` (`detail: { state, attempt, delay, resumedAfter }`): the connection's state changed;
 * - `reset` (`detail: { event }`): the log was recreated or retention dropped events: the view starts again from
 *   the events that follow (the log from its earliest retained point);
 * - `error` (`detail: { error }`): a failure that is not a control's (refused access, a server error).
 */
export class DurableSession extends EventTarget {
  /**
   * @param {string} sessionId the session (letters, digits, `_` and `-`, 1 to 128)
   * @param {object} [options]
   * @param {string} [options.base] the gateway's prefix URL; by default the folder this file was served from
   * @param {string} [options.token] a session token, sent as `?token=` (see SessionTokens on the server)
   * @param {Storage|null} [options.storage] where the cursor and view are kept (default `localStorage`; `null`:
   *   nowhere, a reload reads the view again)
   * @param {{initial?: number, max?: number, factor?: number}} [options.backoff] reconnect delays in ms
   *   (default 250, doubling, at most 5000; each delay is jittered down by up to half)
   * @param {number} [options.ackTimeout] ms to wait for a control's acknowledgement (default 20000)
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class (default: the global one)
   * @param {typeof fetch} [options.fetch] the fetch function (default: the global one)
   */
  constructor(sessionId, options = {}) {
    super();
    if (typeof sessionId !== "string" || !SESSION_ID.test(sessionId)) {
      throw new DurableAIError("InvalidSessionId", `not a session id: ${JSON.stringify(sessionId)}`);
    }
    this.sessionId = sessionId;
    const base = options.base ?? defaultBase();
    this.base = new URL(base.endsWith("/") ? base : base + "/", globalThis.location?.href).href;
    this.token = options.token ?? null;
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.backoff = { initial: 250, max: 5000, factor: 2, ...(options.backoff ?? {}) };
    this.ackTimeout = options.ackTimeout ?? 20000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this._fold = new ViewFold(emptyView(sessionId));
    this._socket = null;
    this._state = "idle";
    this._attempt = 0;
    this._timer = null;
    this._saveTimer = null;
    this._closed = false;
    this._opened = false;
    this._pending = new Map(); // request id -> { frame, resolve, reject, timer, sent }
    this._onOnline = () => {
      if (this._state === "waiting") this._connectNow();
    };
    this._onPageHide = () => this.save();
    this._onVisibility = () => {
      if (globalThis.document?.visibilityState === "hidden") this.save();
    };
  }

  /** The session's view now (`messages`, `active_runs`, `cursor`), as `GET /sessions/{id}/view` shapes it. */
  get view() {
    return this._fold.view;
  }

  /** The cursor of the last event applied (`null`: none yet); the connection resumes after it. */
  get cursor() {
    return this._fold.view.cursor;
  }

  /** `idle`, `connecting`, `open`, `waiting` (to reconnect), or `closed`. */
  get state() {
    return this._state;
  }

  /** The key this session's cursor and view are kept under in `storage`. */
  get storageKey() {
    return `${STORAGE_PREFIX}${this.base}${this.sessionId}`;
  }

  /**
   * Start following: the view kept in `storage` (else the gateway's view; if that cannot be read, the log from its
   * start) first, then the live events after its cursor. Resolves once the view is there, and throws only when
   * access is refused (the connection opens on its own, and reopens when it drops).
   */
  async open() {
    if (this._opened) throw new DurableAIError("AlreadyOpen", "open() was already called");
    this._opened = true;
    const kept = this._restore();
    if (kept !== null) {
      this._replace(kept);
    } else {
      try {
        this._replace(await this.fetchView());
      } catch (error) {
        if (error.code === "PermissionDenied" || error.code === "InvalidSessionId") throw error;
        // The view could not be read (the server restarting, say): follow the log from its start instead, which
        // builds the same view; the connection retries with its backoff.
        this._emit("error", { error });
      }
    }
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("pagehide", this._onPageHide);
    globalThis.document?.addEventListener("visibilitychange", this._onVisibility);
    this._connectNow();
  }

  /** Stop following: the connection closes for good and controls not yet acknowledged fail (`Closed`). */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    this.save();
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("pagehide", this._onPageHide);
    globalThis.document?.removeEventListener("visibilitychange", this._onVisibility);
    const socket = this._socket;
    this._socket = null;
    if (socket !== null) socket.close(1000, "closed by the client");
    this._failPending("Closed", "the session was closed", true);
    this._setState("closed", {});
  }

  /**
   * Close the connection as a network failure would (a test of resilience, or a "reconnect" button): the
   * client reconnects with its backoff and resumes after its cursor. A dropped connection is never a cancel.
   */
  drop() {
    const socket = this._socket;
    if (socket !== null) socket.close(4000, "dropped by the client");
  }

  /** Forget what `storage` keeps for this session (the next `open()` reads the gateway's view). */
  forget() {
    try {
      this.storage?.removeItem(this.storageKey);
    } catch {
      // storage that refuses: nothing is kept anyway
    }
  }

  /** Keep the cursor and the view in `storage` now (done on its own a moment after events arrive). */
  save() {
    clearTimeout(this._saveTimer);
    this._saveTimer = null;
    if (!this.storage || !this._opened) return;
    const record = JSON.stringify({ v: STORAGE_VERSION, at: Date.now(), view: this.view });
    let others = null;
    for (;;) {
      try {
        this.storage.setItem(this.storageKey, record);
        return;
      } catch {
        // Over the quota: make room by dropping what other sessions keep, least recently saved first; when nothing
        // is left to drop, keep nothing for this one rather than a stale pair.
        others ??= this._othersOldestFirst();
        const key = others.shift();
        try {
          if (key === undefined) throw new Error("nothing left to drop");
          this.storage.removeItem(key);
        } catch {
          this.forget();
          return;
        }
      }
    }
  }

  /** The `storage` keys of other durable-ai sessions, least recently saved first (unreadable ones before all). */
  _othersOldestFirst() {
    const found = [];
    try {
      for (let index = 0; index < this.storage.length; index++) {
        const key = this.storage.key(index);
        if (key === null || !key.startsWith(STORAGE_PREFIX) || key === this.storageKey) continue;
        // The time is at the head of the record: read it there, without parsing the view after it.
        const head = SAVED_AT.exec(this.storage.getItem(key) ?? "");
        found.push({ key, at: head === null ? -Infinity : Number(head[1]) });
      }
    } catch {
      // storage that refuses to be listed: drop what was found
    }
    return found.sort((a, b) => (a.at === b.at ? 0 : a.at < b.at ? -1 : 1)).map((entry) => entry.key);
  }

  /** The gateway's view of the session (`GET {base}{id}/view`). */
  async fetchView() {
    let response;
    try {
      response = await this._fetch(this._url("view", {}), { headers: { accept: "application/json" } });
    } catch (error) {
      throw new DurableAIError("ConnectionLost", `the view could not be read: ${error.message}`);
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const code = body?.error ?? "HTTPError";
      throw new DurableAIError(code, body?.message ?? `GET view answered ${response.status}`);
    }
    return body;
  }

  /**
   * Ask the agent side to stop a run (`runId`; none: every active run). Resolves with the `control-ack`
   * (`outcome`: `applied`, `rejected` or `ignored`, and a `reason`).
   */
  cancel({ runId, reason } = {}) {
    return this.control({ type: "cancel", ...(runId ? { run_id: runId } : {}), ...(reason ? { reason } : {}) });
  }

  /** Send guidance into a working run (`runId`; none: every active run). Resolves with its `control-ack`. */
  steer(text, { runId } = {}) {
    return this.control({ type: "steer", text, ...(runId ? { run_id: runId } : {}) });
  }

  /** Send a user message to the agent serving the session. Resolves with its `control-ack`. */
  prompt(content, { messageId } = {}) {
    return this.control({ type: "prompt", content, ...(messageId ? { message_id: messageId } : {}) });
  }

  /**
   * Send a control frame (`{type, ...}`) and resolve with its acknowledgement. A control made while the
   * connection is down waits for it; one in flight when it drops fails with `ConnectionLost` (it may or may not
   * have reached the agent side: look at the session before sending it again).
   */
  control(frame) {
    if (this._closed) return Promise.reject(new DurableAIError("Closed", "the session was closed"));
    const request = randomId();
    return new Promise((resolve, reject) => {
      const entry = { frame: { ...frame, request }, resolve, reject, sent: false, timer: null };
      entry.timer = setTimeout(() => {
        this._pending.delete(request);
        reject(new DurableAIError("AckTimeout", `no acknowledgement of ${frame.type} in ${this.ackTimeout} ms`));
      }, this.ackTimeout);
      this._pending.set(request, entry);
      this._sendPending();
    });
  }

  // -- internals -------------------------------------------------------------------------------------------

  _url(path, query) {
    const url = new URL(`${encodeURIComponent(this.sessionId)}/${path}`, this.base);
    for (const [key, value] of Object.entries(query)) if (value != null) url.searchParams.set(key, value);
    if (this.token) url.searchParams.set("token", this.token);
    return url;
  }

  _restore() {
    if (!this.storage) return null;
    try {
      const record = JSON.parse(this.storage.getItem(this.storageKey) ?? "null");
      if (record?.v === STORAGE_VERSION && record.view?.session === this.sessionId) return record.view;
    } catch {
      // unreadable: read the gateway's view instead
    }
    return null;
  }

  _replace(view) {
    this._fold = new ViewFold(view);
    this._emit("change", { message: null, event: null });
  }

  _setState(state, detail) {
    this._state = state;
    this._emit("connection", { state, ...detail });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _connectNow() {
    clearTimeout(this._timer);
    this._timer = null;
    if (this._closed || this._socket !== null) return;
    const after = this.cursor;
    const socket = new this._WebSocket(this._url("ws", { after }).href.replace(/^http/, "ws"));
    this._socket = socket;
    this._setState("connecting", { attempt: this._attempt, resumedAfter: after });
    socket.onopen = () => {
      if (this._socket !== socket) return;
      this._attempt = 0;
      this._setState("open", { attempt: 0, resumedAfter: after });
      this._sendPending();
    };
    socket.onmessage = (message) => {
      if (this._socket === socket) this._receive(socket, message.data);
    };
    socket.onclose = () => {
      if (this._socket !== socket) return;
      this._socket = null;
      this._lost("dropped");
    };
  }

  _lost(why) {
    this._failPending("ConnectionLost", "the connection dropped before the acknowledgement", false);
    if (this._closed) return;
    if (why === "fatal") {
      this._closed = true;
      this._failPending("Closed", "the session was closed", true);
      this._setState("closed", {});
      return;
    }
    const { initial, max, factor } = this.backoff;
    const delay = Math.round(Math.min(max, initial * factor ** this._attempt) * (0.5 + Math.random() / 2));
    this._attempt += 1;
    this._setState("waiting", { attempt: this._attempt, delay });
    this._timer = setTimeout(() => this._connectNow(), delay);
  }

  _receive(socket, data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.kind === "event") {
      this._apply(socket, frame.event, frame.cursor ?? null);
    } else if (frame.kind === "ack") {
      const entry = this._pending.get(frame.request);
      if (entry === undefined) return;
      this._pending.delete(frame.request);
      clearTimeout(entry.timer);
      entry.resolve(frame.ack);
    } else if (frame.kind === "error") {
      const error = new DurableAIError(frame.error ?? "Error", frame.message ?? "");
      const entry = frame.request != null ? this._pending.get(frame.request) : undefined;
      if (entry !== undefined) {
        this._pending.delete(frame.request);
        clearTimeout(entry.timer);
        entry.reject(error);
      } else if (frame.request == null) {
        this._failed(socket, error);
      }
    }
  }

  _apply(socket, event, cursor) {
    if (event.type === "reset") {
      // What was kept no longer matches the log: start the view again from the events that follow on this same
      // connection (the log from its earliest retained point), so controls in flight keep their acks.
      this._fold = new ViewFold(emptyView(this.sessionId));
      this._fold.view.cursor = cursor;
      this._scheduleSave();
      this._emit("event", { event, cursor });
      this._emit("reset", { event });
      this._emit("change", { message: null, event });
      return;
    }
    const message = this._fold.apply(event, cursor);
    this._scheduleSave();
    this._emit("event", { event, cursor });
    if (message !== null) this._emit("change", { message, event });
  }

  _failed(socket, error) {
    // An error about the stream itself: refused access ends the session; a cursor the gateway cannot read is
    // dropped with the view it stood for; anything else is retried like a dropped connection.
    this._emit("error", { error });
    if (error.code === "InvalidCursor") {
      this._resync(socket);
      return;
    }
    this._socket = null;
    socket.onclose = null;
    socket.close(1000, "reconnecting");
    this._lost(error.code === "PermissionDenied" || error.code === "InvalidSessionId" ? "fatal" : "dropped");
  }

  async _resync(socket) {
    // The gateway cannot read the cursor: take its view and follow on from the view's cursor.
    this._socket = null;
    socket.onclose = null;
    socket.close(1000, "resynchronising");
    this._failPending("ConnectionLost", "the connection was reopened before the acknowledgement", false);
    this.forget();
    try {
      this._replace(await this.fetchView());
    } catch (error) {
      this._emit("error", { error });
      this._lost("dropped");
      return;
    }
    this._scheduleSave();
    this._connectNow();
  }

  _sendPending() {
    const socket = this._socket;
    if (socket === null || socket.readyState !== 1) return;
    for (const entry of this._pending.values()) {
      if (entry.sent) continue;
      entry.sent = true;
      socket.send(JSON.stringify(entry.frame));
    }
  }

  _failPending(code, message, all) {
    for (const [request, entry] of this._pending) {
      if (!all && !entry.sent) continue; // not sent yet: it waits for the next connection
      this._pending.delete(request);
      clearTimeout(entry.timer);
      entry.reject(new DurableAIError(code, message));
    }
  }

  _scheduleSave() {
    if (!this.storage || this._saveTimer !== null) return;
    this._saveTimer = setTimeout(() => this.save(), 200);
  }
}

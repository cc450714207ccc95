// The demo chat page: messages go out with POST /api/chat; the session is followed with durable-ai.js over the
// gateway's WebSocket, which also carries Stop (a typed cancel) and Steer, each resolved with its ack.
import { DurableSession, messageText } from "./sessions/durable-ai.js";

const SESSION_ID = /^[A-Za-z0-9_-]{1,128}$/;
const STOP_REASON = "stopped by the user";
const AGENT_STATES = { streaming: "working", completed: "completed", cancelled: "cancelled", failed: "failed" };

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const messageBox = $("message");
const sendButton = $("send");
const stopButton = $("stop");
const steerBox = $("steer");
const steerButton = $("steer-button");
const notice = $("notice");

function randomHex(bytes) {
  const values = new Uint8Array(bytes);
  crypto.getRandomValues(values);
  return Array.from(values, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sessionFromUrl() {
  const url = new URL(location.href);
  const requested = url.searchParams.get("session");
  if (requested !== null) return requested;
  const created = `chat-${randomHex(8)}`;
  url.searchParams.set("session", created);
  history.replaceState(null, "", url);
  return created;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(text) {
  notice.textContent = text;
}

// -- rendering ----------------------------------------------------------------------------------------------

const rendered = new Map(); // message id -> its element

function renderAll(view) {
  rendered.clear();
  for (const node of conversation.querySelectorAll(".message")) node.remove();
  for (const message of view.messages) renderMessage(message);
  $("empty").hidden = view.messages.length > 0;
}

function renderMessage(message) {
  let node = rendered.get(message.id);
  if (message.role === "user") {
    if (node === undefined) {
      node = element("div", "message user");
      node.append(element("span", "who", "You"), element("p", "text"));
      node.dataset.message = message.id;
      add(node);
    }
    node.querySelector(".text").textContent = messageText(message);
    return;
  }
  if (node === undefined) {
    node = element("article", "message assistant");
    node.dataset.message = message.id;
    node.dataset.run = message.run_id ?? "";
    if (message.parent_run_id) node.classList.add("sub-agent");
    const header = element("header");
    header.append(element("span", "who", message.agent ?? "assistant"), element("span", "progress"));
    node.append(header, element("div", "parts"), element("footer", "outcome"));
    node.setAttribute("aria-label", `${message.agent ?? "assistant"}'s answer`);
    add(node);
  }
  node.dataset.status = message.status ?? "streaming";
  node.querySelector(".progress").textContent = message.status === "streaming" ? (message.status_text ?? "") : "";
  renderParts(node.querySelector(".parts"), message);
  node.querySelector(".outcome").textContent = outcome(message);
}

function add(node) {
  $("empty").hidden = true;
  conversation.append(node);
  rendered.set(node.dataset.message, node);
}

function atBottom() {
  return conversation.scrollTop + conversation.clientHeight >= conversation.scrollHeight - 40;
}

function renderParts(container, message) {
  message.parts.forEach((part, index) => {
    const key = part.type === "tool" ? `tool:${part.call_id}` : part.id ? `${part.type}:${part.id}` : `data:${index}`;
    let node = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (node === null) {
      node = partElement(part);
      node.dataset.key = key;
      container.append(node);
    }
    updatePart(node, part);
  });
}

function partElement(part) {
  if (part.type === "reasoning") {
    const details = element("details", "reasoning");
    details.append(element("summary", "", "Reasoning"), element("p", "reasoning-text"));
    return details;
  }
  if (part.type === "tool") return element("p", "tool");
  if (part.type === "data") return element("p", "data");
  return element("p", "text");
}

function updatePart(node, part) {
  if (part.type === "reasoning") {
    node.querySelector(".reasoning-text").textContent = part.text;
  } else if (part.type === "tool") {
    const query = part.input && typeof part.input === "object" ? part.input.query : undefined;
    let text = `Tool ${part.name}${query ? ` “${query}”` : ""}`;
    if (part.state === "called") text += ": running…";
    else if (part.state === "failed") text += `: failed (${part.error})`;
    else {
      const titles = part.output && Array.isArray(part.output.titles) ? part.output.titles : null;
      text += titles ? `: ${titles.length} results (${titles.join("; ")})` : ": done";
    }
    node.textContent = text;
  } else if (part.type === "data") {
    node.textContent = `${part.name}: ${JSON.stringify(part.value)}`;
  } else {
    node.textContent = part.text;
  }
}

function outcome(message) {
  if (message.status === "completed") return "Completed";
  if (message.status === "cancelled") return `Cancelled${message.reason ? `: ${message.reason}` : ""}`;
  if (message.status === "failed") return `Failed${message.error ? `: ${message.error}` : ""}`;
  return "Streaming…";
}

function renderAgents(view) {
  const latest = new Map(); // agent -> its latest message
  for (const message of view.messages) {
    if (message.role === "assistant") latest.set(message.agent ?? "assistant", message);
  }
  const list = $("agent-list");
  list.replaceChildren(
    ...Array.from(latest, ([agent, message]) => {
      const item = element("li");
      item.dataset.status = message.status ?? "streaming";
      const state = AGENT_STATES[message.status ?? "streaming"] ?? message.status;
      const detail = message.status === "streaming" && message.status_text ? `: ${message.status_text}` : "";
      item.append(element("strong", "", agent), document.createTextNode(` ${state}${detail}`));
      return item;
    }),
  );
  $("no-agents").hidden = latest.size > 0;
}

// -- controls -----------------------------------------------------------------------------------------------

let stopping = false;

function answering(view) {
  // The run Stop and Steer are for: the latest active run that answers the user (not a sub-agent).
  const top = view.active_runs.filter((run) => !run.parent_run_id);
  return top.length ? top[top.length - 1] : null;
}

function renderControls(view) {
  const run = answering(view);
  stopButton.disabled = stopping || run === null;
  steerButton.disabled = run === null;
  stopButton.textContent = stopping ? "stopping…" : "Stop";
  $("cursor").textContent = view.cursor ?? "none yet";
}

async function send(session, text) {
  const body = {
    id: session.sessionId,
    messages: [{ id: `msg-${randomHex(8)}`, role: "user", parts: [{ type: "text", text }] }],
    trigger: "submit-message",
  };
  sendButton.disabled = true;
  try {
    const response = await fetch("api/chat", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      say(`The message was not sent: ${error.message ?? response.status}`);
      return;
    }
    // The answer runs on without this response: the page follows it through the session.
    await response.body?.cancel();
    messageBox.value = "";
    say("");
  } catch (error) {
    say(`The message was not sent: ${error.message}`);
  } finally {
    sendButton.disabled = false;
  }
}

async function stop(session) {
  const run = answering(session.view);
  if (run === null || stopping) return;
  stopping = true;
  renderControls(session.view);
  try {
    const ack = await session.cancel({ runId: run.run_id, reason: STOP_REASON });
    if (ack.outcome !== "applied") say(`Stop was ${ack.outcome}${ack.reason ? `: ${ack.reason}` : ""}`);
  } catch (error) {
    say(`Stop did not get through (${error.code ?? error.message}): press it again`);
  } finally {
    stopping = false;
    renderControls(session.view);
  }
}

async function steer(session, text) {
  const run = answering(session.view);
  if (run === null) return;
  try {
    const ack = await session.steer(text, { runId: run.run_id });
    say(`Steer ${ack.outcome}${ack.reason ? `: ${ack.reason}` : ""}`);
    if (ack.outcome === "applied") steerBox.value = "";
  } catch (error) {
    say(`Steer did not get through (${error.code ?? error.message})`);
  }
}

// -- the connection -----------------------------------------------------------------------------------------

let opens = 0;

function renderConnection({ state, delay, resumedAfter }) {
  const line = $("connection");
  line.dataset.state = state;
  if (state === "open") {
    opens += 1;
    const from = resumedAfter ? `, resumed after cursor ${resumedAfter}` : ", from the start";
    const again = opens - 1;
    line.textContent = again > 0 ? `Reconnected ${again} time${again > 1 ? "s" : ""}${from}` : `Live${from}`;
  } else if (state === "waiting") {
    line.textContent = `Connection lost: reconnecting in ${(delay / 1000).toFixed(1)} s…`;
  } else if (state === "connecting") {
    line.textContent = opens > 0 ? "Reconnecting…" : "Connecting…";
  } else if (state === "closed") {
    line.textContent = "Closed";
  }
}

// -- start --------------------------------------------------------------------------------------------------

async function main() {
  const id = sessionFromUrl();
  $("session-id").textContent = id;
  if (!SESSION_ID.test(id)) {
    say(`“${id}” is not a session id: use letters, digits, “_” and “-” (at most 128).`);
    $("connection").textContent = "Not connected";
    return;
  }
  const newTab = new URL(location.href);
  newTab.search = new URLSearchParams({ session: id }).toString();
  $("new-tab").href = newTab.href;

  const session = new DurableSession(id);
  session.addEventListener("change", ({ detail }) => {
    const follow = detail.message === null || atBottom(); // keep the newest text in sight, unless scrolled up
    if (detail.message === null) renderAll(session.view);
    else renderMessage(detail.message);
    if (follow) conversation.scrollTop = conversation.scrollHeight;
    renderAgents(session.view);
    renderControls(session.view);
  });
  session.addEventListener("event", () => {
    $("cursor").textContent = session.cursor ?? "none yet";
  });
  session.addEventListener("connection", ({ detail }) => renderConnection(detail));
  session.addEventListener("reset", ({ detail }) => say(`The session was reset: ${detail.event.reason}`));
  session.addEventListener("error", ({ detail }) => say(`${detail.error.code}: ${detail.error.message}`));

  $("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = messageBox.value.trim();
    if (text) send(session, text);
  });
  messageBox.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("send-form").requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => stop(session));
  $("steer-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = steerBox.value.trim();
    if (text) steer(session, text);
  });
  $("drop").addEventListener("click", () => session.drop());

  try {
    await session.open();
  } catch (error) {
    say(`The session could not be opened: ${error.message}`);
    $("connection").textContent = "Not connected";
  }
}

main();

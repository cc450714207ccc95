// Reads one durable-ai session from the Ably emulator with ably-js, configured as a browser app would be, and
// prints what it got as JSON lines on stdout (run by tests/ably/test_ably_js.py).
//
//   ABLY_CLIENT_TOKEN='<TokenRequest JSON or JWT>' node read_session.mjs --port 8765 --channel ai:chat-42 --runs 2
//
// Options: --host (default 127.0.0.1), --port (the emulator's), --channel (the session's events channel), --runs
// (exit 0 once this many run-end events were seen, from history and live; default 1), --timeout (ms, default
// 10000), --msgpack (the binary protocol, ably-js's default on Node; without it JSON, as browsers use). The
// credential comes from ABLY_CLIENT_TOKEN: a TokenRequest (JSON object, from issue_client_token) that ably-js
// exchanges at /keys/{keyName}/requestToken, or a JWT (from issue_client_jwt) used as the token.
//
// Lines: {"kind":"connected"}, {"kind":"attached"}, {"kind":"history","event":...} for each event before the
// attachment (oldest first), {"kind":"history-end"}, {"kind":"live","event":...} for each event received by the
// subscription, {"kind":"done"}. Events are deduplicated by id, as the docs' snippet does. Any connection or channel
// failure, or not seeing --runs run-ends within --timeout, prints "read_session: <reason>" on stderr and exits 1.

import { parseArgs } from "node:util";
import * as Ably from "ably";

const { values: args } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string" },
    channel: { type: "string" },
    runs: { type: "string", default: "1" },
    timeout: { type: "string", default: "10000" },
    msgpack: { type: "boolean", default: false },
  },
});

function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

let realtime = null;
let finishing = false;

async function finish(code, reason) {
  if (finishing) return;
  finishing = true;
  if (reason) process.stderr.write(`read_session: ${reason}\n`);
  else emit({ kind: "done" });
  if (realtime !== null && !["closed", "failed", "initialized"].includes(realtime.connection.state)) {
    const closed = new Promise((resolve) => realtime.connection.once(["closed", "failed"], resolve));
    realtime.close();
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
  }
  process.exit(code);
}

const port = Number(args.port);
const runs = Number(args.runs);
const timeoutMs = Number(args.timeout);
const rawCredential = process.env.ABLY_CLIENT_TOKEN;
if (!Number.isInteger(port) || port <= 0 || !args.channel || !(runs >= 0) || !(timeoutMs > 0) || !rawCredential) {
  process.stderr.write(
    "usage: ABLY_CLIENT_TOKEN=<TokenRequest JSON or JWT> node read_session.mjs --port PORT --channel NAME " +
      "[--host 127.0.0.1] [--runs 1] [--timeout 10000]\n",
  );
  process.exit(2);
}
// A TokenRequest is a JSON object; anything else is a JWT (or an Ably token) to use as it is.
const credential = rawCredential.trimStart().startsWith("{") ? JSON.parse(rawCredential) : rawCredential.trim();

const timer = setTimeout(() => {
  const state = realtime === null ? "not created" : realtime.connection.state;
  const error = realtime?.connection.errorReason;
  const why = error ? `; last error ${error.code} (${error.statusCode}): ${error.message}` : "";
  finish(1, `timed out after ${timeoutMs} ms: connection ${state}, ${seenRunEnds} of ${runs} run-end events${why}`);
}, timeoutMs);
timer.unref();

const seen = new Set();
let seenRunEnds = 0;

function handle(kind, message) {
  // One message holds NDJSON events; an append starts with a link line {"~":...} that is not an event.
  for (const line of String(message.data ?? "").split("\n")) {
    if (!line.trim() || line.startsWith('{"~":')) continue;
    const event = JSON.parse(line);
    if (event.type === "log-start" || event.type === "tombstone" || event.type === "fragment") continue;
    if (seen.has(event.id)) continue;
    seen.add(event.id);
    emit({ kind, action: message.action, serial: message.serial, event });
    if (event.type === "run-end") seenRunEnds += 1;
  }
}

function checkDone() {
  if (seenRunEnds >= runs) {
    clearTimeout(timer);
    finish(0);
  }
}

try {
  realtime = new Ably.Realtime({
    // The emulator instead of Ably: ably-js 2.x takes a host name as `endpoint` (REC1b2: a name with a dot, an IPv6
    // address or "localhost" is used as it is) and `port`/`tls` for both the WebSocket and REST; a host that is not
    // Ably's has no fallback hosts, and `fallbackHosts: []` makes sure of it.
    endpoint: args.host,
    port,
    tls: false,
    fallbackHosts: [],
    useBinaryProtocol: args.msgpack, // default JSON, as in a browser (ably-js prefers msgpack on Node only)
    authCallback: (_tokenParams, callback) => callback(null, credential), // a browser would fetch it from its server
    logLevel: 1,
    logHandler: (msg) => process.stderr.write(`ably-js: ${msg}\n`),
  });
  // Any failure is final here: ably-js would retry a refused token (disconnected, again every 15 s) or a lost
  // connection, but against the emulator either means the client cannot use it.
  let wasConnected = false;
  realtime.connection.on((change) => {
    const error = change.reason;
    const detail = error ? `${error.code} (${error.statusCode}): ${error.message}` : "no reason given";
    if (change.current === "connected") {
      wasConnected = true;
      emit({ kind: "connected", connectionId: realtime.connection.id, clientId: realtime.auth.clientId });
    } else if (["failed", "suspended"].includes(change.current)) {
      finish(1, `connection ${change.current}: ${detail}`);
    } else if (change.current === "disconnected") {
      finish(1, `${wasConnected ? "connection lost" : "could not connect"}: ${detail}`);
    }
  });

  let historyRead = false;
  const events = realtime.channels.get(args.channel);
  events.on("failed", (change) => {
    const error = change.reason;
    const detail = error ? `${error.code} (${error.statusCode}): ${error.message}` : "no reason given";
    // ably-js fails the channels of a failed connection before it reports the connection's state.
    finish(1, `${realtime.connection.state === "failed" ? "connection" : `channel ${args.channel}`} failed: ${detail}`);
  });
  // Subscribe first (this attaches), then read what came before the attachment, oldest first.
  await events.subscribe((message) => {
    handle("live", message);
    if (historyRead) checkDone();
  });
  emit({ kind: "attached", channel: args.channel, attachSerial: events.properties.attachSerial ?? null });
  let page = await events.history({ untilAttach: true });
  const earlier = [];
  for (;;) {
    earlier.push(...page.items);
    if (!page.hasNext()) break;
    page = await page.next();
  }
  for (const message of earlier.reverse()) handle("history", message);
  emit({ kind: "history-end", messages: earlier.length });
  historyRead = true;
  checkDone();
} catch (error) {
  clearTimeout(timer);
  finish(1, `${error?.code ? `${error.code} (${error.statusCode}): ` : ""}${error?.message ?? error}`);
}

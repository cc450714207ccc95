// Reads one durable-ai session from the Ably emulator with ably-js, configured as a browser app would be, prints
// what it got as JSON lines on stdout, and carries out commands read as JSON lines on stdin (run by
// tests/ably/test_ably_js.py).
//
//   ABLY_CLIENT_TOKEN='<TokenRequest JSON or JWT>' node read_session.mjs --port 8765 --channel ai:chat-42 --runs 2
//
// Options: --host (default 127.0.0.1), --port (the emulator's, or a proxy's in front of it), --channel (the
// session's events channel), --runs (exit 0 once this many run-end events were rendered; default 1; 0: only on the
// "exit" command), --timeout (ms, default 10000: then exit 1 whatever happens), --msgpack (the binary protocol,
// ably-js's default on Node; without it JSON, as browsers use), --rewind N (attach with the channel parameter
// rewind=N, e.g. "100" or "10s", and render what it brings instead of reading history). The credential comes from
// ABLY_CLIENT_TOKEN: a TokenRequest (JSON object, from issue_client_token) that ably-js exchanges at
// /keys/{keyName}/requestToken, or a JWT (from issue_client_jwt) used as the token.
//
// Joining a session, as Ably documents it for a gapless join: subscribe (this attaches), then read history with
// untilAttach (every page), render it oldest first, and only then the live messages that arrived meanwhile (kept
// in a buffer until history is handled), deduplicating events by id. Event lines of an append's message follow a
// link line {"~":...}, which is not an event.
//
// Lines out: {"kind":"connected"}, {"kind":"attached"}, {"kind":"buffered","events":[...]} for each live message
// received before history was handled (its events, not deduplicated), {"kind":"history","event":...} for each event
// rendered from history, {"kind":"history-end"}, {"kind":"live","event":...} for each event rendered from the
// subscription (rewind included), {"kind":"done"}; and one answer per command.
//
// Commands in (one JSON object a line; answers carry the same "cmd"):
//   {"cmd":"cancel","reason":"..."}          publish {v:1,id,type:"cancel",reason} on <channel>:control as the docs
//                                            do -> {"kind":"result","cmd":"cancel","ok":true,"id":"<control id>"}
//   {"cmd":"publish","channel":"...","name":"...","data":"..."}  -> {"kind":"result","cmd":"publish","ok":...}
//   {"cmd":"attach","channel":"..."}        -> {"kind":"result","cmd":"attach","ok":...}
//   {"cmd":"history","channel":"..."}       -> {"kind":"result","cmd":"history","ok":...,"messages":n}
//   {"cmd":"state","channel":"..."}         -> {"kind":"result","cmd":"state","state":"attached"}
//   {"cmd":"exit"}                          exit 0
// A refused command answers "ok":false with the error's "code" and "statusCode" and the process goes on.
//
// Any failure of the connection or of --channel, or --timeout passing, prints "read_session: <reason>" on stderr and
// exits 1.

import { parseArgs } from "node:util";
import * as Ably from "ably";
import { emit, serveCommands } from "./commands.mjs";

const { values: args } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string" },
    channel: { type: "string" },
    runs: { type: "string", default: "1" },
    timeout: { type: "string", default: "10000" },
    msgpack: { type: "boolean", default: false },
    rewind: { type: "string" },
  },
});

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
      "[--host 127.0.0.1] [--runs 1] [--timeout 10000] [--msgpack] [--rewind N]\n",
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

function eventsOf(message) {
  // One message holds NDJSON events; an append starts with a link line {"~":...} that is not an event.
  const events = [];
  for (const line of String(message.data ?? "").split("\n")) {
    if (!line.trim() || line.startsWith('{"~":')) continue;
    const event = JSON.parse(line);
    if (event.type === "log-start" || event.type === "tombstone" || event.type === "fragment") continue;
    events.push(event);
  }
  return events;
}

const seen = new Set();
let seenRunEnds = 0;

function render(kind, message) {
  for (const event of eventsOf(message)) {
    if (seen.has(event.id)) continue;
    seen.add(event.id);
    emit({ kind, action: message.action, serial: message.serial, event });
    if (event.type === "run-end") seenRunEnds += 1;
  }
  if (runs > 0 && seenRunEnds >= runs) {
    clearTimeout(timer);
    finish(0);
  }
}

function failure(error) {
  return { ok: false, code: error?.code ?? null, statusCode: error?.statusCode ?? null, message: String(error?.message ?? error) };
}

async function command(request) {
  const channelName = request.channel ?? args.channel;
  switch (request.cmd) {
    case "cancel": {
      const id = crypto.randomUUID();
      await realtime.channels.get(`${args.channel}:control`).publish("c", JSON.stringify({
        v: 1, id, type: "cancel", reason: request.reason ?? "user pressed stop",
      }));
      return { ok: true, id };
    }
    case "publish":
      await realtime.channels.get(channelName).publish(request.name ?? "e", request.data ?? "");
      return { ok: true };
    case "attach":
      await realtime.channels.get(channelName).attach();
      return { ok: true };
    case "history": {
      const page = await realtime.channels.get(channelName).history();
      return { ok: true, messages: page.items.length };
    }
    case "state":
      return { ok: true, state: realtime.channels.get(channelName).state };
    case "exit":
      clearTimeout(timer);
      finish(0);
      return null;
    default:
      return { ok: false, message: `unknown command ${request.cmd}` };
  }
}

serveCommands(command, failure);

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

  const rewind = args.rewind !== undefined;
  const events = realtime.channels.get(args.channel, rewind ? { params: { rewind: args.rewind } } : {});
  events.on("failed", (change) => {
    const error = change.reason;
    const detail = error ? `${error.code} (${error.statusCode}): ${error.message}` : "no reason given";
    // ably-js fails the channels of a failed connection before it reports the connection's state.
    finish(1, `${realtime.connection.state === "failed" ? "connection" : `channel ${args.channel}`} failed: ${detail}`);
  });
  // Live messages wait here until history is handled, so that the answer renders in order.
  let pending = rewind ? null : [];
  await events.subscribe((message) => {
    if (pending === null) return render("live", message);
    emit({ kind: "buffered", action: message.action, serial: message.serial, events: eventsOf(message) });
    pending.push(message);
  });
  emit({ kind: "attached", channel: args.channel, attachSerial: events.properties.attachSerial ?? null });
  if (!rewind) {
    // Subscribed first (that attached), now what came before the attachment: every page, then oldest first.
    let page = await events.history({ untilAttach: true });
    const earlier = [];
    for (;;) {
      earlier.push(...page.items);
      if (!page.hasNext()) break;
      page = await page.next();
    }
    for (const message of earlier.reverse()) render("history", message);
    emit({ kind: "history-end", messages: earlier.length, buffered: pending.length });
    const live = pending;
    pending = null;
    for (const message of live) render("live", message);
  }
} catch (error) {
  clearTimeout(timer);
  finish(1, `${error?.code ? `${error.code} (${error.statusCode}): ` : ""}${error?.message ?? error}`);
}

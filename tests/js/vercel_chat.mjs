// A chat client made of the Vercel AI SDK's own parts, driven over JSON lines (run by
// tests/integrations/test_vercel_js.py): it sends messages and resumes streams with the SDK's transports exactly as
// useChat does, assembles each stream with readUIMessageStream, and prints what the SDK gave it on stdout.
//
//   node vercel_chat.mjs --sdk ai6|ai7 [--timeout 20000]
//
// --sdk picks the SDK major (the packages ai6 = ai@6 and ai7 = ai@7 of package.json), imported at start. Transports:
// "http" is DefaultChatTransport({api: url}) (ai@6 and ai@7); "ws" is ai@7's WebSocketChatTransport({url, webSocket})
// with ws's WebSocket (Node 20 has no global one). One transport is made per kind and URL and kept, as useChat keeps
// its transport, so WebSocket requests share one connection until it is closed or lost (the next request opens a
// new one). --timeout (ms): then exit 1 whatever happens.
//
// Each chat keeps its UIMessage[] as useChat does: "send" appends the user's message ({id: generateId(), role:
// "user", parts: [{type: "text", text}]}) and sends the whole array with trigger "submit-message", and the assembled
// assistant message of each stream replaces the one with its id (or is appended), so a follow-up carries the chat.
//
// Commands in (one JSON object a line, carried out in order; each is answered by a "result" line with its "cmd" and
// "req"). "req" names a request (a stream) of the test's choosing:
//   {"cmd":"send","req":"r1","transport":"http"|"ws","url":"...","chat":"...","text":"..."}
//       transport.sendMessages(...) -> {"kind":"result","cmd":"send","req":"r1","ok":true,"messageId":"<user's>"}
//   {"cmd":"resume","req":"r2","transport":...,"url":...,"chat":...}
//       transport.reconnectToStream({chatId, abortSignal, ...}) -> {"kind":"result",...,"ok":true,"stream":true|false}
//       (false: the transport resolved null, nothing to resume)
//   {"cmd":"abort","req":"r1"}     abort the request's AbortSignal (what useChat's stop() does)
//   {"cmd":"cancel","req":"r1"}    cancel the reader of the request's readUIMessageStream (the page lets go of it)
//   {"cmd":"close","url":"..."}    close the WebSocket transport of url cleanly (transport.close(), code 1000)
//   {"cmd":"stop","url":"...","chat":"..."}
//       POST {url}/{chat}/stop with the body {} as a stop button would -> {..."ok":...,"status":200,"body":{...}}
//   {"cmd":"exit"}                 exit 0
// A command that fails answers "ok":false with the error's "name" and "message".
//
// Lines out: {"kind":"ready","sdk":"ai7","version":"7.0.173"} once the SDK is imported, then for each stream (a
// sent or resumed request), in the order the SDK gave them:
//   {"kind":"chunk","req":"r1","chunk":{...}}        each UI message chunk the transport's stream yields
//   {"kind":"message","req":"r1","message":{...}}    the assembled UIMessage after each update (readUIMessageStream)
//   {"kind":"error","req":"r1","name":"...","message":"..."}  each error readUIMessageStream reported (an error
//       chunk, a chunk that failed validation, a stream that failed); with terminateOnError the stream ends there
//   {"kind":"end","req":"r1","outcome":"done"|"error"|"cancelled"}  once the stream is over
// And {"kind":"unhandled","message":"..."} for a promise rejection nobody handled.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { emit, serveCommands } from "./commands.mjs";

const { values: args } = parseArgs({
  options: {
    sdk: { type: "string" },
    timeout: { type: "string", default: "20000" },
  },
});

function fail(reason) {
  process.stderr.write(`vercel_chat: ${reason}\n`);
  process.exit(1);
}

const timeoutMs = Number(args.timeout);
if (!["ai6", "ai7"].includes(args.sdk) || !(timeoutMs > 0)) {
  process.stderr.write("usage: node vercel_chat.mjs --sdk ai6|ai7 [--timeout 20000]\n");
  process.exit(2);
}
setTimeout(() => fail(`timed out after ${timeoutMs} ms`), timeoutMs).unref();
process.on("unhandledRejection", (reason) => {
  emit({ kind: "unhandled", message: String(reason?.stack ?? reason) });
});

const ai = await import(args.sdk);
const { WebSocket } = await import("ws");
const { DefaultChatTransport, readUIMessageStream, generateId } = ai;

const transports = new Map(); // "<kind> <url>" -> the transport
const chats = new Map(); // chat id -> UIMessage[]
const requests = new Map(); // req -> {abortController, reader}

function transportFor(kind, url) {
  const key = `${kind} ${url}`;
  if (!transports.has(key)) {
    if (kind === "http") {
      transports.set(key, new DefaultChatTransport({ api: url }));
    } else if (kind === "ws") {
      if (ai.WebSocketChatTransport === undefined) throw new Error(`${args.sdk} has no WebSocketChatTransport`);
      transports.set(key, new ai.WebSocketChatTransport({ url, webSocket: WebSocket }));
    } else {
      throw new Error(`unknown transport ${kind}`);
    }
  }
  return transports.get(key);
}

function messagesOf(chat) {
  if (!chats.has(chat)) chats.set(chat, []);
  return chats.get(chat);
}

function keep(chat, message) {
  // As useChat's state: the stream's message replaces the one with its id, or joins the chat.
  const messages = messagesOf(chat);
  const index = messages.findLastIndex((m) => m.id === message.id);
  if (index === -1) messages.push(message);
  else messages[index] = message;
}

function describe(error) {
  return { name: error?.name ?? "Error", message: String(error?.message ?? error) };
}

// Reads one stream to its end: every chunk as the transport yields it, then through readUIMessageStream.
async function pump(req, chat, stream, abortController) {
  const recorded = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        emit({ kind: "chunk", req, chunk });
        controller.enqueue(chunk);
      },
    }),
  );
  const messages = readUIMessageStream({
    stream: recorded,
    onError: (error) => emit({ kind: "error", req, ...describe(error) }),
    terminateOnError: true,
  });
  const reader = messages.getReader();
  const request = { abortController, reader, cancelled: false };
  requests.set(req, request);
  let outcome = "done";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      keep(chat, value);
      emit({ kind: "message", req, message: value });
    }
    if (request.cancelled) outcome = "cancelled";
  } catch {
    outcome = "error"; // reported by onError
  } finally {
    reader.releaseLock();
  }
  emit({ kind: "end", req, outcome });
}

async function command(request) {
  switch (request.cmd) {
    case "send": {
      const transport = transportFor(request.transport, request.url);
      const messages = messagesOf(request.chat);
      const user = { id: generateId(), role: "user", parts: [{ type: "text", text: request.text }] };
      messages.push(user);
      const abortController = new AbortController();
      requests.set(request.req, { abortController, reader: null });
      const stream = await transport.sendMessages({
        chatId: request.chat,
        messages: [...messages],
        abortSignal: abortController.signal,
        trigger: "submit-message",
        messageId: undefined,
        metadata: undefined,
        headers: undefined,
        body: undefined,
      });
      pump(request.req, request.chat, stream, abortController);
      return { ok: true, messageId: user.id };
    }
    case "resume": {
      const transport = transportFor(request.transport, request.url);
      const abortController = new AbortController();
      requests.set(request.req, { abortController, reader: null });
      const stream = await transport.reconnectToStream({
        chatId: request.chat,
        abortSignal: abortController.signal,
        metadata: undefined,
        headers: undefined,
        body: undefined,
      });
      if (stream === null) return { ok: true, stream: false };
      pump(request.req, request.chat, stream, abortController);
      return { ok: true, stream: true };
    }
    case "abort": {
      const known = requests.get(request.req);
      if (known === undefined) throw new Error(`no request ${request.req}`);
      known.abortController.abort();
      return { ok: true };
    }
    case "cancel": {
      const known = requests.get(request.req);
      if (known?.reader == null) throw new Error(`no stream for request ${request.req}`);
      known.cancelled = true;
      await known.reader.cancel();
      return { ok: true };
    }
    case "close": {
      const transport = transports.get(`ws ${request.url}`);
      if (transport === undefined) throw new Error(`no WebSocket transport for ${request.url}`);
      transport.close();
      return { ok: true };
    }
    case "stop": {
      const response = await fetch(`${request.url}/${encodeURIComponent(request.chat)}/stop`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: "{}",
      });
      const text = await response.text();
      return { ok: response.ok, status: response.status, body: text ? JSON.parse(text) : null };
    }
    case "exit":
      process.exit(0);
      return null;
    default:
      throw new Error(`unknown command ${request.cmd}`);
  }
}

serveCommands(command, (error) => ({ ok: false, ...describe(error) }), (request) => ({ req: request.req ?? null }));
const { version } = JSON.parse(readFileSync(new URL(`node_modules/${args.sdk}/package.json`, import.meta.url)));
emit({ kind: "ready", sdk: args.sdk, version });

// Runs an ably-js snippet (docs/backends/ably.md's, extracted by tests/ably/test_ably_js.py) as an app would, in
// Node, against the Ably emulator, and prints what it did as JSON lines on stdout.
//
//   ABLY_TOKEN_REQUEST='<TokenRequest JSON>' node run_snippet.mjs --snippet /tmp/snippet.mjs --port 8765 \
//     --channel ai:chat-42 [--msgpack] [--timeout 10000]
//
// The snippet is left as it is written; the harness only supplies what a page would: `fetch` answers a request for
// a relative URL (the app's token endpoint) with the TokenRequest from ABLY_TOKEN_REQUEST (other URLs go to the
// real fetch), `render(event)` prints the event, and its `import ... from "ably"` gets ably_shim.mjs, which adds
// the emulator's endpoint, port, tls=false, no fallback hosts and the protocol to every `new Realtime(...)`.
// The harness also watches --channel with a subscription of its own (added when the snippet gets that channel),
// so the test knows when live messages reached the client, whatever the snippet does with them.
//
// Lines out: {"kind":"fetch","url","method"} for each fetch of a relative URL, {"kind":"received","events":[...]}
// for each message on --channel (its events, not deduplicated), {"kind":"render","event":...} for each render(),
// {"kind":"ready"} once the snippet module has run to its end (its top-level awaits done), and one answer per
// command. Commands in (JSON lines): {"cmd":"call","name":"stop"} calls the snippet's export `name` and answers
// {"kind":"result","cmd":"call","ok":true}; {"cmd":"exit"} closes the client and exits 0. Anything the snippet
// throws, or --timeout passing, prints "run_snippet: <reason>" on stderr and exits 1.

import { register } from "node:module";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { emit, serveCommands } from "./commands.mjs";

const { values: args } = parseArgs({
  options: {
    snippet: { type: "string" },
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string" },
    channel: { type: "string" },
    timeout: { type: "string", default: "10000" },
    msgpack: { type: "boolean", default: false },
  },
});

const port = Number(args.port);
const timeoutMs = Number(args.timeout);
const tokenRequest = process.env.ABLY_TOKEN_REQUEST;
if (!args.snippet || !Number.isInteger(port) || port <= 0 || !args.channel || !(timeoutMs > 0) || !tokenRequest) {
  process.stderr.write(
    "usage: ABLY_TOKEN_REQUEST=<TokenRequest JSON> node run_snippet.mjs --snippet FILE --port PORT --channel NAME " +
      "[--host 127.0.0.1] [--msgpack] [--timeout 10000]\n",
  );
  process.exit(2);
}

const clients = [];

async function finish(code, reason) {
  if (reason) process.stderr.write(`run_snippet: ${reason}\n`);
  for (const realtime of clients) {
    if (["closed", "failed", "initialized"].includes(realtime.connection.state)) continue;
    const closed = new Promise((resolve) => realtime.connection.once(["closed", "failed"], resolve));
    realtime.close();
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
  }
  process.exit(code);
}

setTimeout(() => finish(1, `timed out after ${timeoutMs} ms`), timeoutMs).unref();
process.on("unhandledRejection", (error) => finish(1, `unhandled rejection: ${error?.stack ?? error}`));

function eventsOf(data) {
  const events = [];
  for (const line of String(data ?? "").split("\n")) {
    if (line.trim() && !line.startsWith('{"~":')) events.push(JSON.parse(line));
  }
  return events;
}

globalThis.snippetHarness = {
  clientOptions: { endpoint: args.host, port, tls: false, fallbackHosts: [], useBinaryProtocol: args.msgpack },
  created(realtime) {
    clients.push(realtime);
    const get = realtime.channels.get.bind(realtime.channels);
    let watched = false;
    realtime.channels.get = (name, options) => {
      const channel = get(name, options);
      if (name === args.channel && !watched) {
        watched = true;
        channel.subscribe((message) => emit({ kind: "received", action: message.action, events: eventsOf(message.data) }))
          .catch(() => {}); // the snippet's own subscribe reports a failure
      }
      return channel;
    };
  },
};

const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const url = String(input?.url ?? input);
  if (!url.startsWith("/")) return realFetch(input, init);
  emit({ kind: "fetch", url, method: init?.method ?? "GET" });
  return new Response(tokenRequest, { status: 200, headers: { "content-type": "application/json" } });
};
globalThis.render = (event) => emit({ kind: "render", event });

const snippetURL = pathToFileURL(args.snippet).href;
register(new URL("./snippet_hooks.mjs", import.meta.url), {
  data: { snippet: snippetURL, shim: new URL("./ably_shim.mjs", import.meta.url).href },
});

let snippet;
try {
  snippet = await import(snippetURL);
} catch (error) {
  await finish(1, `the snippet threw: ${error?.stack ?? error}`);
}
emit({ kind: "ready" });

serveCommands(
  async (request) => {
    if (request.cmd === "exit") {
      await finish(0); // exits
      return null;
    }
    await snippet[request.name]();
    return { ok: true };
  },
  (error) => ({ ok: false, code: error?.code ?? null, message: String(error?.message ?? error) }),
);

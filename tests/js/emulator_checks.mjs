// Checks of the Ably emulator with the real ably-js client; prints JSON lines on stdout (run by
// tests/ably/test_emulator_js.py).
//
//   ABLY_KEY=appId.keyId:secret node emulator_checks.mjs --port 8765 --check renew --auth jwt --renewals 2
//   ABLY_KEY=appId.keyId:secret node emulator_checks.mjs --port 8765 --check until-attach --channel ai:h
//
// --check renew: connects with an authCallback that gives tokens living --ttl ms (a TokenRequest signed with the key,
// or a JWT), attaches --channel and subscribes, and after --renewals renewals publishes "from-js" and waits for its
// echo. Lines: {"kind":"state",...} for every connection state change, {"kind":"token"} per token given,
// {"kind":"published","serial":...}, {"kind":"echo","data":...}, {"kind":"done"}.
//
// --check until-attach: attaches --channel, prints {"kind":"attached","attachSerial":...}, waits for a live message
// "after" (published once it is attached), then prints {"kind":"history","data":[...]} for history({untilAttach})
// and {"kind":"forwards","code":...} for the same with direction forwards (null if it was answered).
//
// Any failure prints "emulator_checks: <reason>" on stderr and exits 1.

import { createHmac } from "node:crypto";
import { parseArgs } from "node:util";
import * as Ably from "ably";

const { values: args } = parseArgs({
  options: {
    port: { type: "string" },
    check: { type: "string" },
    channel: { type: "string", default: "ai:checks" },
    auth: { type: "string", default: "token-request" },
    ttl: { type: "string", default: "1500" },
    renewals: { type: "string", default: "2" },
    timeout: { type: "string", default: "15000" },
  },
});

const emit = (record) => process.stdout.write(`${JSON.stringify(record)}\n`);
const key = process.env.ABLY_KEY ?? "";
const keyName = key.split(":")[0];
const secret = key.slice(keyName.length + 1);
const ttl = Number(args.ttl);
let realtime = null;

async function finish(code, reason) {
  if (reason) process.stderr.write(`emulator_checks: ${reason}\n`);
  else emit({ kind: "done" });
  if (realtime !== null && !["closed", "failed"].includes(realtime.connection.state)) {
    const closed = new Promise((resolve) => realtime.connection.once(["closed", "failed"], resolve));
    realtime.close();
    await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
  }
  process.exit(code);
}

setTimeout(() => finish(1, `timed out after ${args.timeout} ms`), Number(args.timeout)).unref();

const b64url = (value) => Buffer.from(value).toString("base64url");

function jwt() {
  // An Ably JWT as a server would sign it: HS256 with the key's secret, kid the key's name.
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT", kid: keyName }));
  const claims = b64url(
    JSON.stringify({ iat: now, exp: now + Math.max(1, Math.round(ttl / 1000)), "x-ably-capability": '{"*":["*"]}' }),
  );
  const signature = createHmac("sha256", secret).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${signature}`;
}

const signer = new Ably.Rest({ key, endpoint: "127.0.0.1", port: Number(args.port), tls: false, fallbackHosts: [] });

async function authCallback(_params, callback) {
  try {
    const token = args.auth === "jwt" ? jwt() : await signer.auth.createTokenRequest({ ttl });
    emit({ kind: "token" });
    callback(null, token);
  } catch (error) {
    callback(error, null);
  }
}

realtime = new Ably.Realtime({
  endpoint: "127.0.0.1",
  port: Number(args.port),
  tls: false,
  fallbackHosts: [],
  useBinaryProtocol: false,
  authCallback,
  logLevel: 1,
  logHandler: (msg) => process.stderr.write(`ably-js: ${msg}\n`),
});
realtime.connection.on((change) => {
  emit({
    kind: "state",
    current: change.current,
    connectionId: realtime.connection.id ?? null,
    code: change.reason?.code ?? null,
  });
  if (["failed", "suspended"].includes(change.current)) finish(1, `connection ${change.current}`);
});

const channel = realtime.channels.get(args.channel);

if (args.check === "renew") {
  let renewed = 0;
  let expired = false;
  let published = false;
  let pending = 2; // the publish's ACK and its echo, in either order
  const settle = () => {
    pending -= 1;
    if (pending === 0) finish(0);
  };
  await channel.subscribe((message) => {
    if (message.data === "from-js") {
      emit({ kind: "echo", data: message.data, connectionId: message.connectionId });
      settle();
    }
  });
  realtime.connection.on(async (change) => {
    if (change.current === "disconnected" && change.reason?.code === 40142) expired = true;
    if (change.current === "connected" && expired) {
      expired = false;
      renewed += 1;
      if (renewed >= Number(args.renewals) && !published) {
        published = true;
        await channel.whenState("attached");
        const result = await channel.publish("n", "from-js");
        emit({ kind: "published", serial: result?.serials?.[0] ?? null });
        settle();
      }
    }
  });
} else if (args.check === "until-attach") {
  let release;
  const after = new Promise((resolve) => {
    release = resolve;
  });
  await channel.subscribe((message) => {
    if (message.data === "after") release();
  });
  emit({ kind: "attached", attachSerial: channel.properties.attachSerial ?? null });
  await after;
  const page = await channel.history({ untilAttach: true });
  emit({ kind: "history", data: page.items.map((m) => m.data) });
  let code = null;
  try {
    await channel.history({ untilAttach: true, direction: "forwards" });
  } catch (error) {
    code = error.code ?? -1;
  }
  emit({ kind: "forwards", code });
  finish(0);
} else {
  finish(1, `unknown --check ${args.check}`);
}

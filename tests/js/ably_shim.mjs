// ably-js as the docs' snippet imports it under run_snippet.mjs: the same module, except that `Realtime` adds the
// options that point it at the emulator (the snippet, written for Ably, has none) and reports each client it
// creates to the harness (globalThis.snippetHarness).

import * as Ably from "ably";

export * from "ably";

export class Realtime extends Ably.Realtime {
  constructor(options) {
    const harness = globalThis.snippetHarness;
    super({ ...options, ...harness.clientOptions });
    harness.created(this);
  }
}

export default { ...Ably.default, Realtime };

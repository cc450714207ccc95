// Module hooks for run_snippet.mjs: the snippet's `import ... from "ably"` gets ably_shim.mjs, every other import
// (the shim's own "ably" included) resolves as usual.

let snippet = null;
let shim = null;

export async function initialize(data) {
  ({ snippet, shim } = data);
}

export async function resolve(specifier, context, nextResolve) {
  if (specifier === "ably" && context.parentURL === snippet) return { url: shim, shortCircuit: true };
  return nextResolve(specifier, context);
}

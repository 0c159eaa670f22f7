import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { test } from "node:test";
import vm from "node:vm";

import DjangoWs, * as esm from "django-uwsgi-ws";

const require = createRequire(import.meta.url);
const CLASSIC = require.resolve("django-uwsgi-ws/classic");
const MINIFIED = require.resolve("django-uwsgi-ws/min");
const NAMES = Object.keys(esm).filter((n) => n !== "default").sort();

/** Run a classic script as a page would, in a fresh global scope; return that scope. */
function runAsScript(path) {
  const window = { WebSocket: class {}, URL, TextDecoder, location: { href: "https://example.com/" } };
  window.window = window;
  const context = vm.createContext(window);
  const before = new Set(Object.getOwnPropertyNames(context));
  new vm.Script(readFileSync(path, "utf8"), { filename: path }).runInContext(context); // no import/export allowed
  const added = Object.getOwnPropertyNames(context).filter((name) => !before.has(name));
  return { context, added };
}

test("the ES module imports nothing and sets no global", () => {
  const source = readFileSync(new URL(import.meta.resolve("django-uwsgi-ws")), "utf8");
  assert.doesNotMatch(source, /^import\b/m);
  assert.doesNotMatch(source, /\b(globalThis|window|self|root)\.DjangoWs\s*=/);
  assert.equal(globalThis.DjangoWs, undefined);
});

test("the default export holds the named exports", () => {
  assert.deepEqual(Object.keys(DjangoWs).sort(), NAMES);
  for (const name of NAMES) assert.equal(DjangoWs[name], esm[name], name);
});

for (const [label, path] of [["django_ws.js", CLASSIC], ["django_ws.min.js", MINIFIED]]) {
  test(`as a plain <script>, ${label} defines window.DjangoWs and nothing else, with every export`, () => {
    const { context, added } = runAsScript(path);
    assert.deepEqual(added, ["DjangoWs"]);
    assert.deepEqual(Object.keys(context.DjangoWs).sort(), NAMES);
    assert.equal(context.DjangoWs.buildUrl({ facility: "chat", subscribe: ["user"] }, context.location),
      "wss://example.com/ws/chat?subscribe-user");
    assert.equal(context.DjangoWs.backoffDelay(3, context.DjangoWs.DEFAULTS, () => 0.25),
      esm.backoffDelay(3, esm.DEFAULTS, () => 0.25));
    assert.equal(JSON.stringify(context.DjangoWs.CLOSE_CODES), JSON.stringify(esm.CLOSE_CODES));
  });
}

test("require() gives the classic build's API", () => {
  const cjs = require("django-uwsgi-ws");
  assert.deepEqual(Object.keys(cjs).sort(), NAMES);
  assert.equal(cjs.isTerminalClose(4100), true);
});

test("the type declarations name every export", () => {
  const dts = readFileSync(new URL("../dist/django_ws.d.ts", import.meta.url), "utf8");
  for (const name of NAMES) {
    assert.match(dts, new RegExp(`export (declare )?(function|class|const) ${name}\\b`), name);
  }
});

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { test } from "node:test";
import vm from "node:vm";

import DjangoWs, * as esm from "../../django_ws/static/django_ws/django_ws.mjs";

const SCRIPT = new URL("../../django_ws/static/django_ws/django_ws.js", import.meta.url);

test("as a plain <script>, django_ws.js defines window.DjangoWs and nothing else", () => {
  const source = readFileSync(SCRIPT, "utf8");
  const window = { WebSocket: class {}, URL, TextDecoder, location: { href: "https://example.com/" } };
  window.window = window;
  const context = vm.createContext(window);
  const before = new Set(Object.getOwnPropertyNames(context));
  new vm.Script(source, { filename: "django_ws.js" }).runInContext(context); // a classic script: no import/export
  const added = Object.getOwnPropertyNames(context).filter((name) => !before.has(name));
  assert.deepEqual(added, ["DjangoWs"]);
  assert.equal(typeof context.DjangoWs.connect, "function");
  assert.equal(context.DjangoWs.buildUrl({ facility: "chat", subscribe: ["user"] }, window.location),
    "wss://example.com/ws/chat?subscribe-user");
});

test("the ES module re-exports the same API, as named exports and as default", () => {
  const cjs = createRequire(import.meta.url)(SCRIPT.pathname);
  assert.equal(DjangoWs, cjs);
  const names = Object.keys(cjs).sort();
  assert.deepEqual(Object.keys(esm).filter((n) => n !== "default").sort(), names);
  for (const name of names) assert.equal(esm[name], cjs[name], name);
});

test("the type declarations name every export", () => {
  const dts = readFileSync(new URL("../../django_ws/static/django_ws/django_ws.d.ts", import.meta.url), "utf8");
  for (const name of Object.keys(esm).filter((n) => n !== "default")) {
    assert.match(dts, new RegExp(`export (declare )?(function|class|const) ${name}\\b`), name);
  }
});

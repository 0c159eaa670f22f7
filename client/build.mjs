#!/usr/bin/env node
// Build the browser client's classic script and minified build from its ES module.
//
//   node client/build.mjs           write django_ws.js and django_ws.min.js beside
//                                   django_ws.mjs (django_ws/static/django_ws/), then
//                                   copy the four files into client/dist/ for npm
//   node client/build.mjs --check   the same, except that it fails, writing nothing
//                                   under django_ws/static/, when the committed builds
//                                   are not what the module gives
//
// The static directory is the one source: the Python package serves those files, and
// the npm package ships a copy of them. The minifier (terser) comes from
// client/node_modules (npm ci); its version is pinned by package-lock.json, so a build
// is reproducible and --check can compare bytes.
import { createRequire } from "node:module";
import { mkdirSync, readFileSync, writeFileSync, copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const STATIC = join(HERE, "..", "django_ws", "static", "django_ws");
const DIST = join(HERE, "dist");
const FILES = ["django_ws.mjs", "django_ws.js", "django_ws.min.js", "django_ws.d.ts"];

/** Return the names of `export { ... };` and the module's body without its exports. */
export function splitModule(source) {
  const list = /^export \{\n([^}]*)\};\n/m.exec(source);
  if (!list) throw new Error("django_ws.mjs: no `export { ... };` list");
  const names = list[1].split(",").map((n) => n.trim()).filter(Boolean);
  let body = source.replace(list[0], "").replace(/^export default \{\n[^}]*\};\n/m, "");
  const stray = /^export\b.*$/m.exec(body);
  if (stray) throw new Error(`django_ws.mjs: only the export lists may export, not: ${stray[0]}`);
  const banner = /^\/\*![\s\S]*?\*\/\n/.exec(body);
  if (banner) body = body.slice(banner[0].length);
  return { names, body: body.trim() };
}

/** The classic script: the module's body in a function, its API on `DjangoWs` (or module.exports). */
export function classic(source) {
  const { names, body } = splitModule(source);
  const indented = body.split("\n").map((line) => (line ? "  " + line : line)).join("\n");
  return `/*!
 * django_ws.js - the browser client of django-uwsgi-ws, as a classic script:
 *   <script src="{% static 'django_ws/django_ws.js' %}"></script>
 *   const conn = DjangoWs.connect({facility: "chat", subscribe: ["broadcast"]});
 * Built from django_ws.mjs by client/build.mjs: edit that file, not this one.
 */
(function (root, factory) {
  "use strict";
  var api = factory();
  if (typeof module === "object" && module && module.exports) module.exports = api;
  else if (root) root.DjangoWs = api;
})(typeof globalThis !== "undefined" ? globalThis : this, function () {
  "use strict";

${indented}

  return {
${names.map((n) => `    ${n}: ${n},`).join("\n")}
  };
});
`;
}

export async function minified(script) {
  const require = createRequire(join(HERE, "package.json"));
  const { minify } = require("terser");
  const result = await minify(script, {
    compress: { passes: 2 },
    mangle: true,
    format: { comments: false, preamble: "/*! django_ws.min.js - django-uwsgi-ws browser client, built from django_ws.mjs */" },
  });
  return result.code + "\n";
}

async function main() {
  const check = process.argv.includes("--check");
  const module = readFileSync(join(STATIC, "django_ws.mjs"), "utf8");
  const script = classic(module);
  const built = { "django_ws.js": script, "django_ws.min.js": await minified(script) };
  const stale = [];
  for (const [name, text] of Object.entries(built)) {
    const path = join(STATIC, name);
    let committed = null;
    try {
      committed = readFileSync(path, "utf8");
    } catch {
      // not built yet
    }
    if (committed === text) continue;
    if (check) stale.push(name);
    else writeFileSync(path, text);
  }
  if (stale.length) {
    console.error(`stale builds in django_ws/static/django_ws/: ${stale.join(", ")}; run: node client/build.mjs`);
    process.exit(1);
  }
  mkdirSync(DIST, { recursive: true });
  for (const name of FILES) copyFileSync(join(STATIC, name), join(DIST, name));
  for (const name of FILES.slice(0, 3)) {
    const bytes = readFileSync(join(STATIC, name));
    console.log(`${name}: ${bytes.length} bytes`);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();

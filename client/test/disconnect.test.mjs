import assert from "node:assert/strict";
import { test } from "node:test";

import { connect, isTerminalClose } from "django-uwsgi-ws";
import { fakeEnv, fakeEventSourceClass, record } from "./fakes.mjs";

const TARGET = { url: "ws://h/ws/chat", subscribe: ["user"] };

function greet(ws) {
  ws.open();
  ws.receive({ type: "subscribed", channel: "user", offset: 0, epoch: "", recovered: null });
  ws.receive({ type: "ready" });
}

test("4100-4199 are the codes after which the client stays away", () => {
  assert.equal(isTerminalClose(4100), true);
  assert.equal(isTerminalClose(4199), true);
  for (const code of [1000, 1006, 1008, 1012, 1013, 4008, 4009, 4010, 4099, 4200, undefined]) {
    assert.equal(isTerminalClose(code), false, String(code));
  }
});

test("a logout's close (4100) ends the connection for good and says so", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["close", "disconnected", "reconnecting", "status"]);
  greet(env.WebSocket.last);
  events.length = 0;
  env.WebSocket.last.serverClose(4100, "session ended");
  assert.deepEqual(events, [
    ["close", { code: 4100, reason: "session ended", wasClean: true, willReconnect: false }],
    ["status", "closed"],
    ["disconnected", { code: 4100, reason: "session ended" }],
  ]);
  assert.equal(conn.status, "closed");
  assert.equal(env.clock.pending, 0, "no timer left");
  env.network.goOffline();
  env.network.goOnline();
  env.clock.advance(24 * 3600 * 1000);
  assert.equal(env.WebSocket.instances.length, 1, "never reconnected with the old identity");
});

test("other codes of disconnect() make the client come back for fresh rights", () => {
  for (const code of [4200, 4010]) {
    const env = fakeEnv();
    const conn = connect(TARGET, env.options);
    const events = record(conn, ["disconnected", "reconnecting"]);
    greet(env.WebSocket.last);
    env.WebSocket.last.serverClose(code, "rights changed");
    assert.deepEqual(events.map(([name]) => name), ["reconnecting"], String(code));
    env.clock.advance(1000);
    assert.equal(env.WebSocket.instances.length, 2, String(code));
    conn.close();
  }
});

test("an event stream's close event with 4100 stops the fallback transport too", () => {
  const env = fakeEnv();
  env.EventSource = fakeEventSourceClass();
  const conn = connect(TARGET, { ...env.options, transport: "sse", EventSource: env.EventSource });
  const events = record(conn, ["disconnected"]);
  const es = env.EventSource.last;
  es.open();
  es.emit("ready", '{"type":"ready"}');
  es.emit("close", '{"type":"close","code":4100,"reason":"bye"}');
  es.fail();
  assert.deepEqual(events, [["disconnected", { code: 4100, reason: "bye" }]]);
  assert.equal(conn.status, "closed");
  env.clock.advance(24 * 3600 * 1000);
  assert.equal(env.EventSource.instances.length, 1);
});

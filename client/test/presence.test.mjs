import assert from "node:assert/strict";
import { test } from "node:test";

import { buildUrl, connect, presenceUrl } from "django-uwsgi-ws";
import { fakeEnv, fakeFetch, record, settle } from "./fakes.mjs";

const TARGET = { url: "ws://h/ws/chat", subscribe: ["group"], presence: true };

function greet(ws) {
  ws.open();
  ws.receive({ type: "subscribed", channel: "group:red", offset: 0, epoch: "", recovered: null });
  ws.receive({ type: "ready" });
}

test("presence: true asks for join and leave events", () => {
  assert.equal(buildUrl({ facility: "chat", subscribe: ["broadcast"], presence: true }, { href: "http://h/" }),
    "ws://h/ws/chat?subscribe-broadcast&presence");
});

test("join and leave frames become events of the same names", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["join", "leave"]);
  greet(env.WebSocket.last);
  env.WebSocket.last.receive({ type: "join", channel: "group:red", user: "alice", info: { name: "Alice" } });
  env.WebSocket.last.receive({ type: "leave", channel: "group:red", user: "alice" });
  env.WebSocket.last.receive({ type: "join", channel: "group:red" }); // no user: ignored
  assert.deepEqual(events, [
    ["join", { channel: "group:red", user: "alice", info: { name: "Alice" } }],
    ["leave", { channel: "group:red", user: "alice" }],
  ]);
});

test("an unsubscribed channel is not recovered on reconnection", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["unsubscribed"]);
  greet(env.WebSocket.last);
  env.WebSocket.last.receive({ type: "message", channel: "group:red", offset: 3, epoch: "e", data: "x" });
  assert.deepEqual(conn.positions(), { "group:red": [3, "e"] });
  env.WebSocket.last.receive({ type: "unsubscribed", channel: "group:red" });
  assert.deepEqual(events, [["unsubscribed", { channel: "group:red" }]]);
  assert.deepEqual(conn.positions(), {});
});

test("presence(channel) GETs the facility URL and resolves to the roster", async () => {
  const roster = { channel: "group:red", members: [{ user: "alice", connections: 2, since: 1, info: null }],
    users: 1, anonymous: 0, connections: 2 };
  const fetch = fakeFetch(() => ({ status: 200, text: JSON.stringify(roster) }));
  const env = fakeEnv();
  const conn = connect(TARGET, { ...env.options, fetch });
  assert.deepEqual(await conn.presence("group:red"), roster);
  assert.equal(fetch.calls[0].url, "http://h/ws/chat?presence=group%3Ared");
  assert.equal(fetch.calls[0].method, "GET");
  assert.equal(fetch.calls[0].credentials, "same-origin");
});

test("a refused presence() rejects with the HTTP status", async () => {
  const fetch = fakeFetch(() => ({ status: 403, text: "not allowed to subscribe to group:blue\n" }));
  const env = fakeEnv();
  const conn = connect(TARGET, { ...env.options, fetch });
  await assert.rejects(conn.presence("group:blue"), (error) => error.status === 403);
  await settle();
});

test("presenceUrl keeps the path and drops the query", () => {
  assert.equal(presenceUrl("wss://h/ws/chat?subscribe-user&recover=x#f", "user"), "https://h/ws/chat?presence=user");
  assert.throws(() => presenceUrl("ws://h/ws/chat", ""), TypeError);
});

import assert from "node:assert/strict";
import { test } from "node:test";

import { CLOSE_CODES, connect, isTerminalClose } from "django-uwsgi-ws";
import { fakeEnv, record, recoverOf } from "./fakes.mjs";

const TARGET = { url: "ws://h/ws/chat", subscribe: ["broadcast", "user"], publish: ["broadcast"] };

function binaryFrame(header, payload) {
  const head = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(2 + head.length + payload.length);
  out[0] = head.length >> 8;
  out[1] = head.length & 0xff;
  out.set(head, 2);
  out.set(payload, 2 + head.length);
  return out.buffer;
}

/** Open the current fake socket and complete the server's greeting. */
function greet(ws, subscribed = [], extra = {}) {
  ws.open();
  for (const s of subscribed) ws.receive({ type: "subscribed", recovered: null, ...s });
  ws.receive({ type: "ready", ...extra });
}

test("messages are decoded, text data is the JSON of the frame, binary frames are split", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["open", "message", "subscribed", "ready", "status"]);
  const ws = env.WebSocket.last;
  assert.equal(ws.url, "ws://h/ws/chat?subscribe-broadcast&subscribe-user&publish-broadcast");
  assert.equal(ws.binaryType, "arraybuffer");
  assert.equal(conn.status, "connecting");
  greet(ws, [{ channel: "broadcast", offset: 0, epoch: "" }]);
  ws.receive('{"type":"message","channel":"broadcast","offset":1,"epoch":"e","data":{"text":"hi"}}');
  ws.receive('{"type":"message","channel":"broadcast","offset":2,"epoch":"e","data":"{\\"not\\":\\"parsed\\"}"}');
  ws.receive(binaryFrame({ type: "message", channel: "user", offset: 4, epoch: "u" }, new Uint8Array([0, 1, 255])));
  ws.receive({ type: "heartbeat" });
  ws.receive({ type: "something-new" }); // ignored: forward compatible

  assert.deepEqual(events.map(([name]) => name), [
    "open", "subscribed", "status", "ready", "message", "message", "message",
  ]);
  assert.equal(conn.status, "connected");
  const messages = events.filter(([name]) => name === "message").map(([, m]) => m);
  assert.deepEqual(messages[0], { data: { text: "hi" }, channel: "broadcast", offset: 1, epoch: "e", binary: false });
  assert.equal(messages[1].data, '{"not":"parsed"}', "text published as text stays a string");
  assert.equal(messages[2].binary, true);
  assert.equal(messages[2].channel, "user");
  assert.ok(messages[2].data instanceof ArrayBuffer);
  assert.deepEqual([...new Uint8Array(messages[2].data)], [0, 1, 255]);
  assert.deepEqual(conn.positions(), { broadcast: [2, "e"], user: [4, "u"] });
  conn.close();
});

test("server error frames and undecodable frames become error events", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const errors = record(conn, ["error"]);
  const ws = env.WebSocket.last;
  greet(ws);
  ws.receive({ type: "error", error: "rate limit exceeded: message dropped" });
  ws.receive("not json");
  ws.receive('{"no":"type"}');
  ws.receive(new Uint8Array([0, 50, 1]).buffer);
  assert.deepEqual(errors.map(([, e]) => e.source), ["server", "protocol", "protocol", "protocol"]);
  assert.equal(errors[0][1].message, "rate limit exceeded: message dropped");
  assert.equal(conn.status, "connected", "a bad frame does not drop the connection");
  conn.close();
});

test("reconnection recovers from the last positions of message and subscribed frames", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["recovered", "notrecovered", "reconnecting", "close", "status"]);
  let ws = env.WebSocket.last;
  assert.equal(recoverOf(ws.url), undefined, "nothing to recover on the first connection");
  greet(ws, [{ channel: "broadcast", offset: 5, epoch: "b" }, { channel: "user", offset: 0, epoch: "" }]);
  ws.receive({ type: "message", channel: "broadcast", offset: 6, epoch: "b", data: 1 });
  ws.receive({ type: "message", channel: "broadcast", offset: 7, epoch: "b", data: 2 });

  ws.serverClose(4008, "slow consumer");
  assert.equal(conn.status, "reconnecting");
  assert.deepEqual(events.slice(-3).map(([name]) => name), ["close", "status", "reconnecting"]);
  assert.deepEqual(events.at(-3)[1], { code: 4008, reason: "slow consumer", wasClean: true, willReconnect: true });
  assert.deepEqual(events.at(-1)[1], { attempt: 1, delay: 500 });
  assert.equal(env.WebSocket.instances.length, 1, "waits for the backoff delay");
  env.clock.advance(499);
  assert.equal(env.WebSocket.instances.length, 1);
  env.clock.advance(1);
  assert.equal(env.WebSocket.instances.length, 2);
  ws = env.WebSocket.last;
  assert.deepEqual(recoverOf(ws.url), { broadcast: [7, "b"], user: [0, ""] });
  assert.match(ws.url, /^ws:\/\/h\/ws\/chat\?subscribe-broadcast&subscribe-user&publish-broadcast&recover=/);

  // the server replays 8 on broadcast, and cannot recover user (Redis lost it)
  ws.open();
  ws.receive({ type: "message", channel: "broadcast", offset: 8, epoch: "b", data: 3 });
  ws.receive({ type: "subscribed", channel: "broadcast", offset: 8, epoch: "b", recovered: true });
  ws.receive({ type: "subscribed", channel: "user", offset: 2, epoch: "u2", recovered: false });
  ws.receive({ type: "ready" });
  assert.deepEqual(
    events.filter(([name]) => name === "recovered" || name === "notrecovered"),
    [["recovered", { channel: "broadcast" }], ["notrecovered", { channel: "user" }]],
  );
  assert.deepEqual(conn.positions(), { broadcast: [8, "b"], user: [2, "u2"] }, "user reset to the server's position");

  ws.serverClose(1006);
  env.clock.advance(500);
  assert.deepEqual(recoverOf(env.WebSocket.last.url), { broadcast: [8, "b"], user: [2, "u2"] });
  conn.close();
});

test("duplicates (same epoch, offset already seen) are not delivered twice", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const messages = record(conn, ["message"]);
  const ws = env.WebSocket.last;
  greet(ws, [{ channel: "broadcast", offset: 3, epoch: "b" }]);
  for (const offset of [4, 4, 3, 5]) ws.receive({ type: "message", channel: "broadcast", offset, epoch: "b", data: offset });
  assert.deepEqual(messages.map(([, m]) => m.data), [4, 5]);
  conn.close();
});

test("a position the server was not given is reported as not recovered; channels no longer granted are forgotten", () => {
  const env = fakeEnv({ positions: { broadcast: [3, "b"], "group:left": [9, "g"] }, recover: false });
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["recovered", "notrecovered"]);
  const ws = env.WebSocket.last;
  assert.equal(recoverOf(ws.url), undefined, "recover: false sends no positions");
  greet(ws, [{ channel: "broadcast", offset: 6, epoch: "b" }, { channel: "user", offset: 0, epoch: "" }]);
  assert.deepEqual(events, [["notrecovered", { channel: "broadcast" }]]);
  assert.deepEqual(conn.positions(), { broadcast: [6, "b"], user: [0, ""] });
  conn.close();

  // `latest` replays a message before "subscribed" on a first connection: not a loss
  const env2 = fakeEnv();
  const conn2 = connect({ ...TARGET, latest: true }, env2.options);
  const events2 = record(conn2, ["message", "notrecovered"]);
  const ws2 = env2.WebSocket.last;
  ws2.open();
  ws2.receive({ type: "message", channel: "broadcast", offset: 6, epoch: "b", data: "last" });
  ws2.receive({ type: "subscribed", channel: "broadcast", offset: 6, epoch: "b", recovered: null });
  assert.deepEqual(events2.map(([name]) => name), ["message"]);
  conn2.close();
});

test("backoff grows over failed attempts, resets once the server is ready, and honours maxRetries", () => {
  const env = fakeEnv({ maxRetries: 4 });
  const conn = connect(TARGET, env.options);
  const delays = [];
  conn.on("reconnecting", (e) => delays.push([e.attempt, e.delay]));
  env.WebSocket.last.serverClose(1006);
  for (const delay of [500, 1000]) {
    env.clock.advance(delay);
    env.WebSocket.last.serverClose(1006);
  }
  assert.deepEqual(delays, [[1, 500], [2, 1000], [3, 2000]]);
  env.clock.advance(2000);
  greet(env.WebSocket.last);
  env.WebSocket.last.serverClose(1013, "try again later");
  assert.deepEqual(delays.at(-1), [1, 500], "attempts reset after ready");
  const closes = record(conn, ["close"]);
  for (const delay of [500, 1000, 2000, 4000]) {
    assert.equal(conn.status, "reconnecting");
    env.clock.advance(delay);
    env.WebSocket.last.serverClose(1006);
  }
  assert.equal(conn.status, "closed", "gave up after maxRetries failed attempts");
  assert.deepEqual(closes.map(([, e]) => e.willReconnect), [true, true, true, false]);
  assert.deepEqual(delays.at(-1), [4, 4000]);
  assert.equal(env.clock.pending, 0);
  const count = env.WebSocket.instances.length;
  env.clock.advance(10 * 60 * 1000);
  assert.equal(env.WebSocket.instances.length, count);
});

test("heartbeat watchdog: a silent socket is closed and replaced", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["close", "reconnecting"]);
  const ws = env.WebSocket.last;
  greet(ws);
  env.clock.advance(30000);
  ws.receive({ type: "heartbeat" }); // at 30 s: the deadline moves to 80 s
  env.clock.advance(49999);
  assert.equal(ws.closeCalls.length, 0);
  assert.equal(events.length, 0);
  env.clock.advance(1);
  assert.equal(ws.closeCalls.length, 1, "the dead socket is closed");
  assert.equal(ws.listening, false, "and no longer listened to");
  assert.deepEqual(events[0], ["close", { code: 1006, reason: "heartbeat timeout", wasClean: false, willReconnect: true }]);
  assert.equal(events[1][0], "reconnecting");
  assert.equal(conn.status, "reconnecting");
  ws.serverClose(1006); // the late close event of the old socket changes nothing
  assert.equal(events.length, 2);
  env.clock.advance(500);
  assert.equal(env.WebSocket.instances.length, 2);
  conn.close();
});

test("heartbeat watchdog also covers a handshake that never completes", () => {
  const env = fakeEnv({ heartbeatTimeout: 10000 });
  const conn = connect(TARGET, env.options);
  env.clock.advance(9999);
  assert.equal(env.WebSocket.last.closeCalls.length, 0);
  env.clock.advance(1);
  assert.equal(env.WebSocket.last.closeCalls.length, 1);
  assert.equal(conn.status, "reconnecting");
  conn.close();
});

test("the watchdog follows the heartbeat a ready frame announces, unless set explicitly", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const ws = env.WebSocket.last;
  greet(ws, [], { heartbeat: 60 });
  env.clock.advance(149999);
  assert.equal(ws.closeCalls.length, 0);
  env.clock.advance(1);
  assert.equal(ws.closeCalls.length, 1);
  conn.close();

  const env2 = fakeEnv({ heartbeatTimeout: 5000 });
  const conn2 = connect(TARGET, env2.options);
  greet(env2.WebSocket.last, [], { heartbeat: 60 });
  env2.clock.advance(5000);
  assert.equal(env2.WebSocket.last.closeCalls.length, 1);
  conn2.close();
});

test("send queues while not connected, bounded, and flushes in order on ready", () => {
  const env = fakeEnv({ sendQueueLimit: 3 });
  const conn = connect(TARGET, env.options);
  assert.equal(conn.send("one"), true);
  assert.equal(conn.send({ n: 2 }), true);
  const ws = env.WebSocket.last;
  ws.open();
  assert.equal(conn.send(new Uint8Array([3])), true, "open but not ready: still queued");
  assert.equal(conn.send("four"), false, "the queue is full");
  assert.deepEqual(ws.sent, []);
  const order = [];
  conn.on("ready", () => {
    order.push(ws.sent.length);
    conn.send("from a ready listener");
  });
  ws.receive({ type: "ready" });
  assert.deepEqual(order, [3], "queued messages go out before the ready event");
  assert.deepEqual(ws.sent.slice(0, 2), ["one", '{"n":2}']);
  assert.deepEqual([...ws.sent[2]], [3]);
  assert.equal(ws.sent[3], "from a ready listener");
  assert.equal(conn.send("direct"), true);
  assert.equal(ws.sent.at(-1), "direct");
  assert.throws(() => conn.send(undefined), TypeError);
  conn.close();
});

test("queued messages survive a connection that fails before ready", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  greet(env.WebSocket.last);
  env.WebSocket.last.serverClose(1006);
  assert.equal(conn.send("a"), true);
  env.clock.advance(500);
  env.WebSocket.last.open();
  env.WebSocket.last.serverClose(1013); // never ready
  assert.equal(conn.send("b"), true);
  env.clock.advance(1000);
  const ws = env.WebSocket.last;
  greet(ws);
  assert.deepEqual(ws.sent, ["a", "b"]);
  conn.close();
});

test("close() stops everything: no socket, no timer, no listener, no reconnection", () => {
  for (const phase of ["connecting", "connected", "waiting to reconnect", "offline"]) {
    const env = fakeEnv();
    const conn = connect(TARGET, env.options);
    const events = record(conn, ["close", "status", "reconnecting"]);
    const ws = env.WebSocket.last;
    if (phase === "connected") greet(ws);
    if (phase === "waiting to reconnect") ws.serverClose(1006);
    if (phase === "offline") env.network.goOffline();
    assert.ok(env.clock.pending > 0 || phase === "offline", `${phase}: some timer runs`);
    events.length = 0;

    conn.close("bye");
    assert.equal(conn.status, "closed", phase);
    assert.equal(env.clock.pending, 0, `${phase}: no timer left`);
    assert.equal(env.network.listenerCount("online"), 0, `${phase}: online listener removed`);
    assert.equal(env.network.listenerCount("offline"), 0, `${phase}: offline listener removed`);
    if (phase === "connecting" || phase === "connected") assert.deepEqual(ws.closeCalls, [[1000, "bye"]]);
    // Every phase says the connection is over, with a socket or between two.
    assert.deepEqual(events.filter(([name]) => name === "close"),
      [["close", { code: 1000, reason: "bye", wasClean: true, willReconnect: false }]], phase);
    assert.deepEqual(events.at(-1), ["status", "closed"]);
    ws.serverClose(1006); // late events of the old socket are ignored
    env.network.goOnline();
    env.clock.advance(24 * 3600 * 1000);
    assert.equal(env.WebSocket.instances.length, 1, `${phase}: nothing reconnected`);
    assert.equal(conn.send("x"), false);
    assert.deepEqual(events.filter(([name]) => name === "reconnecting"), []);
    conn.close(); // twice is fine
  }
});

test("close() from inside a listener stops the processing of the frame", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  conn.on("message", () => conn.close());
  const ready = record(conn, ["ready"]);
  const ws = env.WebSocket.last;
  ws.open();
  ws.receive({ type: "message", channel: "broadcast", offset: 1, epoch: "b", data: 1 });
  ws.receive({ type: "ready" });
  assert.deepEqual(ready, []);
  assert.equal(env.clock.pending, 0);

  const env2 = fakeEnv();
  const conn2 = connect(TARGET, env2.options);
  conn2.send("queued");
  conn2.on("status", (status) => status === "connected" && conn2.close());
  const ready2 = record(conn2, ["ready"]);
  greet(env2.WebSocket.last);
  assert.deepEqual(ready2, [], "closed by a status listener: no ready event");
  assert.deepEqual(env2.WebSocket.last.sent, [], "nor queued messages sent");
});

test("offline pauses reconnection; online reconnects at once", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  greet(env.WebSocket.last);
  const events = record(conn, ["close", "reconnecting", "status"]);
  env.network.goOffline();
  assert.equal(env.WebSocket.last.closeCalls.length, 1, "the socket is dropped");
  assert.deepEqual(events.map(([name]) => name), ["close", "status"]);
  assert.equal(conn.status, "reconnecting");
  assert.equal(env.clock.pending, 0, "no timer while offline");
  env.clock.advance(600000);
  assert.equal(env.WebSocket.instances.length, 1);

  env.network.goOnline();
  assert.equal(env.WebSocket.instances.length, 2, "reconnects without waiting");
  greet(env.WebSocket.last);
  assert.equal(conn.status, "connected");

  // a socket that closes while navigator.onLine is false waits for "online"
  env.network.navigator.onLine = false;
  env.WebSocket.last.serverClose(1006);
  assert.equal(env.clock.pending, 0);
  env.clock.advance(600000);
  assert.equal(env.WebSocket.instances.length, 2);
  env.network.goOnline();
  assert.equal(env.WebSocket.instances.length, 3);
  env.network.goOnline(); // already connecting: no second socket
  assert.equal(env.WebSocket.instances.length, 3);
  conn.close();
});

test("reconnect() replaces the socket at once", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  greet(env.WebSocket.last, [{ channel: "broadcast", offset: 2, epoch: "b" }]);
  conn.reconnect();
  assert.equal(env.WebSocket.instances.length, 2);
  assert.equal(env.WebSocket.instances[0].closeCalls.length, 1);
  assert.deepEqual(recoverOf(env.WebSocket.last.url), { broadcast: [2, "b"] });
  conn.close();
});

test("a throwing listener does not break the connection", (t) => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const reported = [];
  t.mock.method(console, "error", (e) => reported.push(e));
  const seen = [];
  conn.on("message", () => { throw new Error("boom"); });
  conn.on("message", (m) => seen.push(m.offset));
  greet(env.WebSocket.last);
  env.WebSocket.last.receive({ type: "message", channel: "broadcast", offset: 1, epoch: "b", data: 1 });
  assert.deepEqual(seen, [1]);
  assert.equal(reported.length, 1);
  assert.equal(reported[0].message, "boom");
  assert.throws(() => conn.on("mesage", () => {}), /unknown event "mesage"/);
  const off = () => seen.push("off");
  conn.on("message", off).off("message", off);
  env.WebSocket.last.receive({ type: "message", channel: "broadcast", offset: 2, epoch: "b", data: 2 });
  assert.deepEqual(seen, [1, 2]);
  conn.close();
});

test("1012 (service restart) is a known code: the client reconnects after the first delay and recovers", () => {
  const env = fakeEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["close", "reconnecting"]);
  const ws = env.WebSocket.last;
  greet(ws, [{ channel: "broadcast", offset: 4, epoch: "e" }]);
  ws.receive({ type: "message", channel: "broadcast", offset: 5, epoch: "e", data: "x" });
  ws.serverClose(CLOSE_CODES.SERVICE_RESTART, "service restart");
  assert.equal(CLOSE_CODES.SERVICE_RESTART, 1012);
  assert.equal(isTerminalClose(1012), false);
  assert.deepEqual(events, [
    ["close", { code: 1012, reason: "service restart", wasClean: true, willReconnect: true }],
    ["reconnecting", { attempt: 1, delay: 500 }],
  ]);
  env.clock.advance(500);
  assert.equal(env.WebSocket.instances.length, 2);
  assert.deepEqual(recoverOf(env.WebSocket.last.url), { broadcast: [5, "e"] });
  conn.close();
});

test("a connection that gives up says close once, not again for the close() it makes", () => {
  const env = fakeEnv({ maxRetries: 1 });
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["close", "status"]);
  env.WebSocket.last.serverClose(1006);
  env.clock.advance(500);
  env.WebSocket.last.serverClose(1006);
  const closes = events.filter(([name]) => name === "close").map(([, d]) => d.willReconnect);
  assert.deepEqual(closes, [true, false]);
  assert.equal(conn.status, "closed");
});

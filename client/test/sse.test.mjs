import assert from "node:assert/strict";
import { test } from "node:test";

import { connect, decodeEventData, readCookie, streamUrl } from "django-uwsgi-ws";
import { fakeEnv, fakeEventSourceClass, fakeFetch, record, recoverOf, settle } from "./fakes.mjs";

const TARGET = { url: "wss://h/ws/chat", subscribe: ["broadcast", "user"], publish: ["broadcast"] };

/** fakeEnv plus an EventSource, a fetch and a document with a CSRF cookie. */
function sseEnv(options = {}) {
  const env = fakeEnv();
  env.EventSource = fakeEventSourceClass();
  env.fetch = fakeFetch(options.respond);
  env.options = {
    ...env.options,
    EventSource: env.EventSource,
    fetch: env.fetch,
    document: { cookie: "sessionid=abc; csrftoken=tok%2Ben; other=1" },
    ...options.options,
  };
  return env;
}

/** Open the current fake stream and complete the server's greeting. */
function greet(es, subscribed = [], extra = {}) {
  es.open();
  for (const s of subscribed) es.emit("subscribed", { type: "subscribed", recovered: null, ...s });
  es.emit("ready", { type: "ready", ...extra });
}

test("pure helpers: stream URLs, event data, cookies", () => {
  assert.equal(streamUrl("wss://h/ws/chat?subscribe-user"), "https://h/ws/chat?subscribe-user");
  assert.equal(streamUrl("ws://h:8000/ws/chat"), "http://h:8000/ws/chat");
  const binary = decodeEventData('{"type":"message","channel":"user","offset":1,"epoch":"e","binary":true,"data":"AAH/"}');
  assert.deepEqual([...new Uint8Array(binary.data)], [0, 1, 255]);
  assert.deepEqual(decodeEventData('{"type":"message","data":"text"}').data, "text");
  assert.throws(() => decodeEventData("not json"));
  assert.throws(() => decodeEventData('{"no":"type"}'));
  assert.equal(readCookie("a=1; csrftoken=x%3Dy; b=2", "csrftoken"), "x=y");
  assert.equal(readCookie("xcsrftoken=no", "csrftoken"), null);
  assert.equal(readCookie("", "csrftoken"), null);
});

test("transport 'sse' streams the same events from the http URL, without any websocket", () => {
  const env = sseEnv({ options: { transport: "sse" } });
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["open", "subscribed", "ready", "message", "status"]);
  assert.equal(conn.transport, "sse");
  assert.equal(env.WebSocket.instances.length, 0);
  const es = env.EventSource.last;
  assert.equal(es.url, "https://h/ws/chat?subscribe-broadcast&subscribe-user&publish-broadcast");
  assert.equal(es.withCredentials, false);
  greet(es, [{ channel: "broadcast", offset: 3, epoch: "b" }], { heartbeat: 20 });
  es.emit("message", '{"type":"message","channel":"broadcast","offset":4,"epoch":"b","data":{"text":"hi"}}');
  es.emit("message", { type: "message", channel: "broadcast", offset: 4, epoch: "b", data: "duplicate" });
  es.emit("message", { type: "message", channel: "user", offset: 1, epoch: "u", binary: true, data: "AAH/" });
  es.emit("heartbeat", { type: "heartbeat" });
  assert.deepEqual(events.map(([name]) => name), ["open", "subscribed", "status", "ready", "message", "message"]);
  assert.deepEqual(events[0][1], { url: es.url, transport: "sse" });
  const messages = events.filter(([name]) => name === "message").map(([, m]) => m);
  assert.deepEqual(messages[0], { data: { text: "hi" }, channel: "broadcast", offset: 4, epoch: "b", binary: false });
  assert.equal(messages[1].binary, true);
  assert.deepEqual([...new Uint8Array(messages[1].data)], [0, 1, 255]);
  assert.deepEqual(conn.positions(), { broadcast: [4, "b"], user: [1, "u"] });
  assert.equal(conn.status, "connected");
  conn.close();
  assert.ok(es.closed, "close() closes the EventSource");
  assert.equal(conn.status, "closed");
});

test("send() POSTs in order to the URL, with the CSRF token and the right content type", async () => {
  const env = sseEnv({ options: { transport: "sse" } });
  const conn = connect(TARGET, env.options);
  assert.equal(conn.send("queued before ready"), true);
  const es = env.EventSource.last;
  greet(es, [{ channel: "broadcast", offset: 2, epoch: "b" }], { sender: "0a1b2c" });
  conn.send({ n: 1 });
  conn.send(new Uint8Array([1, 2, 3]));
  await settle();
  const calls = env.fetch.calls;
  assert.deepEqual(calls.map((c) => c.body instanceof Uint8Array ? [...c.body] : c.body),
    ["queued before ready", '{"n":1}', [1, 2, 3]]);
  for (const call of calls) {
    assert.equal(call.method, "POST");
    assert.equal(call.url, "https://h/ws/chat?subscribe-broadcast&subscribe-user&publish-broadcast");
    assert.equal(call.headers["X-CSRFToken"], "tok+en");
    assert.equal(call.credentials, "same-origin");
  }
  // The stream's id from its "ready" event: the server then does not echo the message back.
  assert.deepEqual(calls.map((c) => c.headers["X-DjangoWs-Sender"]), ["0a1b2c", "0a1b2c", "0a1b2c"]);
  assert.equal(calls[0].headers["Content-Type"], "text/plain; charset=utf-8");
  assert.equal(calls[2].headers["Content-Type"], "application/octet-stream");
  conn.close();
});

test("the POSTs go one at a time: the next waits for the answer to the previous", async () => {
  const env = sseEnv({ options: { transport: "sse" } });
  const pending = [];
  env.options.fetch = (url, init) => new Promise((resolve) => pending.push([init.body, resolve]));
  const conn = connect(TARGET, env.options);
  greet(env.EventSource.last);
  conn.send("one");
  conn.send("two");
  await settle();
  assert.deepEqual(pending.map(([body]) => body), ["one"]);
  pending[0][1]({ ok: true, status: 200, text: () => Promise.resolve("") });
  await settle();
  assert.deepEqual(pending.map(([body]) => body), ["one", "two"]);
  conn.close();
});

test("a refused or failed POST becomes an error event with its status; the stream stays", async () => {
  let answer = { status: 403, text: "CSRF verification failed\n" };
  const env = sseEnv({
    options: { transport: "sse", csrfToken: () => "from-option" },
    respond: () => {
      if (answer === null) throw new TypeError("Failed to fetch");
      return answer;
    },
  });
  const conn = connect(TARGET, env.options);
  const errors = record(conn, ["error"]);
  greet(env.EventSource.last);
  conn.send("refused");
  await settle();
  answer = null;
  conn.send("network down");
  await settle();
  assert.equal(env.fetch.calls[0].headers["X-CSRFToken"], "from-option");
  assert.deepEqual(errors.map(([, e]) => [e.source, e.status, e.message]), [
    ["publish", 403, "CSRF verification failed"],
    ["publish", 0, "not sent: Failed to fetch"],
  ]);
  assert.equal(conn.status, "connected");
  conn.close();
});

test("an interrupted stream is closed (no browser retry) and reopened with recover and backoff", () => {
  const env = sseEnv({ options: { transport: "sse" } });
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["close", "reconnecting", "recovered", "status"]);
  let es = env.EventSource.last;
  assert.equal(recoverOf(es.url), undefined);
  greet(es, [{ channel: "broadcast", offset: 5, epoch: "b" }, { channel: "user", offset: 0, epoch: "" }]);
  es.emit("message", { type: "message", channel: "broadcast", offset: 6, epoch: "b", data: 1 });
  es.fail();
  assert.ok(es.closed, "the client, not EventSource, reconnects");
  assert.equal(conn.status, "reconnecting");
  assert.equal(env.EventSource.instances.length, 1);
  env.clock.advance(500); // minDelay, no jitter
  assert.equal(env.EventSource.instances.length, 2);
  es = env.EventSource.last;
  assert.deepEqual(recoverOf(es.url), { broadcast: [6, "b"], user: [0, ""] });
  greet(es, [
    { channel: "broadcast", offset: 6, epoch: "b", recovered: true },
    { channel: "user", offset: 0, epoch: "", recovered: true },
  ]);
  const names = events.map(([name]) => name);
  assert.deepEqual(names, ["status", "close", "status", "reconnecting", "recovered", "recovered", "status"]);
  assert.deepEqual(events[1][1], { code: 1006, reason: "", wasClean: false, willReconnect: true });
  conn.close();
});

test("the server's close event carries its code; a server error event is an error, not a failure", () => {
  const env = sseEnv({ options: { transport: "sse" } });
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["close", "error"]);
  const es = env.EventSource.last;
  greet(es);
  es.emit("error", { type: "error", code: "rate_limited", error: "slow down" });
  es.emit("message", "undecodable");
  assert.equal(conn.status, "connected");
  es.emit("close", { type: "close", code: 1012, reason: "server restarting" });
  assert.deepEqual(events.map(([name, e]) => [name, e.source || e.code]), [
    ["error", "server"], ["error", "protocol"], ["close", 1012],
  ]);
  assert.deepEqual(events[2][1], { code: 1012, reason: "server restarting", wasClean: true, willReconnect: true });
  assert.ok(es.closed);
  assert.equal(conn.status, "reconnecting");
  conn.close();
});

test("heartbeat events keep a silent stream alive; real silence replaces it", () => {
  const env = sseEnv({ options: { transport: "sse" } });
  const conn = connect(TARGET, env.options);
  const es = env.EventSource.last;
  greet(es, [], { heartbeat: 2 }); // dead after 5 s of silence
  for (let i = 0; i < 5; i++) {
    env.clock.advance(2000);
    es.emit("heartbeat", { type: "heartbeat" });
  }
  assert.equal(env.EventSource.instances.length, 1);
  assert.equal(conn.status, "connected");
  env.clock.advance(5000);
  assert.ok(es.closed);
  assert.equal(conn.status, "reconnecting");
  conn.close();
});

test("auto: a websocket that cannot open falls back to an event stream at once, keeping positions", () => {
  const env = sseEnv({ options: { positions: { broadcast: [7, "b"] } } });
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["transport", "close", "reconnecting", "open", "status"]);
  assert.equal(conn.transport, "websocket");
  const ws = env.WebSocket.last;
  assert.deepEqual(recoverOf(ws.url), { broadcast: [7, "b"] });
  ws.serverClose(1006);
  assert.equal(conn.transport, "sse");
  const es = env.EventSource.last;
  assert.ok(es, "an event stream was opened without waiting for a backoff");
  assert.equal(es.url.split("?")[0], "https://h/ws/chat");
  assert.deepEqual(recoverOf(es.url), { broadcast: [7, "b"] });
  greet(es, [{ channel: "broadcast", offset: 7, epoch: "b", recovered: true }]);
  assert.deepEqual(events.map(([name]) => name), ["close", "transport", "open", "status"]);
  assert.equal(events[0][1].willReconnect, true);
  assert.equal(events[1][1], "sse");
  // From now on, event streams only.
  es.fail();
  env.clock.advance(500);
  assert.equal(env.WebSocket.instances.length, 1);
  assert.equal(env.EventSource.instances.length, 2);
  conn.close();
});

test("auto: a refused event stream (a 403 fails it before it opens) sends the next attempt back to websockets", () => {
  const env = sseEnv();
  const conn = connect(TARGET, env.options);
  const events = record(conn, ["transport", "close", "reconnecting"]);
  env.WebSocket.last.serverClose(1006); // a refused handshake looks like a blocked websocket
  assert.equal(conn.transport, "sse");
  env.EventSource.last.fail(); // and the stream is refused too: 403 before any open
  assert.equal(conn.transport, "websocket");
  assert.deepEqual(events.map(([name, detail]) => (name === "transport" ? detail : name)),
    ["close", "sse", "websocket", "close", "reconnecting"]);
  assert.equal(events[3][1].willReconnect, true);
  assert.equal(env.WebSocket.instances.length, 1, "no websocket before the backoff");
  env.clock.advance(500);
  assert.equal(env.WebSocket.instances.length, 2);
  assert.equal(env.EventSource.instances.length, 1);
  // Once the refusal is over (the user logged in again), websockets work and stay.
  const ws = env.WebSocket.last;
  ws.open();
  ws.receive({ type: "ready" });
  assert.equal(conn.status, "connected");
  assert.equal(conn.transport, "websocket");
  conn.close();
});

test("auto: a websocket that fails again after a refused stream falls back to a stream again", () => {
  const env = sseEnv();
  const conn = connect(TARGET, env.options);
  env.WebSocket.last.serverClose(1006);
  env.EventSource.last.fail();
  env.clock.advance(500);
  env.WebSocket.last.serverClose(1006); // websockets really are blocked here
  assert.equal(conn.transport, "sse");
  assert.equal(env.EventSource.instances.length, 2);
  greet(env.EventSource.last);
  assert.equal(conn.status, "connected");
  env.EventSource.last.fail(); // a stream that worked: event streams from now on
  env.clock.advance(500);
  assert.equal(conn.transport, "sse");
  assert.equal(env.EventSource.instances.length, 3);
  assert.equal(env.WebSocket.instances.length, 2);
  conn.close();
});

test("auto: a websocket not ready within fallbackTimeout is dropped for an event stream", () => {
  const env = sseEnv({ options: { fallbackTimeout: 3000 } });
  const conn = connect(TARGET, env.options);
  const ws = env.WebSocket.last;
  ws.open(); // a proxy that answers the handshake but passes no frames
  env.clock.advance(2999);
  assert.equal(env.EventSource.instances.length, 0);
  env.clock.advance(1);
  assert.equal(ws.closeCalls.length, 1);
  assert.equal(conn.transport, "sse");
  assert.equal(env.EventSource.instances.length, 1);
  conn.close();
});

test("auto: once a websocket has worked, failures reconnect websockets, never falling back", () => {
  const env = sseEnv();
  const conn = connect(TARGET, env.options);
  const ws = env.WebSocket.last;
  ws.open();
  ws.receive({ type: "ready" });
  env.clock.advance(60000); // no fallback timer left behind; the watchdog replaces the silent socket
  ws.serverClose(1012);
  env.clock.advance(60000);
  assert.equal(env.EventSource.instances.length, 0);
  assert.ok(env.WebSocket.instances.length >= 2);
  assert.equal(conn.transport, "websocket");
  conn.close();
});

test("transport 'websocket' never falls back", () => {
  const env = sseEnv({ options: { transport: "websocket" } });
  const conn = connect(TARGET, env.options);
  env.WebSocket.last.serverClose(1006);
  env.clock.advance(500);
  assert.equal(env.EventSource.instances.length, 0);
  assert.equal(env.WebSocket.instances.length, 2);
  conn.close();
});

test("transport choices are checked; auto without WebSocket uses event streams", () => {
  const env = sseEnv();
  assert.throws(() => connect(TARGET, { ...env.options, transport: "polling" }), /unknown transport "polling"/);
  assert.throws(() => connect(TARGET, { ...env.options, transport: "sse", EventSource: null, fetch: null }),
    /no EventSource/);
  const conn = connect(TARGET, { ...env.options, WebSocket: null });
  assert.equal(conn.transport, "sse");
  assert.equal(env.EventSource.instances.length, 1);
  conn.close();
});

test("withCredentials reaches the EventSource and the POSTs", async () => {
  const env = sseEnv({ options: { transport: "sse", withCredentials: true } });
  const conn = connect(TARGET, env.options);
  const es = env.EventSource.last;
  assert.equal(es.withCredentials, true);
  greet(es);
  conn.send("x");
  await settle();
  assert.equal(env.fetch.calls[0].credentials, "include");
  conn.close();
});

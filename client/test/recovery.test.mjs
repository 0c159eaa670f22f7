import assert from "node:assert/strict";
import { test } from "node:test";

import {
  buildUrl,
  encodeRecover,
  MAX_QUERY_LENGTH,
  Positions,
  withRecover,
} from "django-uwsgi-ws";
import { recoverOf } from "./fakes.mjs";

const page = { href: "https://example.com/chat/room?x=1", protocol: "https:", host: "example.com" };

test("buildUrl turns a target into the ws4redis-style query", () => {
  assert.equal(
    buildUrl({ facility: "chat", subscribe: ["broadcast", "user"], publish: ["broadcast"], echo: true, latest: true }, page),
    "wss://example.com/ws/chat?subscribe-broadcast&subscribe-user&publish-broadcast&echo&latest",
  );
  assert.equal(
    buildUrl({ facility: "news", subscribe: ["group"], prefix: "/sockets/" }, { href: "http://h:8000/" }),
    "ws://h:8000/sockets/news?subscribe-group",
  );
  assert.equal(buildUrl({ url: "ws://h/ws/x?echo", subscribe: ["session"] }), "ws://h/ws/x?echo&subscribe-session");
  assert.equal(buildUrl("wss://h/ws/chat?subscribe-broadcast"), "wss://h/ws/chat?subscribe-broadcast");
  assert.equal(buildUrl("https://h/ws/chat?subscribe-user"), "wss://h/ws/chat?subscribe-user");
  assert.equal(buildUrl("/ws/chat?subscribe-user", page), "wss://example.com/ws/chat?subscribe-user");
  assert.equal(buildUrl("../ws/c?subscribe-user", page), "wss://example.com/ws/c?subscribe-user");
});

test("buildUrl refuses what the server would refuse", () => {
  assert.throws(() => buildUrl({ facility: "chat", subscribe: ["everyone"] }, page), /unknown audience "everyone"/);
  assert.throws(() => buildUrl({ facility: "a/b", subscribe: ["user"] }, page), /invalid facility/);
  assert.throws(() => buildUrl({ facility: "a..b", subscribe: ["user"] }, page), /invalid facility/);
  assert.throws(() => buildUrl({ subscribe: ["user"] }, page), /invalid facility/);
  assert.throws(() => buildUrl("/ws/chat", null), /relative URL/);
  assert.throws(() => buildUrl(42), TypeError);
});

test("withRecover adds the positions as URL-encoded JSON, replacing any previous recover", () => {
  const positions = { broadcast: [12, "1700000000.123"], "group:a&b=c d+e/ü": [3, "e"] };
  const url = withRecover("ws://h/ws/chat?subscribe-broadcast&echo", positions);
  assert.match(url, /^ws:\/\/h\/ws\/chat\?subscribe-broadcast&echo&recover=%7B/);
  assert.equal(url.split("?")[1].split("&").length, 3, "no raw & or = leaks from the labels");
  assert.doesNotMatch(url.split("recover=")[1], /[&=+ {}"]/);
  assert.deepEqual(recoverOf(url), positions);
  // exactly encodeURIComponent(JSON.stringify(...)) when everything fits
  assert.equal(url.split("recover=")[1], encodeURIComponent(JSON.stringify(positions)));

  const again = withRecover(url, { broadcast: [13, "1700000000.123"] });
  assert.equal(again.match(/recover=/g).length, 1);
  assert.deepEqual(recoverOf(again), { broadcast: [13, "1700000000.123"] });
  assert.equal(withRecover(url, null), "ws://h/ws/chat?subscribe-broadcast&echo");
  assert.equal(withRecover(url, {}), "ws://h/ws/chat?subscribe-broadcast&echo");
  assert.equal(withRecover("ws://h/ws/chat?recover=x", {}), "ws://h/ws/chat");
  assert.equal(withRecover("ws://h/ws/chat?echo#frag", { user: [0, ""] }), 'ws://h/ws/chat?echo&recover=' +
    encodeURIComponent('{"user":[0,""]}'));
});

test("recover leaves out invalid positions, which would get the whole connection refused", () => {
  const encoded = encodeRecover({
    a: [1, "e"],
    negative: [-1, "e"],
    float: [1.5, "e"],
    huge: [1e21, "e"],
    epoch: [1, 7],
    longEpoch: [1, "x".repeat(65)],
    notList: "1,e",
  });
  assert.deepEqual(JSON.parse(decodeURIComponent(encoded)), { a: [1, "e"] });
  assert.equal(encodeRecover({ bad: [-1, "e"] }), "");
});

test("recover stays within the server's limits: 256 channels and the query length", () => {
  const many = {};
  for (let i = 0; i < 300; i++) many["group:g" + i] = [i, "1700000000.123"];
  many.broadcast = [1, "1700000000.123"];
  many.user = [2, "1700000000.123"];
  const encoded = encodeRecover(many);
  const kept = JSON.parse(decodeURIComponent(encoded));
  assert.equal(Object.keys(kept).length, 256);
  assert.deepEqual(kept.broadcast, [1, "1700000000.123"], "non-group channels go first");
  assert.deepEqual(kept.user, [2, "1700000000.123"]);

  const url = withRecover("ws://h/ws/chat?subscribe-broadcast&subscribe-user&subscribe-group", many);
  const query = url.split("?")[1];
  assert.ok(query.length <= MAX_QUERY_LENGTH, `query of ${query.length} characters`);
  assert.ok(query.length > MAX_QUERY_LENGTH - 100, "the budget is used, not wasted");
  const fitted = recoverOf(url);
  assert.deepEqual(fitted.broadcast, [1, "1700000000.123"]);
  assert.ok(Object.keys(fitted).length < 256);

  const tight = withRecover("ws://h/ws/c?subscribe-user", { user: [1, "e"], "group:x": [1, "e"] }, 60);
  assert.ok(tight.split("?")[1].length <= 60);
  assert.deepEqual(recoverOf(tight), { user: [1, "e"] });
});

test("positions advance with messages and ignore duplicates within an epoch", () => {
  const p = new Positions();
  assert.equal(p.message("broadcast", 1, "e1"), true);
  assert.equal(p.message("broadcast", 2, "e1"), true);
  assert.equal(p.message("broadcast", 2, "e1"), false, "repeated offset");
  assert.equal(p.message("broadcast", 1, "e1"), false, "older offset");
  assert.deepEqual(p.get("broadcast"), [2, "e1"]);
  assert.equal(p.message("broadcast", 1, "e2"), true, "a new epoch starts over");
  assert.deepEqual(p.get("broadcast"), [1, "e2"]);
  assert.equal(p.message("user", 5, "u"), true);
  assert.equal(p.message("user", "6", "u"), false, "malformed offsets are not recorded");
  assert.deepEqual(p.toJSON(), { broadcast: [1, "e2"], user: [5, "u"] });
});

test("subscribed frames always set the position, so a lost channel starts from the server's", () => {
  const p = new Positions({ broadcast: [40, "old"], user: [3, "u"], bad: [-1, "x"] });
  assert.deepEqual(p.toJSON(), { broadcast: [40, "old"], user: [3, "u"] });
  p.subscribed("broadcast", 7, "new"); // recovered: false after a Redis restart
  assert.deepEqual(p.get("broadcast"), [7, "new"]);
  p.subscribed("user", 1, "u"); // even backwards in the same epoch: the server knows best
  assert.deepEqual(p.get("user"), [1, "u"]);
  p.subscribed("session", 0, ""); // Redis holds nothing yet
  assert.deepEqual(p.get("session"), [0, ""]);
  p.retain(new Set(["broadcast", "session"]));
  assert.deepEqual(p.toJSON(), { broadcast: [7, "new"], session: [0, ""] });
  // the copy returned by get() is not the stored array
  p.get("broadcast")[0] = 99;
  assert.deepEqual(p.get("broadcast"), [7, "new"]);
});

import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, checkHeartbeat, DEFAULTS } from "django-uwsgi-ws";

const noJitter = () => 0;
const options = { minDelay: 500, maxDelay: 30000, factor: 2, jitter: 0.5 };

test("the delay grows by the factor from minDelay", () => {
  const delays = [0, 1, 2, 3, 4, 5].map((attempt) => backoffDelay(attempt, options, noJitter));
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 16000]);
  assert.deepEqual(
    [0, 1, 2].map((attempt) => backoffDelay(attempt, { ...options, minDelay: 100, factor: 3 }, noJitter)),
    [100, 300, 900],
  );
});

test("the delay is capped at maxDelay, even for huge attempt numbers", () => {
  assert.equal(backoffDelay(6, options, noJitter), 30000);
  assert.equal(backoffDelay(60, options, noJitter), 30000);
  assert.equal(backoffDelay(5000, options, noJitter), 30000); // factor ** 5000 is Infinity
  for (let attempt = 0; attempt < 100; attempt++) {
    assert.ok(backoffDelay(attempt, options, Math.random) <= 30000);
  }
});

test("jitter takes up to the jitter fraction off the delay, never more", () => {
  assert.equal(backoffDelay(3, options, () => 0), 4000);
  assert.equal(backoffDelay(3, options, () => 0.5), 3000);
  assert.equal(backoffDelay(3, options, () => 0.999999), 2000);
  let low = Infinity;
  let high = -Infinity;
  const seen = new Set();
  for (let i = 0; i < 2000; i++) {
    const d = backoffDelay(3, options);
    low = Math.min(low, d);
    high = Math.max(high, d);
    seen.add(d);
  }
  assert.ok(low >= 2000 && high <= 4000, `delays in [${low}, ${high}]`);
  assert.ok(seen.size > 100, "Math.random gives spread-out delays");
  // jitter 0: exact
  assert.equal(backoffDelay(2, { ...options, jitter: 0 }, () => 0.9), 2000);
  // the cap holds with jitter: the largest delay is maxDelay
  assert.equal(backoffDelay(40, options, () => 0.5), 22500);
});

test("defaults: 500 ms, doubling, 30 s cap, half jitter", () => {
  assert.equal(backoffDelay(0, undefined, noJitter), DEFAULTS.minDelay);
  assert.equal(backoffDelay(1, {}, noJitter), 2 * DEFAULTS.minDelay);
  assert.equal(backoffDelay(100, {}, noJitter), DEFAULTS.maxDelay);
});

test("heartbeat deadline: dead only once the timeout has passed since the last frame", () => {
  assert.deepEqual(checkHeartbeat(1000, 1000, 50000), { dead: false, wait: 50000 });
  assert.deepEqual(checkHeartbeat(50999, 1000, 50000), { dead: false, wait: 1 });
  assert.deepEqual(checkHeartbeat(51000, 1000, 50000), { dead: true, wait: 0 });
  assert.deepEqual(checkHeartbeat(90000, 1000, 50000), { dead: true, wait: 0 });
  // a frame arrived meanwhile: check again when the new deadline comes
  assert.deepEqual(checkHeartbeat(51000, 30000, 50000), { dead: false, wait: 29000 });
});

test("after a service restart (1012, 1001) the first reconnection is spread over restartSpread", async () => {
  const { connect } = await import("django-uwsgi-ws");
  const { fakeEnv } = await import("./fakes.mjs");
  for (const [code, expected] of [[1012, 375 + 500], [1001, 375 + 500], [1006, 375], [1011, 375]]) {
    const env = fakeEnv({ random: () => 0.5, restartSpread: 1000 });
    const conn = connect("ws://example.test/ws/chat?subscribe-broadcast", env.options);
    const delays = [];
    conn.on("reconnecting", (e) => delays.push(e.delay));
    env.WebSocket.last.serverClose(code);
    env.clock.advance(expected);
    env.WebSocket.last.serverClose(1006); // the next failure: plain backoff again
    assert.deepEqual(delays, [expected, 750], `close ${code}`);
    conn.close();
  }
});

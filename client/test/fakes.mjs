// Test doubles for the client: a clock with timers, a WebSocket, a network.

/** A manual clock: timers fire only in advance(), in order of their due time. */
export function fakeClock(start = 1000) {
  let now = start;
  let seq = 0;
  const timers = new Map(); // id -> {at, fn}
  return {
    now: () => now,
    setTimeout: (fn, ms) => {
      const id = ++seq;
      timers.set(id, { at: now + Math.max(0, ms), fn });
      return id;
    },
    clearTimeout: (id) => {
      timers.delete(id);
    },
    /** Move time forward by ms, running every timer that falls due, in order. */
    advance(ms) {
      const target = now + ms;
      for (;;) {
        let next = null;
        for (const [id, t] of timers) {
          if (t.at <= target && (next === null || t.at < next[1].at)) next = [id, t];
        }
        if (next === null) break;
        timers.delete(next[0]);
        now = next[1].at;
        next[1].fn();
      }
      now = target;
    },
    get pending() {
      return timers.size;
    },
    /** ms until the next timer, or null. */
    get nextIn() {
      let at = null;
      for (const t of timers.values()) if (at === null || t.at < at) at = t.at;
      return at === null ? null : at - now;
    },
  };
}

/** A WebSocket class whose instances are driven by the test. */
export function fakeWebSocketClass() {
  class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.binaryType = "blob";
      this.sent = [];
      this.closeCalls = [];
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      FakeWebSocket.instances.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
      this.sent.push(data);
    }
    close(code, reason) {
      this.closeCalls.push([code, reason]);
      if (this.readyState < 2) this.readyState = 2;
    }
    // what the server does
    open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({ type: "open" });
    }
    receive(frame) {
      const data = typeof frame === "string" || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame);
      if (this.onmessage) this.onmessage({ type: "message", data });
    }
    serverClose(code = 1006, reason = "") {
      this.readyState = 3;
      if (this.onclose) this.onclose({ type: "close", code, reason, wasClean: code !== 1006 });
    }
    get listening() {
      return this.onopen !== null || this.onmessage !== null || this.onclose !== null;
    }
  }
  FakeWebSocket.instances = [];
  Object.defineProperty(FakeWebSocket, "last", { get: () => FakeWebSocket.instances.at(-1) });
  return FakeWebSocket;
}

/** window and navigator stand-ins for the online/offline logic. */
export function fakeNetwork(online = true) {
  const target = new EventTarget();
  const listeners = new Map(); // type -> count, to check close() removes them
  return {
    navigator: { onLine: online },
    window: {
      addEventListener(type, fn) {
        listeners.set(type, (listeners.get(type) || 0) + 1);
        target.addEventListener(type, fn);
      },
      removeEventListener(type, fn) {
        listeners.set(type, (listeners.get(type) || 0) - 1);
        target.removeEventListener(type, fn);
      },
    },
    goOffline() {
      this.navigator.onLine = false;
      target.dispatchEvent(new Event("offline"));
    },
    goOnline() {
      this.navigator.onLine = true;
      target.dispatchEvent(new Event("online"));
    },
    listenerCount(type) {
      return listeners.get(type) || 0;
    },
  };
}

/** Everything a Connection needs, fake; `options` override. */
export function fakeEnv(options = {}) {
  const clock = fakeClock();
  const WebSocket = fakeWebSocketClass();
  const network = fakeNetwork();
  const opts = {
    WebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0, // no jitter: delays are exact
    window: network.window,
    navigator: network.navigator,
    location: null,
    ...options,
  };
  return { clock, WebSocket, network, options: opts };
}

/** Record the events of a connection: [[name, detail], ...]. */
export function record(conn, names) {
  const events = [];
  for (const name of names) conn.on(name, (detail) => events.push([name, detail]));
  return events;
}

/** The recover parameter of a URL, decoded, or undefined. */
export function recoverOf(url) {
  const query = url.split("?")[1] || "";
  for (const part of query.split("&")) {
    const [name, value] = part.split("=");
    if (name === "recover") return JSON.parse(decodeURIComponent(value));
  }
  return undefined;
}

/** An EventSource class whose instances are driven by the test (named events, open, errors). */
export function fakeEventSourceClass() {
  class FakeEventSource {
    constructor(url, init) {
      this.url = url;
      this.withCredentials = !!(init && init.withCredentials);
      this.readyState = 0;
      this.closed = false;
      this.onopen = null;
      this.listeners = new Map(); // type -> [fn]
      FakeEventSource.instances.push(this);
    }
    addEventListener(type, fn) {
      if (!this.listeners.has(type)) this.listeners.set(type, []);
      this.listeners.get(type).push(fn);
    }
    close() {
      this.closed = true;
      this.readyState = 2;
    }
    // what the server (or the network) does
    open() {
      this.readyState = 1;
      if (this.onopen) this.onopen({ type: "open" });
    }
    /** A named event whose data is `doc` (JSON-encoded unless a string). */
    emit(type, doc) {
      if (this.closed) return;
      const data = typeof doc === "string" ? doc : JSON.stringify(doc);
      for (const fn of this.listeners.get(type) || []) fn({ type, data });
    }
    /** A connection error (no data): EventSource would retry by itself. */
    fail() {
      if (this.closed) return;
      this.readyState = 0;
      for (const fn of this.listeners.get("error") || []) fn({ type: "error" });
    }
  }
  FakeEventSource.instances = [];
  Object.defineProperty(FakeEventSource, "last", { get: () => FakeEventSource.instances.at(-1) });
  return FakeEventSource;
}

/** A fetch recording its calls; each answers `respond(call)` ({status, text}) or rejects if it throws. */
export function fakeFetch(respond = () => ({ status: 200, text: '{"published":[]}' })) {
  const calls = [];
  const fetch = (url, init) => {
    const call = { url, ...init };
    calls.push(call);
    let answer;
    try {
      answer = respond(call);
    } catch (error) {
      return Promise.reject(error);
    }
    return Promise.resolve({
      ok: answer.status >= 200 && answer.status < 300,
      status: answer.status,
      text: () => Promise.resolve(answer.text || ""),
    });
  };
  fetch.calls = calls;
  return fetch;
}

/** Let pending promise callbacks run. */
export async function settle() {
  for (let i = 0; i < 10; i++) await new Promise((resolve) => setImmediate(resolve));
}

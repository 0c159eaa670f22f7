/*!
 * django_ws.mjs - the browser client of django-uwsgi-ws, as an ES module. No dependencies.
 *
 *   import { connect } from "/static/django_ws/django_ws.mjs";
 *   const conn = connect({facility: "chat", subscribe: ["broadcast"]});
 *
 * This file is the source of the client. django_ws.js (a classic script for a
 * <script> tag: window.DjangoWs, or CommonJS) and django_ws.min.js are built from it
 * by client/build.mjs; django_ws.d.ts declares its types.
 *
 * The wire format it speaks is defined by uwsgi_ws/protocol.py and uwsgi_ws/session.py:
 * JSON text frames with a "type" (message, subscribed, ready, heartbeat, error, join,
 * leave, unsubscribed) and
 * binary message frames (2-byte big-endian header length, JSON header, payload).
 * Where a websocket cannot be opened, it falls back to Server-Sent Events on the same
 * URL (the same JSON documents as named events) and publishes with POST requests.
 *
 * The pure parts (backoff, URL building, recovery positions, the heartbeat deadline,
 * frame decoding) are plain functions, exported for tests; the Connection takes its
 * clock, timers, WebSocket constructor and network events from its options.
 */

var AUDIENCES = ["broadcast", "user", "group", "session"];
var FACILITY_RE = /^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_-])?$/;
var EVENTS = [
  "open", "message", "subscribed", "recovered", "notrecovered", "ready",
  "error", "close", "reconnecting", "status", "transport", "disconnected",
  "join", "leave", "unsubscribed",
];
var TRANSPORTS = ["auto", "websocket", "sse"];
// The server's limits on the query string (uwsgi_ws.protocol.parse_query).
var MAX_QUERY_LENGTH = 8192;
var MAX_RECOVER_CHANNELS = 256;
var MAX_EPOCH_LENGTH = 64;

var CLOSE_CODES = {
  NORMAL: 1000,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012, // the worker is reloading: reconnect and recover
  TRY_AGAIN_LATER: 1013,
  SLOW_CONSUMER: 4008,
  HEARTBEAT_TIMEOUT: 4009,
  TOO_OLD: 4010,
  DISCONNECTED: 4100, // django_ws.disconnect()'s default; 4100-4199: do not reconnect
};

/**
 * Tell whether a close code asks the client to stay away: 4100-4199, what the server
 * sends when the identity the connection was made with is gone (a logout) or was
 * shut out (django_ws.disconnect()). Reconnecting would only be refused, or worse,
 * come back as someone else.
 */
function isTerminalClose(code) {
  return typeof code === "number" && code >= 4100 && code <= 4199;
}

var DEFAULTS = {
  minDelay: 500, // ms before the first reconnection attempt (before jitter)
  maxDelay: 30000, // ms, the cap of the backoff
  factor: 2, // growth of the delay per failed attempt
  jitter: 0.5, // a delay d becomes a random value in [d * (1 - jitter), d]
  restartSpread: 1000, // ms: after a close 1012/1001 (the server restarts), the first attempt waits up to this much more, at random
  maxRetries: Infinity, // consecutive failed attempts before giving up
  heartbeatTimeout: null, // ms of silence before the socket is declared dead; null: 2.5 heartbeats
  sendQueueLimit: 100, // messages kept by send() while not connected
  recover: true, // resume from the last positions seen when reconnecting
  positions: null, // positions to recover from on the first connection
  maxQueryLength: MAX_QUERY_LENGTH,
  transport: "auto", // "websocket", "sse", or "auto": websocket, else Server-Sent Events
  fallbackTimeout: 10000, // ms a first websocket may take to become ready before "auto" falls back
  withCredentials: false, // send cookies with cross-origin event streams and POSTs
  csrfToken: null, // token (or function returning it) for POSTs; null: the csrftoken cookie
  csrfCookieName: "csrftoken", // settings.CSRF_COOKIE_NAME
};
var DEFAULT_HEARTBEAT = 20; // seconds, DJANGO_WS["HEARTBEAT"]'s default
var HEARTBEAT_MARGIN = 2.5; // heartbeats missed before the socket is declared dead

// ------------------------------------------------------------------ pure functions

/**
 * Delay in ms before reconnection attempt number `attempt` (0 for the first):
 * minDelay * factor^attempt, capped at maxDelay, then reduced by up to `jitter`
 * (a fraction) so that clients cut off together do not come back together.
 */
function backoffDelay(attempt, options, random) {
  var o = options || DEFAULTS;
  var minDelay = o.minDelay != null ? o.minDelay : DEFAULTS.minDelay;
  var maxDelay = o.maxDelay != null ? o.maxDelay : DEFAULTS.maxDelay;
  var factor = o.factor != null ? o.factor : DEFAULTS.factor;
  var jitter = o.jitter != null ? o.jitter : DEFAULTS.jitter;
  var base = Math.min(maxDelay, minDelay * Math.pow(factor, Math.max(0, attempt)));
  var r = (random || Math.random)();
  return Math.round(base * (1 - jitter * r));
}

/** Is [offset, epoch] something the server accepts in `recover`? */
function isValidPosition(offset, epoch) {
  return Number.isSafeInteger(offset) && offset >= 0 &&
    typeof epoch === "string" && epoch.length <= MAX_EPOCH_LENGTH;
}

/**
 * The last position seen in each channel, by channel label: [offset, epoch].
 *
 * "message" frames only move a position forwards within an epoch (an older or
 * repeated offset is a duplicate); "subscribed" frames state where the server
 * stands and always win, which resets a channel that could not be recovered.
 */
function Positions(initial) {
  this._map = new Map();
  if (initial) {
    for (var label in initial) {
      var p = initial[label];
      if (Array.isArray(p) && isValidPosition(p[0], p[1])) this._map.set(label, [p[0], p[1]]);
    }
  }
}
Positions.prototype.get = function (label) {
  var p = this._map.get(label);
  return p ? [p[0], p[1]] : undefined;
};
Positions.prototype.has = function (label) {
  return this._map.has(label);
};
Object.defineProperty(Positions.prototype, "size", {
  get: function () { return this._map.size; },
});
/** Record a message; return false if it is a duplicate (or malformed). */
Positions.prototype.message = function (channel, offset, epoch) {
  if (typeof channel !== "string" || !isValidPosition(offset, epoch)) return false;
  var known = this._map.get(channel);
  if (known && known[1] === epoch && offset <= known[0]) return false;
  this._map.set(channel, [offset, epoch]);
  return true;
};
/** Record the server's position from a "subscribed" frame. */
Positions.prototype.subscribed = function (channel, offset, epoch) {
  if (typeof channel !== "string") return;
  if (isValidPosition(offset, epoch)) this._map.set(channel, [offset, epoch]);
  else this._map.delete(channel);
};
/** Forget the channels not in `labels` (a Set), e.g. a group the user left. */
Positions.prototype.retain = function (labels) {
  var self = this;
  Array.from(this._map.keys()).forEach(function (label) {
    if (!labels.has(label)) self._map.delete(label);
  });
};
Positions.prototype.toJSON = function () {
  var out = {};
  this._map.forEach(function (p, label) { out[label] = [p[0], p[1]]; });
  return out;
};

function isGroup(label) {
  return label.indexOf("group:") === 0 ? 1 : 0;
}

/**
 * URL-encode `positions` ({label: [offset, epoch]}) as the value of `recover`,
 * in at most `maxLength` characters and MAX_RECOVER_CHANNELS channels: what does
 * not fit is left out (broadcast, user and session first, then groups), since the
 * server refuses the whole connection otherwise. Returns "" when nothing is left.
 */
function encodeRecover(positions, maxLength) {
  var limit = maxLength == null ? Infinity : maxLength;
  var labels = Object.keys(positions).sort(function (a, b) { return isGroup(a) - isGroup(b); });
  var parts = [];
  var length = 6; // "%7B" and "%7D": encodeURIComponent("{") and "}"
  for (var i = 0; i < labels.length && parts.length < MAX_RECOVER_CHANNELS; i++) {
    var p = positions[labels[i]];
    if (!Array.isArray(p) || !isValidPosition(p[0], p[1])) continue;
    var part = encodeURIComponent(JSON.stringify(labels[i]) + ":" + JSON.stringify([p[0], p[1]]));
    var extra = part.length + (parts.length ? 3 : 0); // "%2C" between entries
    if (length + extra > limit) continue;
    parts.push(part);
    length += extra;
  }
  return parts.length ? "%7B" + parts.join("%2C") + "%7D" : "";
}

function paramName(part) {
  var name = part.split("=")[0];
  try {
    return decodeURIComponent(name.replace(/\+/g, " "));
  } catch (e) {
    return name;
  }
}

/**
 * Return `url` with its `recover` parameter replaced by `positions` (left out when
 * null or empty), keeping the whole query within `maxQueryLength` characters.
 */
function withRecover(url, positions, maxQueryLength) {
  var hash = url.indexOf("#");
  if (hash >= 0) url = url.slice(0, hash);
  var q = url.indexOf("?");
  var path = q < 0 ? url : url.slice(0, q);
  var parts = q < 0 ? [] : url.slice(q + 1).split("&").filter(function (part) {
    return part && paramName(part) !== "recover";
  });
  if (positions) {
    var query = parts.join("&");
    var limit = maxQueryLength == null ? MAX_QUERY_LENGTH : maxQueryLength;
    var budget = limit - query.length - (query ? 1 : 0) - "recover=".length;
    var recover = encodeRecover(positions, budget);
    if (recover) parts.push("recover=" + recover);
  }
  return parts.length ? path + "?" + parts.join("&") : path;
}

function absoluteUrl(url, location) {
  if (/^wss?:\/\//i.test(url)) return url;
  if (/^https?:\/\//i.test(url)) return url.replace(/^http/i, "ws");
  if (!location || !location.href) {
    throw new TypeError("cannot resolve the relative URL '" + url + "' outside a page: give a ws:// or wss:// URL");
  }
  return new URL(url, location.href).href.replace(/^http/i, "ws");
}

/**
 * Return the websocket URL (without `recover`) for `target`: a URL (absolute, or
 * relative to the page), or {facility, subscribe, publish, echo, latest, prefix, url}
 * where subscribe and publish list audiences ("broadcast", "user", "group",
 * "session"), prefix is settings.WEBSOCKET_URL ("/ws/") and url, if given,
 * replaces prefix + facility.
 */
function buildUrl(target, location) {
  var url;
  var flags = [];
  if (typeof target === "string") {
    url = target;
  } else if (target && typeof target === "object") {
    if (target.url) {
      url = target.url;
    } else {
      if (typeof target.facility !== "string" || !FACILITY_RE.test(target.facility) ||
          target.facility.indexOf("..") >= 0) {
        throw new TypeError("invalid facility name: " + JSON.stringify(target.facility));
      }
      url = (target.prefix || "/ws/") + target.facility;
    }
    [["subscribe", target.subscribe], ["publish", target.publish]].forEach(function (pair) {
      (pair[1] || []).forEach(function (audience) {
        if (AUDIENCES.indexOf(audience) < 0) {
          throw new TypeError("unknown audience " + JSON.stringify(audience) + " to " + pair[0] +
            ": use " + AUDIENCES.join(", "));
        }
        flags.push(pair[0] + "-" + audience);
      });
    });
    if (target.echo) flags.push("echo");
    if (target.latest) flags.push("latest");
    if (target.presence) flags.push("presence");
  } else {
    throw new TypeError("connect() takes a URL or {facility, subscribe, publish, ...}");
  }
  url = absoluteUrl(url, location);
  if (flags.length) url += (url.indexOf("?") < 0 ? "?" : /[?&]$/.test(url) ? "" : "&") + flags.join("&");
  return url;
}

/**
 * Decide about the heartbeat watchdog at time `now`: the socket is dead if nothing
 * arrived for `timeout` ms since `lastActivity`; otherwise check again in `wait` ms.
 */
function checkHeartbeat(now, lastActivity, timeout) {
  var wait = lastActivity + timeout - now;
  return wait <= 0 ? { dead: true, wait: 0 } : { dead: false, wait: wait };
}

var utf8 = null;

/**
 * Decode a server frame: a text frame is a JSON object with a "type"; a binary
 * frame becomes its header plus `data` (an ArrayBuffer) and `binary: true`.
 * Throws on anything else.
 */
function decodeFrame(data) {
  var frame;
  if (typeof data === "string") {
    frame = JSON.parse(data);
  } else {
    var bytes;
    if (Object.prototype.toString.call(data) === "[object ArrayBuffer]") bytes = new Uint8Array(data);
    else if (ArrayBuffer.isView(data)) bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    else throw new TypeError("unexpected frame data: " + Object.prototype.toString.call(data));
    var n = bytes.length >= 2 ? (bytes[0] << 8) | bytes[1] : -1;
    if (n < 0 || 2 + n > bytes.length) throw new Error("truncated binary frame");
    utf8 = utf8 || new TextDecoder("utf-8");
    frame = JSON.parse(utf8.decode(bytes.subarray(2, 2 + n)));
    if (frame && typeof frame === "object") {
      frame.data = bytes.slice(2 + n).buffer;
      frame.binary = true;
    }
  }
  if (!frame || typeof frame !== "object" || typeof frame.type !== "string") {
    throw new Error("frame without a type");
  }
  return frame;
}

/** What send(data) puts on the wire: strings and binary as they are, else JSON text. */
function encodeOutgoing(data) {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) return data;
  if (typeof Blob !== "undefined" && data instanceof Blob) return data;
  var text = JSON.stringify(data);
  if (text === undefined) throw new TypeError("cannot send " + typeof data + ": give a string, binary data or a JSON value");
  return text;
}

/**
 * The http(s) URL answering who is connected to `channel` ("broadcast", "user",
 * "group:<name>") of the facility at websocket URL `url`.
 */
function presenceUrl(url, channel) {
  if (typeof channel !== "string" || !channel) throw new TypeError("presence() takes a channel label, e.g. \"broadcast\"");
  var path = url.split("#")[0].split("?")[0];
  return streamUrl(path) + "?presence=" + encodeURIComponent(channel);
}

/** The http(s) URL of the event stream at the same place as websocket URL `url`. */
function streamUrl(url) {
  return url.replace(/^ws/i, "http");
}

/** Decode standard base64 into an ArrayBuffer. */
function base64ToBuffer(text) {
  var binary = atob(text);
  var bytes = new Uint8Array(binary.length);
  for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes.buffer;
}

/**
 * Decode the data of a Server-Sent Event: the JSON document a websocket text frame
 * carries; a binary payload arrives base64-encoded and becomes an ArrayBuffer.
 * Throws on anything else.
 */
function decodeEventData(text) {
  var frame = decodeFrame(String(text));
  if (frame.binary === true && typeof frame.data === "string") frame.data = base64ToBuffer(frame.data);
  return frame;
}

/** The value of cookie `name` in a document.cookie string, or null. */
function readCookie(cookies, name) {
  var parts = (cookies || "").split(";");
  for (var i = 0; i < parts.length; i++) {
    var part = parts[i].replace(/^\s+/, "");
    if (part.slice(0, name.length + 1) === name + "=") {
      try {
        return decodeURIComponent(part.slice(name.length + 1));
      } catch (e) {
        return part.slice(name.length + 1);
      }
    }
  }
  return null;
}

// ------------------------------------------------------------------ event streams

var STREAM_EVENTS = ["message", "subscribed", "ready", "heartbeat", "join", "leave", "unsubscribed"];

/**
 * A Server-Sent Events stream dressed as a WebSocket, for the Connection: onopen,
 * onmessage (with the decoded `frame`), onclose ({code, reason, wasClean}), send()
 * and close(). Messages are sent as POST requests to the same URL, one at a time
 * and in order; `onsendfailed` hears about those that were not published.
 *
 * The browser's own reconnection is not used: on any interruption the stream is
 * closed and reported, and the Connection reconnects with its backoff and the
 * positions it saw (as `recover`), like for a websocket.
 */
function EventStreamSocket(url, env) {
  var self = this;
  this.url = url;
  this.readyState = 0;
  this.binaryType = "arraybuffer";
  this.onopen = this.onmessage = this.onclose = this.onerror = this.onsendfailed = null;
  this._env = env;
  this._postUrl = withRecover(url, null);
  this._posting = Promise.resolve();
  this._closeFrame = null;
  this._sender = null; // the stream's id (its "ready" frame): POSTs carry it, so no echo
  this._es = new env.EventSource(url, { withCredentials: !!env.withCredentials });
  this._es.onopen = function () {
    if (self.readyState !== 0) return;
    self.readyState = 1;
    if (self.onopen) self.onopen({ type: "open" });
  };
  var deliver = function (event) { self._frame(event.data); };
  STREAM_EVENTS.forEach(function (name) { self._es.addEventListener(name, deliver); });
  this._es.addEventListener("close", function (event) {
    try {
      self._closeFrame = JSON.parse(event.data);
    } catch (e) {
      self._closeFrame = { code: 1006, reason: "" };
    }
    self._ended(true);
  });
  // A named "error" event is a server frame (it has data); a plain one is the
  // connection failing, or ending, which EventSource would retry by itself.
  this._es.addEventListener("error", function (event) {
    if (event && typeof event.data === "string") self._frame(event.data);
    else self._ended(false);
  });
}

EventStreamSocket.prototype._frame = function (data) {
  if (this.readyState !== 1) return;
  var frame;
  try {
    frame = decodeEventData(data);
  } catch (error) {
    if (this.onmessage) this.onmessage({ type: "message", data: data, error: error });
    return;
  }
  if (frame.type === "ready" && typeof frame.sender === "string") this._sender = frame.sender;
  if (this.onmessage) this.onmessage({ type: "message", data: data, frame: frame });
};

EventStreamSocket.prototype._ended = function (clean) {
  if (this.readyState === 3) return;
  this.readyState = 3;
  this._es.close();
  var frame = this._closeFrame || {};
  var code = typeof frame.code === "number" ? frame.code : 1006;
  if (this.onclose) this.onclose({ type: "close", code: code, reason: String(frame.reason || ""), wasClean: clean });
};

EventStreamSocket.prototype.close = function () {
  if (this.readyState === 3) return;
  this.readyState = 3;
  this._es.close();
};

EventStreamSocket.prototype._csrfToken = function () {
  var token = this._env.csrfToken;
  if (typeof token === "function") token = token();
  if (token) return String(token);
  var doc = this._env.document;
  return doc ? readCookie(doc.cookie, this._env.csrfCookieName || "csrftoken") : null;
};

/** POST `payload` to the facility URL, after the messages sent before it. */
EventStreamSocket.prototype.send = function (payload) {
  if (this.readyState !== 1) throw new Error("InvalidStateError: the event stream is not open");
  var self = this;
  var env = this._env;
  var binary = typeof payload !== "string";
  var headers = { "Content-Type": binary ? "application/octet-stream" : "text/plain; charset=utf-8" };
  var token = this._csrfToken();
  if (token) headers["X-CSRFToken"] = token;
  if (this._sender) headers["X-DjangoWs-Sender"] = this._sender;
  var failed = function (status, message) {
    if (self.onsendfailed) self.onsendfailed({ status: status, message: message });
  };
  this._posting = this._posting.then(function () {
    return env.fetch(self._postUrl, {
      method: "POST",
      body: payload,
      headers: headers,
      credentials: env.withCredentials ? "include" : "same-origin",
    }).then(function (response) {
      if (response.ok) return;
      return response.text().then(function (text) {
        failed(response.status, (text || "").trim() || "HTTP " + response.status);
      }, function () {
        failed(response.status, "HTTP " + response.status);
      });
    }, function (error) {
      failed(0, "not sent: " + String(error && error.message || error));
    });
  });
};

// ------------------------------------------------------------------ Connection

var OPEN = 1;

function reportListenerError(error) {
  if (typeof reportError === "function") reportError(error); // eslint-disable-line no-undef
  else if (typeof console !== "undefined") console.error(error);
}

/**
 * One logical connection to a facility, kept alive across sockets.
 * See django_ws.d.ts for the options and events.
 */
function Connection(target, options) {
  var o = {};
  var k;
  for (k in DEFAULTS) o[k] = DEFAULTS[k];
  for (k in options || {}) if (options[k] !== undefined) o[k] = options[k];
  var g = typeof globalThis !== "undefined" ? globalThis : {};
  this.options = o;
  if (TRANSPORTS.indexOf(o.transport) < 0) {
    throw new TypeError("unknown transport " + JSON.stringify(o.transport) + ": use " + TRANSPORTS.join(", "));
  }
  this._WebSocket = o.WebSocket || g.WebSocket;
  this._EventSource = o.EventSource || g.EventSource;
  var canWs = typeof this._WebSocket === "function";
  var canSse = typeof this._EventSource === "function";
  if (o.transport === "websocket" && !canWs) throw new TypeError("no WebSocket implementation: pass options.WebSocket");
  if (o.transport === "sse" && !canSse) throw new TypeError("no EventSource implementation: pass options.EventSource");
  if (!canWs && !canSse) throw new TypeError("neither WebSocket nor EventSource is available: pass options.WebSocket");
  /** The transport in use: "websocket" or "sse" (Server-Sent Events with POST to send). */
  this.transport = o.transport === "sse" || (o.transport === "auto" && !canWs) ? "sse" : "websocket";
  // "auto" falls back to event streams until a websocket has worked once.
  this._mayFallBack = o.transport === "auto" && canSse && this.transport === "websocket";
  this._fallbackTimer = null;
  this._fellBack = false; // the event stream in use replaces a websocket that failed
  this._opened = false; // the current socket or stream has opened
  this._closeAnnounced = false; // a "close" event has said willReconnect: false
  var f = o.fetch || g.fetch;
  this._streamEnv = {
    EventSource: this._EventSource,
    fetch: f ? function (url, init) { return f(url, init); } : function () {
      return Promise.reject(new TypeError("no fetch implementation: pass options.fetch"));
    },
    document: o.document !== undefined ? o.document : g.document,
    withCredentials: o.withCredentials,
    csrfToken: o.csrfToken,
    csrfCookieName: o.csrfCookieName,
  };
  // Timer functions are called unbound: browsers refuse window.setTimeout on another `this`.
  var st = o.setTimeout || g.setTimeout;
  var ct = o.clearTimeout || g.clearTimeout;
  this._setTimeout = function (fn, ms) { return st(fn, ms); };
  this._clearTimeout = function (id) { ct(id); };
  this._now = o.now || Date.now;
  this._random = o.random || Math.random;
  this._navigator = o.navigator !== undefined ? o.navigator : g.navigator;
  this._window = o.window !== undefined ? o.window : (typeof g.addEventListener === "function" ? g : null);

  this.url = buildUrl(target, o.location !== undefined ? o.location : g.location);
  this.status = "connecting";
  this._listeners = {};
  this._positions = new Positions(o.positions);
  this._queue = [];
  this._ws = null;
  this._ready = false;
  this._stopped = false;
  this._attempt = 0;
  this._retryTimer = null;
  this._watchdogTimer = null;
  this._lastActivity = 0;
  this._subscribedNow = new Set();
  this._knownAtConnect = new Set();
  this._explicitTimeout = o.heartbeatTimeout != null;
  this._heartbeatTimeout = this._explicitTimeout ? o.heartbeatTimeout : HEARTBEAT_MARGIN * DEFAULT_HEARTBEAT * 1000;

  var self = this;
  this._onOnline = function () { self._online(); };
  this._onOffline = function () { self._offline(); };
  if (this._window) {
    this._window.addEventListener("online", this._onOnline);
    this._window.addEventListener("offline", this._onOffline);
  }
  this._connect();
}

Connection.prototype.on = function (name, fn) {
  if (EVENTS.indexOf(name) < 0) throw new TypeError("unknown event " + JSON.stringify(name) + ": use " + EVENTS.join(", "));
  if (typeof fn !== "function") throw new TypeError("a listener must be a function");
  (this._listeners[name] = this._listeners[name] || []).push(fn);
  return this;
};

Connection.prototype.off = function (name, fn) {
  var list = this._listeners[name];
  if (list) {
    var i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  }
  return this;
};

Connection.prototype._emit = function (name, detail) {
  var list = this._listeners[name];
  if (!list) return;
  list.slice().forEach(function (fn) {
    try {
      fn.call(this, detail);
    } catch (error) {
      reportListenerError(error);
    }
  }, this);
};

Connection.prototype._emitClose = function (detail) {
  if (!detail.willReconnect) this._closeAnnounced = true;
  this._emit("close", detail);
};

Connection.prototype._setStatus = function (status) {
  if (this.status === status) return;
  this.status = status;
  this._emit("status", status);
};

/** The last positions seen, {label: [offset, epoch]}: keep them to resume after a page load. */
Connection.prototype.positions = function () {
  return this._positions.toJSON();
};

/**
 * Send a message: a string as text, an ArrayBuffer, typed array or Blob as binary,
 * anything else as JSON text. While not connected, up to sendQueueLimit messages
 * wait and go out, in order, once the server is ready. Returns false when the
 * message was dropped (queue full, or the connection closed).
 */
Connection.prototype.send = function (data) {
  if (this._stopped) return false;
  var payload = encodeOutgoing(data);
  if (this._ready && this._ws && this._ws.readyState === OPEN && this._queue.length === 0) {
    this._ws.send(payload);
    return true;
  }
  if (this._queue.length >= this.options.sendQueueLimit) return false;
  this._queue.push(payload);
  return true;
};

/**
 * Close the connection for good: no socket, no timer, no reconnection. A "close"
 * event says so (willReconnect: false), whether a socket was open, being opened, or
 * none was (waiting to reconnect, offline), unless one has said it already.
 */
Connection.prototype.close = function (reason) {
  if (this._stopped) return;
  this._stopped = true;
  reason = reason || "";
  this._clearRetry();
  if (this._window) {
    this._window.removeEventListener("online", this._onOnline);
    this._window.removeEventListener("offline", this._onOffline);
  }
  var ws = this._ws;
  if (ws) {
    this._detach();
    safeClose(ws, 1000, reason);
  }
  if (!this._closeAnnounced) this._emitClose({ code: 1000, reason: reason, wasClean: true, willReconnect: false });
  this._queue = [];
  this._setStatus("closed");
};

/** Drop the current socket (if any) and connect again now. */
Connection.prototype.reconnect = function () {
  if (this._stopped) return;
  this._clearRetry();
  if (this._ws) this._abandon("reconnect requested");
  this._attempt = 0;
  this._connect();
};

Connection.prototype._online = function () {
  if (this._stopped || this._ws) return;
  this._clearRetry();
  this._connect();
};

Connection.prototype._offline = function () {
  if (this._stopped) return;
  this._clearRetry();
  if (this._ws) this._abandon("offline");
  this._setStatus("reconnecting"); // until the "online" event
};

Connection.prototype._isOnline = function () {
  return !this._navigator || this._navigator.onLine !== false;
};

Connection.prototype._clearRetry = function () {
  if (this._retryTimer !== null) {
    this._clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }
};

Connection.prototype._connect = function () {
  if (this._stopped) return;
  if (!this._isOnline()) return; // the "online" event calls _connect again
  var positions = this._positions.toJSON();
  var sse = this.transport === "sse";
  var url = withRecover(sse ? streamUrl(this.url) : this.url, this.options.recover ? positions : null,
    this.options.maxQueryLength);
  this._knownAtConnect = new Set(Object.keys(positions));
  var ws;
  try {
    ws = sse ? new EventStreamSocket(url, this._streamEnv) : new this._WebSocket(url);
  } catch (error) {
    this._emit("error", { source: "socket", message: String(error && error.message || error), error: error });
    if (!this._fallBack()) this._retry();
    return;
  }
  ws.binaryType = "arraybuffer";
  this._ws = ws;
  this._ready = false;
  this._opened = false;
  this._subscribedNow = new Set();
  var self = this;
  ws.onopen = function () { self._handleOpen(ws); };
  ws.onmessage = function (event) { self._handleMessage(ws, event); };
  ws.onclose = function (event) { self._handleClose(ws, event); };
  ws.onerror = function () {}; // a close event always follows
  if (sse) {
    ws.onsendfailed = function (failure) {
      self._emit("error", { source: "publish", message: failure.message, status: failure.status });
    };
  }
  this._lastActivity = this._now();
  this._armWatchdog(this._heartbeatTimeout);
  if (this._mayFallBack && !sse) {
    this._fallbackTimer = this._setTimeout(function () {
      self._fallbackTimer = null;
      if (self._ws !== ws || self._ready) return;
      self._abandon("websocket not ready after " + self.options.fallbackTimeout + " ms");
      if (!self._fallBack()) self._retry();
    }, this.options.fallbackTimeout);
  }
};

/**
 * In "auto" mode, before any websocket has worked: switch to event streams and
 * connect at once. Returns false when there is no falling back (left to _retry).
 */
Connection.prototype._fallBack = function () {
  if (!this._mayFallBack || this._stopped || this.transport !== "websocket") return false;
  this._mayFallBack = false;
  this._fellBack = true;
  this.transport = "sse";
  this._emit("transport", "sse");
  this._connect();
  return true;
};

/** Stop listening to the current socket. */
Connection.prototype._detach = function () {
  var ws = this._ws;
  if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  this._ws = null;
  this._ready = false;
  if (this._watchdogTimer !== null) {
    this._clearTimeout(this._watchdogTimer);
    this._watchdogTimer = null;
  }
  if (this._fallbackTimer !== null) {
    this._clearTimeout(this._fallbackTimer);
    this._fallbackTimer = null;
  }
};

/** Give up on the current socket without waiting for its close handshake. */
Connection.prototype._abandon = function (reason) {
  var ws = this._ws;
  this._detach();
  safeClose(ws, 1000, reason);
  this._emitClose({ code: 1006, reason: reason, wasClean: false, willReconnect: !this._stopped });
};

function safeClose(ws, code, reason) {
  try {
    ws.close(code, reason);
  } catch (e) {
    // already closed, or a reason too long: nothing more to do
  }
}

Connection.prototype._armWatchdog = function (wait) {
  var self = this;
  if (this._watchdogTimer !== null) this._clearTimeout(this._watchdogTimer);
  this._watchdogTimer = this._setTimeout(function () {
    self._watchdogTimer = null;
    var decision = checkHeartbeat(self._now(), self._lastActivity, self._heartbeatTimeout);
    if (!decision.dead) {
      self._armWatchdog(decision.wait);
      return;
    }
    self._abandon("heartbeat timeout");
    if (!self._fallBack()) self._retry();
  }, wait);
};

Connection.prototype._retry = function () {
  if (this._stopped) return;
  if (this._attempt >= this.options.maxRetries) {
    this.close("gave up after " + this._attempt + " attempts");
    return;
  }
  this._setStatus("reconnecting");
  if (!this._isOnline()) return; // wait for the "online" event
  var delay = backoffDelay(this._attempt, this.options, this._random);
  if (this._attempt === 0 && (this._lastCloseCode === 1012 || this._lastCloseCode === 1001)) {
    // Every client of a restarting instance is told at about the same time (the
    // server spreads the closes over its drain window, but a window may be short):
    // coming back at once, in step, would be a handshake storm on the survivors.
    var spread = this.options.restartSpread != null ? this.options.restartSpread : DEFAULTS.restartSpread;
    delay += Math.round(this._random() * spread);
  }
  this._lastCloseCode = null;
  this._attempt += 1;
  var self = this;
  this._retryTimer = this._setTimeout(function () {
    self._retryTimer = null;
    self._connect();
  }, delay);
  this._emit("reconnecting", { attempt: this._attempt, delay: delay });
};

Connection.prototype._handleOpen = function (ws) {
  if (ws !== this._ws) return;
  this._opened = true;
  this._lastActivity = this._now();
  this._emit("open", { url: ws.url, transport: this.transport });
};

Connection.prototype._handleClose = function (ws, event) {
  if (ws !== this._ws) return;
  this._detach();
  var code = event && event.code;
  var reason = (event && event.reason) || "";
  this._lastCloseCode = code;
  if (isTerminalClose(code)) {
    // The server closed this identity's connections on purpose: stop, and let the
    // page decide (log in again, reload...). No reconnection with the old identity.
    this._emitClose({ code: code, reason: reason, wasClean: !!(event && event.wasClean), willReconnect: false });
    this.close();
    this._emit("disconnected", { code: code, reason: reason });
    return;
  }
  var refused = this._fellBack && this.transport === "sse" && !this._opened;
  if (refused) {
    // In "auto" mode, an event stream that fails before opening, like the websocket
    // before it, says nothing about websockets being blocked: a server refusing the
    // request (403: a logged-out user, a bad origin) fails both. So the next attempt
    // is a websocket again, and may fall back again, rather than event streams for
    // ever on a network where websockets work. The websocket waits for the backoff.
    this._fellBack = false;
    this._mayFallBack = true;
    this.transport = "websocket";
    this._emit("transport", "websocket");
  }
  var fallBack = !refused && this._mayFallBack && this.transport === "websocket" && !this._stopped;
  var willReconnect = fallBack || (!this._stopped && this._attempt < this.options.maxRetries);
  this._emitClose({
    code: code,
    reason: reason,
    wasClean: !!(event && event.wasClean),
    willReconnect: willReconnect,
  });
  if (refused || !this._fallBack()) this._retry();
};

Connection.prototype._handleMessage = function (ws, event) {
  if (ws !== this._ws) return;
  this._lastActivity = this._now();
  var frame = event.frame;
  try {
    if (event.error) throw event.error;
    if (!frame) frame = decodeFrame(event.data);
  } catch (error) {
    this._emit("error", { source: "protocol", message: "undecodable frame: " + error.message, error: error });
    return;
  }
  switch (frame.type) {
    case "message":
      if (this._positions.message(frame.channel, frame.offset, frame.epoch)) {
        this._emit("message", {
          data: frame.data,
          channel: frame.channel,
          offset: frame.offset,
          epoch: frame.epoch,
          binary: !!frame.binary,
        });
      }
      break;
    case "subscribed":
      this._subscribed(frame);
      break;
    case "ready":
      this._handleReady(ws, frame);
      break;
    case "error":
      this._emit("error", { source: "server", message: String(frame.error) });
      break;
    case "join":
    case "leave":
      if (typeof frame.channel === "string" && typeof frame.user === "string") {
        var who = { channel: frame.channel, user: frame.user };
        if (frame.type === "join") who.info = frame.info === undefined ? null : frame.info;
        this._emit(frame.type, who);
      }
      break;
    case "unsubscribed":
      if (typeof frame.channel === "string") {
        // Nothing more comes on it; a reconnection must not ask to recover it.
        this._subscribedNow.delete(frame.channel);
        this._positions.retain(this._subscribedNow);
        this._emit("unsubscribed", { channel: frame.channel });
      }
      break;
    default: // "heartbeat", and types this client does not know yet
      break;
  }
};

Connection.prototype._subscribed = function (frame) {
  var channel = frame.channel;
  // recovered is null when the server was given no position for the channel: if we had
  // one (left out of an oversized recover, or options.recover false), messages were lost.
  var lost = frame.recovered === false || (frame.recovered == null && this._knownAtConnect.has(channel));
  this._positions.subscribed(channel, frame.offset, frame.epoch);
  this._subscribedNow.add(channel);
  var detail = { channel: channel, offset: frame.offset, epoch: frame.epoch, recovered: frame.recovered };
  this._emit("subscribed", detail);
  if (frame.recovered === true) this._emit("recovered", { channel: channel });
  else if (lost) this._emit("notrecovered", { channel: channel });
};

Connection.prototype._handleReady = function (ws, frame) {
  this._ready = true;
  this._attempt = 0;
  if (this.transport === "websocket") this._mayFallBack = false; // websockets work here
  this._positions.retain(this._subscribedNow);
  if (!this._explicitTimeout && typeof frame.heartbeat === "number" && frame.heartbeat > 0) {
    this._heartbeatTimeout = HEARTBEAT_MARGIN * frame.heartbeat * 1000;
    this._armWatchdog(this._heartbeatTimeout);
  }
  this._setStatus("connected");
  while (this._queue.length && this._ws === ws && ws.readyState === OPEN) ws.send(this._queue.shift());
  if (this._ws === ws) this._emit("ready", {});
};

/**
 * Ask the server who is connected to `channel` ("broadcast", "user", "group:<name>")
 * of this connection's facility. Resolves to {channel, members: [{user, connections,
 * since, info}], users, anonymous, connections}; rejects with an Error whose `status`
 * is the HTTP status (403: this client may not subscribe to that channel).
 */
Connection.prototype.presence = function (channel) {
  var url;
  try {
    url = presenceUrl(this.url, channel);
  } catch (error) {
    return Promise.reject(error);
  }
  var init = { method: "GET", credentials: this.options.withCredentials ? "include" : "same-origin",
    headers: { Accept: "application/json" } };
  return this._streamEnv.fetch(url, init).then(function (response) {
    return response.text().then(function (text) {
      if (!response.ok) {
        var error = new Error("presence of " + channel + " refused: " + response.status + " " + text.trim());
        error.status = response.status;
        throw error;
      }
      return JSON.parse(text);
    });
  });
};

/** Open a connection; see Connection. */
function connect(target, options) {
  return new Connection(target, options);
}

// The API: named exports, and the same names as the default export (DjangoWs).
export {
  connect,
  Connection,
  Positions,
  backoffDelay,
  buildUrl,
  withRecover,
  encodeRecover,
  checkHeartbeat,
  decodeFrame,
  encodeOutgoing,
  decodeEventData,
  readCookie,
  streamUrl,
  presenceUrl,
  EventStreamSocket,
  isValidPosition,
  CLOSE_CODES,
  isTerminalClose,
  DEFAULTS,
  MAX_QUERY_LENGTH,
  MAX_RECOVER_CHANNELS,
};

export default {
  connect,
  Connection,
  Positions,
  backoffDelay,
  buildUrl,
  withRecover,
  encodeRecover,
  checkHeartbeat,
  decodeFrame,
  encodeOutgoing,
  decodeEventData,
  readCookie,
  streamUrl,
  presenceUrl,
  EventStreamSocket,
  isValidPosition,
  CLOSE_CODES,
  isTerminalClose,
  DEFAULTS,
  MAX_QUERY_LENGTH,
  MAX_RECOVER_CHANNELS,
};

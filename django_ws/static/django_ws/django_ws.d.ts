// Types of the browser client of django-uwsgi-ws: django_ws.mjs (the ES module) and
// django_ws.js / django_ws.min.js (classic scripts). As a plain <script> the API is
// the global `DjangoWs`; as a module, the exports below.

export as namespace DjangoWs;

/** Who a channel reaches (the query flags subscribe-<audience> / publish-<audience>). */
export type Audience = "broadcast" | "user" | "group" | "session";

/** [offset, epoch]: the last message seen in a channel. */
export type Position = [offset: number, epoch: string];

/** Positions by channel label ("broadcast", "user", "session", "group:<name>"). */
export type PositionMap = Record<string, Position>;

export type Status = "connecting" | "connected" | "reconnecting" | "closed";

/**
 * "websocket"; "sse": Server-Sent Events on the same URL, messages sent with POST;
 * "auto": a websocket, falling back to "sse" when none can be opened.
 */
export type Transport = "auto" | "websocket" | "sse";

export interface Target {
  /** The facility: the URL part after settings.WEBSOCKET_URL. */
  facility?: string;
  subscribe?: Audience[];
  publish?: Audience[];
  /** Deliver this connection's own publications back to it. */
  echo?: boolean;
  /** On a first connection, receive the last message kept in each channel. */
  latest?: boolean;
  /** Receive "join" and "leave" events of the subscribed channels' members. */
  presence?: boolean;
  /** settings.WEBSOCKET_URL; default "/ws/". */
  prefix?: string;
  /** The endpoint URL, replacing prefix + facility; relative URLs resolve against the page. */
  url?: string;
}

/** Something with addEventListener/removeEventListener for "online" and "offline" (window). */
export interface NetworkEvents {
  addEventListener(type: "online" | "offline", listener: () => void): void;
  removeEventListener(type: "online" | "offline", listener: () => void): void;
}

export interface WebSocketLike {
  readonly readyState: number;
  readonly url?: string;
  binaryType: string;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string; wasClean?: boolean }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string | ArrayBuffer | ArrayBufferView | Blob): void;
  close(code?: number, reason?: string): void;
}

/** What the client uses of EventSource. */
export interface EventSourceLike {
  onopen: ((event: unknown) => void) | null;
  addEventListener(type: string, listener: (event: { data?: string }) => void): void;
  close(): void;
}

export interface BackoffOptions {
  /** ms before the first reconnection attempt, before jitter. Default 500. */
  minDelay?: number;
  /** ms, the cap of the delay. Default 30000. */
  maxDelay?: number;
  /** Growth of the delay per failed attempt. Default 2. */
  factor?: number;
  /** A delay d becomes a random value in [d * (1 - jitter), d]. Default 0.5. */
  jitter?: number;
}

export interface Options extends BackoffOptions {
  /** ms: after a close with 1012 or 1001 (the server restarts), the first reconnection
   * waits up to this much longer, at random, so that the clients of an instance do not
   * come back in step. Default 1000. */
  restartSpread?: number;
  /** Consecutive failed attempts before giving up (status "closed"). Default Infinity. */
  maxRetries?: number;
  /**
   * ms without any frame before the socket is declared dead, closed and replaced.
   * Default 2.5 server heartbeats: 50000 for DJANGO_WS["HEARTBEAT"] = 20, or from a
   * `heartbeat` field (seconds) of the "ready" frame if the server sends one.
   */
  heartbeatTimeout?: number;
  /** Messages send() keeps while not connected. Default 100. */
  sendQueueLimit?: number;
  /** Resume from the last positions seen when reconnecting. Default true. */
  recover?: boolean;
  /** Positions to resume from on the first connection (e.g. saved before a page load). */
  positions?: PositionMap | null;
  /** The server's limit on the query string. Default 8192. */
  maxQueryLength?: number;
  /**
   * How to connect. Default "auto": a websocket; if the first ones fail (closed before
   * the server's "ready", or not ready within fallbackTimeout) before any websocket has
   * worked, Server-Sent Events (EventSource), with the same events, recovery and send()
   * (as POST requests). Once an event stream has opened, event streams from then on, for
   * the life of the connection; an event stream that fails before opening (the server
   * refused the request, e.g. 403) sends the next attempt, after the backoff, back to a
   * websocket. "websocket" never falls back; "sse" never tries websockets.
   */
  transport?: Transport;
  /** ms a websocket may take to become ready before "auto" falls back. Default 10000. */
  fallbackTimeout?: number;
  /** Event streams and POSTs: send cookies cross-origin (EventSource withCredentials). Default false. */
  withCredentials?: boolean;
  /** Event streams: the CSRF token for POSTs (or a function returning it). Default: the cookie's. */
  csrfToken?: string | (() => string | null) | null;
  /** Event streams: the CSRF cookie's name, settings.CSRF_COOKIE_NAME. Default "csrftoken". */
  csrfCookieName?: string;

  // Injectable environment (tests, non-browser hosts); defaults are the globals.
  WebSocket?: new (url: string) => WebSocketLike;
  EventSource?: new (url: string, init?: { withCredentials?: boolean }) => EventSourceLike;
  fetch?: (url: string, init: { method: string; body: unknown; headers: Record<string, string>; credentials: string }) =>
    Promise<{ ok: boolean; status: number; text(): Promise<string> }>;
  /** Where the CSRF cookie is read (document.cookie). Default document. */
  document?: { cookie: string } | null;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (id: any) => void;
  /** Clock in ms. Default Date.now. */
  now?: () => number;
  /** Random numbers in [0, 1) for the jitter. Default Math.random. */
  random?: () => number;
  /** Source of "online"/"offline" events; null for none. Default window. */
  window?: NetworkEvents | null;
  /** navigator.onLine === false pauses reconnection; null for none. Default navigator. */
  navigator?: { onLine?: boolean } | null;
  /** Base of relative URLs. Default location. */
  location?: { href: string } | null;
}

export interface IncomingMessage<T = unknown> {
  /** Parsed JSON for text messages (a string if the publisher sent text); an ArrayBuffer if binary. */
  data: T;
  channel: string;
  offset: number;
  epoch: string;
  binary: boolean;
}

export interface SubscribedEvent {
  channel: string;
  offset: number;
  epoch: string;
  /** true: every missed message was replayed; false: some were lost; null: nothing was asked. */
  recovered: boolean | null;
}

export interface CloseInfo {
  /** The socket's close code; 1006 when the client gave up on a silent or offline socket. */
  code: number;
  reason: string;
  wasClean: boolean;
  /**
   * false after close() (emitted by close() itself while no socket was open: waiting
   * to reconnect, offline), on 4100-4199, or once maxRetries is reached.
   */
  willReconnect: boolean;
}

export interface ErrorInfo {
  /**
   * "server": an error frame; "protocol": an undecodable frame; "socket": the WebSocket
   * (or EventSource) constructor threw; "publish": an event stream's POST of a sent
   * message failed (`status`: its HTTP status, 0 for a network error).
   */
  source: "server" | "protocol" | "socket" | "publish";
  message: string;
  status?: number;
  error?: unknown;
}

export interface EventMap {
  open: { url: string; transport: "websocket" | "sse" };
  message: IncomingMessage;
  subscribed: SubscribedEvent;
  recovered: { channel: string };
  notrecovered: { channel: string };
  ready: {};
  error: ErrorInfo;
  close: CloseInfo;
  reconnecting: { attempt: number; delay: number };
  /**
   * The server closed the connection with 4100-4199 (a logout, django_ws.disconnect()):
   * the connection is closed for good; the page decides what comes next.
   */
  disconnected: { code: number; reason: string };
  status: Status;
  /** "auto" fell back to Server-Sent Events ("sse"), or back to websockets after a refused stream. */
  transport: "websocket" | "sse";
  /** A user's first connection to a channel opened (with `presence`). */
  join: { channel: string; user: string; info: unknown };
  /** A user's last connection to a channel closed (with `presence`). */
  leave: { channel: string; user: string };
  /** The server ended this subscription (django_ws.unsubscribe()); the socket stays open. */
  unsubscribed: { channel: string };
}

export interface PresenceMember {
  user: string;
  connections: number;
  /** Unix time (seconds) of the user's earliest connection. */
  since: number;
  info: unknown;
}

export interface Roster {
  channel: string;
  members: PresenceMember[];
  users: number;
  /** Connections without a user: counted, never listed. */
  anonymous: number;
  connections: number;
}

export class Connection {
  constructor(target: string | Target, options?: Options);
  /** The endpoint URL (without the recover parameter). */
  readonly url: string;
  readonly status: Status;
  /** The transport in use (or about to be): "websocket" or "sse". */
  readonly transport: "websocket" | "sse";
  readonly options: Required<BackoffOptions> & Options;
  on<K extends keyof EventMap>(name: K, listener: (this: Connection, event: EventMap[K]) => void): this;
  off<K extends keyof EventMap>(name: K, listener: (this: Connection, event: EventMap[K]) => void): this;
  /**
   * Send a string as text, binary data as binary, anything else as JSON text.
   * Queued (up to sendQueueLimit) until the server is ready; false if dropped.
   */
  send(data: unknown): boolean;
  /**
   * Stop for good: the socket is closed, no timer is left, nothing reconnects. Emits
   * "close" (code 1000, willReconnect false) unless one has already said it is over.
   */
  close(reason?: string): void;
  /** Drop the current socket and connect again now. */
  reconnect(): void;
  /** The last positions seen. */
  positions(): PositionMap;
  /** Who is connected to `channel` ("broadcast", "user", "group:<name>") now. */
  presence(channel: string): Promise<Roster>;
}

export function connect(target: string | Target, options?: Options): Connection;

// Pure functions, exported for tests and advanced use.

export class Positions {
  constructor(initial?: PositionMap | null);
  readonly size: number;
  get(label: string): Position | undefined;
  has(label: string): boolean;
  /** Record a message; false if it is a duplicate or malformed. */
  message(channel: string, offset: number, epoch: string): boolean;
  /** Record the server's position from a "subscribed" frame (always wins). */
  subscribed(channel: string, offset: number, epoch: string): void;
  retain(labels: Set<string>): void;
  toJSON(): PositionMap;
}

export function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;
export function buildUrl(target: string | Target, location?: { href: string } | null): string;
export function withRecover(url: string, positions: PositionMap | null, maxQueryLength?: number): string;
export function encodeRecover(positions: PositionMap, maxLength?: number): string;
export function checkHeartbeat(now: number, lastActivity: number, timeout: number): { dead: boolean; wait: number };
export function decodeFrame(data: string | ArrayBuffer | ArrayBufferView): { type: string; [key: string]: unknown };
export function encodeOutgoing(data: unknown): string | ArrayBuffer | ArrayBufferView | Blob;
export function isValidPosition(offset: unknown, epoch: unknown): boolean;
/** The data of a Server-Sent Event as a frame; base64 binary payloads become ArrayBuffers. */
export function decodeEventData(text: string): { type: string; [key: string]: unknown };
/** The value of a cookie in a document.cookie string, or null. */
export function readCookie(cookies: string, name: string): string | null;
/** The http(s) URL of the event stream at a websocket URL. */
export function streamUrl(url: string): string;
/** The http(s) URL answering who is connected to a channel of the facility at `url`. */
export function presenceUrl(url: string, channel: string): string;
/** An event stream with a WebSocket's face, as the Connection uses it. */
export class EventStreamSocket implements WebSocketLike {
  constructor(url: string, env: object);
  readonly readyState: number;
  readonly url: string;
  binaryType: string;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code?: number; reason?: string; wasClean?: boolean }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onsendfailed: ((failure: { status: number; message: string }) => void) | null;
  send(data: string | ArrayBuffer | ArrayBufferView | Blob): void;
  close(): void;
}

export const CLOSE_CODES: {
  NORMAL: 1000;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  /** The worker is reloading: the client reconnects and recovers. */
  SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013;
  SLOW_CONSUMER: 4008;
  HEARTBEAT_TIMEOUT: 4009;
  TOO_OLD: 4010;
  DISCONNECTED: 4100;
};
/** True for 4100-4199: the server closed this identity's connections; no reconnection. */
export function isTerminalClose(code: number | undefined): boolean;
export const DEFAULTS: Readonly<Options>;
export const MAX_QUERY_LENGTH: number;
export const MAX_RECOVER_CHANNELS: number;

declare const DjangoWs: {
  connect: typeof connect;
  Connection: typeof Connection;
  Positions: typeof Positions;
  backoffDelay: typeof backoffDelay;
  buildUrl: typeof buildUrl;
  withRecover: typeof withRecover;
  encodeRecover: typeof encodeRecover;
  checkHeartbeat: typeof checkHeartbeat;
  decodeFrame: typeof decodeFrame;
  encodeOutgoing: typeof encodeOutgoing;
  decodeEventData: typeof decodeEventData;
  readCookie: typeof readCookie;
  streamUrl: typeof streamUrl;
  presenceUrl: typeof presenceUrl;
  EventStreamSocket: typeof EventStreamSocket;
  isValidPosition: typeof isValidPosition;
  CLOSE_CODES: typeof CLOSE_CODES;
  DEFAULTS: typeof DEFAULTS;
  MAX_QUERY_LENGTH: number;
  MAX_RECOVER_CHANNELS: number;
};
export default DjangoWs;

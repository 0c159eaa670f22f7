// django_ws.mjs - the django_ws.js client as an ES module.
//
//   import { connect } from "/static/django_ws/django_ws.mjs";
//
// django_ws.js is a plain script (so that a <script> tag can load it); importing it
// runs it, and it leaves its API on globalThis.DjangoWs, re-exported here.
import "./django_ws.js";

const DjangoWs = globalThis.DjangoWs;

export default DjangoWs;
export const {
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
} = DjangoWs;

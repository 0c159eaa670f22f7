// Compiled by tests/test_js.py with tsc --strict: the declarations (django_ws.d.ts)
// accept what the docs show and refuse what the client refuses.
import DjangoWs, { CLOSE_CODES, connect, isTerminalClose, type Connection, type Options } from "../../django_ws/static/django_ws/django_ws";

const options: Options = { transport: "auto", maxRetries: 5, fallbackTimeout: 3000 };
const conn: Connection = connect({ facility: "chat", subscribe: ["broadcast", "user"], echo: true }, options);
conn.on("message", ({ data, channel, offset, epoch, binary }) => console.log(data, channel, offset, epoch, binary));
conn.on("close", ({ code, willReconnect }) => console.log(code === CLOSE_CODES.SERVICE_RESTART, willReconnect));
conn.on("transport", (transport) => console.log(transport === "websocket" || transport === "sse"));
conn.on("disconnected", ({ code, reason }) => console.log(isTerminalClose(code), reason));
const restart: 1012 = DjangoWs.CLOSE_CODES.SERVICE_RESTART;
const sent: boolean = conn.send({ text: "hi" });
conn.close("bye");
console.log(restart, sent, conn.positions(), conn.status);

// @ts-expect-error: no such event
conn.on("nope", () => {});
// @ts-expect-error: no such transport
connect("wss://example.com/ws/chat", { transport: "longpoll" });
// @ts-expect-error: no such audience
connect({ facility: "chat", subscribe: ["everyone"] });

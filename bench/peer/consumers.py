"""The peer's consumer: join the broadcast group "bench" and, with ?id=<k>, the
per-connection group "u<k>" (the targeted mix); forward group messages as text frames.

After joining, it sends {"type":"ready"}, as our websocket instance does once its
subscriptions are confirmed, so that the load generator times both the same way.
"""

from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer


class BenchConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        query = parse_qs(self.scope["query_string"].decode("ascii"))
        self.joined = ["bench"] + [f"u{k}" for k in query.get("id", [])[:1]]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send(text_data='{"type":"ready"}')

    async def disconnect(self, code):
        for group in getattr(self, "joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def bench_message(self, event):
        await self.send(text_data=event["text"])

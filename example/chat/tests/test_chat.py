"""The example's own tests, written with django_ws.testing as a project would.

Run with ``python manage.py test chat`` (a Redis server is needed for the live tests:
DJANGO_WS_REDIS_URL).
"""

from django.contrib.auth.models import Group, User
from django.test import TestCase

import django_ws
from django_ws.testing import WebSocketLiveServerTestCase, capture_publishes


class SayViewTests(TestCase):
    """Fast: publish() is captured, no Redis involved."""

    def test_say_publishes_to_the_public_room(self):
        alice = User.objects.create_user("alice")
        self.client.force_login(alice)
        with capture_publishes() as sent:
            response = self.client.post("/say/", {"text": "hello"})
        self.assertEqual(response.status_code, 200)
        self.assertEqual(len(sent), 1)
        self.assertEqual(sent[0].facility, "chat")
        self.assertTrue(sent[0].broadcast)
        self.assertEqual(sent[0].message, {"from": "alice", "text": "hello"})

    def test_empty_text_publishes_nothing(self):
        self.client.force_login(User.objects.create_user("bob"))
        with capture_publishes() as sent:
            response = self.client.post("/say/", {"text": "  "})
        self.assertEqual(response.status_code, 400)
        self.assertEqual(sent, [])


class LiveChatTests(WebSocketLiveServerTestCase):
    """Real websockets to a live server, real Redis."""

    def test_private_message_reaches_only_its_user(self):
        alice = User.objects.create_user("alice")
        bob = User.objects.create_user("bob")
        with (
            self.websocket("chat", "subscribe-user&subscribe-broadcast", user=alice) as to_alice,
            self.websocket("chat", "subscribe-user&subscribe-broadcast", user=bob) as to_bob,
        ):
            django_ws.publish("chat", "psst, alice", users=[alice])
            django_ws.publish("chat", "everyone", broadcast=True)
            self.assertEqual(to_alice.receive_message(), "psst, alice")
            self.assertEqual(to_alice.receive_message(), "everyone")
            self.assertEqual(to_bob.receive_message(), "everyone")  # and nothing before it

    def test_group_room(self):
        team = Group.objects.create(name="team")
        carol = User.objects.create_user("carol")
        carol.groups.add(team)
        with self.websocket("chat", "subscribe-group", user=carol) as ws:
            self.assertIn("group:team", ws.subscribed)
            django_ws.publish("chat", {"room": "team"}, groups=[team])
            self.assertEqual(ws.receive_message(), {"room": "team"})

    def test_anonymous_visitors_cannot_subscribe_to_user_channels(self):
        import websocket

        with self.assertRaises(websocket.WebSocketBadStatusException) as refused:
            self.websocket("chat", "subscribe-user")
        self.assertEqual(refused.exception.status_code, 403)

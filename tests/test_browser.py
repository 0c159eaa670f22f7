"""The demo in a real browser: Debian's Chromium driven by Playwright (never a downloaded one)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

import django_ws
from tests.conftest import ROOT, cmdline, descendants, free_port, start_stack, stop, wait_for

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


def logged_in(browser, base: str, username: str):
    """A page of the demo in its own browser context (its own cookies), logged in."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(base + "/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", "pw")
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    connected(page)
    return page


def connected(page, timeout: float = 15000) -> None:
    page.wait_for_function(
        "['connected', 'recovered'].includes(document.getElementById('status').textContent)", timeout=timeout
    )


def lines(page, pane: str) -> list[str]:
    return page.locator(f"#{pane} div").all_inner_texts()


def say(page, form: str, text: str, to: str | None = None) -> None:
    if to:
        page.select_option(f"form[data-post='/{form}/'] select", to)
    page.fill(f"form[data-post='/{form}/'] input[name=text]", text)
    page.click(f"form[data-post='/{form}/'] button")


def shows(page, pane: str, text: str, timeout: float = 10000) -> None:
    page.locator(f"#{pane} div", has_text=text).first.wait_for(timeout=timeout)


def test_two_users_chat_and_private_messages_stay_private(browser, offload_stack):
    base = offload_stack.http("")
    alice, bob, carol = (logged_in(browser, base, name) for name in ("alice", "bob", "carol"))
    say(alice, "say", "hello from alice")
    for page in (alice, bob, carol):
        shows(page, "public", "alice: hello from alice")
    say(bob, "say", "hi alice, bob here")
    shows(alice, "public", "bob: hi alice, bob here")

    say(alice, "private", "a secret for bob", to="bob")
    shows(bob, "private", "a secret for bob")
    shows(alice, "private", "a secret for bob")  # the sender's own copy
    say(bob, "team", "blue team only")
    shows(carol, "group", "blue team only")
    # Carol has seen everything published before this marker: the secret is not there.
    say(alice, "say", "marker after the secret")
    shows(carol, "public", "marker after the secret")
    assert not [t for t in lines(carol, "private") if "secret" in t]
    assert not [t for t in lines(alice, "group") if "blue team only" in t]

    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "demo-alice.png"))
    for page in (alice, bob, carol):
        page.context.close()


def _websocket_instance(stack) -> list[int]:
    """The websocket instance's master and worker, below the front of this test's stack."""
    return [pid for pid in descendants(stack.procs[0].pid) if "ini.example:websocket" in cmdline(pid)]


def _kill_instance_and_recover_the_gap(stack, page) -> list[str]:
    """SIGKILL the websocket instance, publish 3 messages while the page is cut off, and
    check that they arrive once, in order, when the respawned instance serves it again.
    Returns the lines of the public pane."""
    page.evaluate("""() => {
        window.statusSeen = [];
        window.chatConnection.on('status', (s) => window.statusSeen.push(s));
    }""")
    instance = _websocket_instance(stack)
    for pid in instance:
        os.kill(pid, signal.SIGKILL)  # processes of the stack this test started
    page.wait_for_function("window.statusSeen.includes('reconnecting')", timeout=15000)
    for i in range(3):
        django_ws.publish("chat", {"from": "server", "text": f"gap {i}"}, broadcast=True)
    # The front respawns the instance; the page reconnects and recovers the gap.
    wait_for(lambda: set(_websocket_instance(stack)) - set(instance), what="respawned instance", timeout=30)
    shows(page, "public", "gap 2", timeout=30000)
    connected(page)
    texts = lines(page, "public")
    assert [t for t in texts if "gap" in t] == ["server: gap 0", "server: gap 1", "server: gap 2"], texts
    return texts


def test_restarting_the_websocket_instance_loses_nothing(browser, project, tmp_path):
    stack = start_stack("offload", project, tmp_path)
    try:
        base = stack.http("")
        page = logged_in(browser, base, "alice")
        django_ws.publish("chat", {"from": "server", "text": "before the restart"}, broadcast=True)
        shows(page, "public", "before the restart")
        texts = _kill_instance_and_recover_the_gap(stack, page)
        assert texts.count("server: before the restart") == 1
    finally:
        for proc in stack.procs:
            stop(proc)


def test_close_stops_reconnection(browser, offload_stack):
    base = offload_stack.http("")
    closing, watching = logged_in(browser, base, "bob"), logged_in(browser, base, "carol")
    closing.evaluate("""() => {
        window.opened = 0;
        window.chatConnection.on('open', () => window.opened++);
        window.chatConnection.close();
    }""")
    closing.wait_for_function("document.getElementById('status').textContent === 'closed'")
    django_ws.publish("chat", {"from": "server", "text": "after close"}, broadcast=True)
    shows(watching, "public", "after close")  # delivered to a connected page
    django_ws.publish("chat", {"from": "server", "text": "second after close"}, broadcast=True)
    shows(watching, "public", "second after close")
    assert not [t for t in lines(closing, "public") if "after close" in t]
    assert closing.evaluate("window.opened") == 0
    assert closing.locator("#status").inner_text() == "closed"
    for page in (closing, watching):
        page.context.close()


def test_logout_in_another_tab_closes_the_page_for_good(browser, offload_stack):
    base = offload_stack.http("")
    page = logged_in(browser, base, "alice")
    page.evaluate("""() => {
        window.opened = 0;
        window.chatConnection.on('open', () => window.opened++);
    }""")
    other_tab = page.context.new_page()  # the same browser session
    other_tab.goto(base + "/")
    other_tab.click("form[action='/logout/'] button")
    other_tab.wait_for_url(base + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'signed out'")
    private = {"kind": "private", "from": "bob", "to": "alice", "text": "after logout"}
    django_ws.publish("chat", private, users=["alice"])
    watching = logged_in(browser, base, "carol")
    django_ws.publish("chat", {"from": "server", "text": "marker after logout"}, broadcast=True)
    shows(watching, "public", "marker after logout")
    assert not [t for t in lines(page, "private") if "after logout" in t]
    assert page.evaluate("window.opened") == 0  # it never came back with the old cookie
    assert page.evaluate("window.chatConnection.status") == "closed"
    for p in (page, watching):
        p.context.close()


def test_screenshot_of_the_demo(browser, offload_stack):
    base = offload_stack.http("")
    alice, bob = logged_in(browser, base, "alice"), logged_in(browser, base, "bob")
    say(alice, "say", "Hi everyone! Messages are pushed by Django through uWSGI and Redis.")
    shows(bob, "public", "Hi everyone!")
    say(bob, "say", "Hello alice, it works in real time.")
    say(bob, "private", "This one is just for you.", to="alice")
    shows(alice, "private", "just for you")
    say(alice, "team", "Red team, meet at noon.")
    shows(alice, "group", "meet at noon")
    django_ws.publish("chat", {"kind": "notification", "text": "Deploy finished (manage.py notify)"}, broadcast=True)
    alice.locator("#notifications div", has_text="Deploy finished").wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "demo.png"
    alice.screenshot(path=str(path))
    assert path.stat().st_size > 10000
    docs = ROOT / "docs" / "screenshot.png"
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        docs.parent.mkdir(exist_ok=True)
        docs.write_bytes(Path(path).read_bytes())
    for page in (alice, bob):
        page.context.close()


def _blocking_server(upstream_port: int, port: int) -> str:
    """The deployment guide's nginx block (docs/howto/deploy.md), changed into a proxy that strips
    websocket upgrades (as some corporate proxies do): event streams and pages pass, websockets cannot."""
    from tests.test_nginx import readme_server

    server = readme_server(upstream_port, port)
    blocked = server.replace("proxy_set_header Upgrade $http_upgrade;", 'proxy_set_header Upgrade "";')
    blocked = blocked.replace('proxy_set_header Connection "upgrade";', 'proxy_set_header Connection "";')
    assert blocked.count('Upgrade "";') == 1 and blocked != server
    return blocked


def test_falls_back_to_event_streams_where_websockets_are_blocked(browser, project, tmp_path):
    from tests.test_nginx import running_nginx

    stack = start_stack("offload", project, tmp_path)
    try:
        port = free_port()
        with running_nginx(_blocking_server(stack.port, port), port, tmp_path):
            base = f"http://127.0.0.1:{port}"
            alice, bob = logged_in(browser, base, "alice"), logged_in(browser, base, "bob")
            for page in (alice, bob):
                assert page.evaluate("window.chatConnection.transport") == "sse"
                assert page.locator("#transport").inner_text() == "event stream"
            # The websocket handshakes went through nginx and failed (426: no upgrade);
            # the event streams are open (nginx logs a request when it ends).
            log = (tmp_path / "access.log").read_text()
            assert len(re.findall(r'"GET /ws/chat\?[^"]*" 426 ', log)) == 2, log

            say(alice, "say", "hello over an event stream")
            shows(bob, "public", "alice: hello over an event stream")
            say(alice, "private", "a secret over sse", to="bob")
            shows(bob, "private", "a secret over sse")
            # send() publishes with a POST (CSRF token from the cookie) to the facility URL.
            alice.evaluate("""() => {
                window.sendErrors = [];
                window.chatConnection.on('error', (e) => window.sendErrors.push(e));
                window.published = new DjangoWs.Connection(
                    {url: window.chatConnection.url, subscribe: [], publish: ['broadcast']},
                    {transport: 'sse'});
                window.published.on('error', (e) => window.sendErrors.push(e));
                window.published.send('sent with send()');
            }""")
            shows(bob, "public", "sent with send()")
            assert alice.evaluate("window.sendErrors") == []
            log = (tmp_path / "access.log").read_text()
            assert re.search(r'"POST /ws/chat\?[^"]*publish-broadcast[^"]*" 200 ', log), log

            # Recovery works the same on an event stream.
            _kill_instance_and_recover_the_gap(stack, bob)
            assert bob.evaluate("window.chatConnection.transport") == "sse"
            for page in (alice, bob):
                page.context.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def test_forced_event_stream_without_a_proxy(browser, offload_stack):
    base = offload_stack.http("")
    context = browser.new_context()
    page = context.new_page()
    page.goto(base + "/?transport=sse")
    connected(page)
    assert page.evaluate("window.chatConnection.transport") == "sse"
    django_ws.publish("chat", {"from": "server", "text": "forced stream"}, broadcast=True)
    shows(page, "public", "forced stream")
    context.close()


def test_the_demo_shows_who_is_online_in_each_room(browser, offload_stack, project):
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from django.contrib.auth.models import Group, User

    def orm(fn):  # Playwright's loop runs in this thread: Django's ORM wants another one
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(fn).result()

    # Users of their own: other tests' pages may still be connected as alice, bob, carol.
    names = sorted("u" + uuid.uuid4().hex[:8] for _ in range(2))

    def create():
        team = Group.objects.create(name="team " + names[0])
        users = [User.objects.create_user(name, password="pw") for name in names]
        for user in users:
            user.groups.set([team])
        return team, users

    team, users = orm(create)
    try:
        base = offload_stack.http("")
        first = logged_in(browser, base, names[0])
        online = "div.online[data-channel='{}'] b"
        room = online.format(f"group:{team.name}")

        def shows_exactly(page, selector: str, text: str) -> None:
            page.wait_for_function(
                "([selector, text]) => (document.querySelector(selector) || {}).textContent === text",
                arg=[selector, text],
                timeout=10000,
            )

        shows_exactly(first, room, names[0])
        first.locator(online.format("broadcast"), has_text=names[0]).wait_for(timeout=10000)
        second = logged_in(browser, base, names[1])
        # The first page hears the second user join, in the public room and in their group's room.
        shows_exactly(first, room, ", ".join(names))
        first.locator(online.format("broadcast"), has_text=names[1]).wait_for(timeout=10000)
        shows_exactly(second, room, ", ".join(names))  # the roster read once connected
        second.context.close()  # the second user's last tab: they leave both rooms
        shows_exactly(first, room, names[0])
        first.wait_for_function(
            "([sel, name]) => !(document.querySelector(sel) || {textContent: name}).textContent.includes(name)",
            arg=[online.format("broadcast"), names[1]],
            timeout=10000,
        )
        first.context.close()
    finally:

        def delete():
            for user in users:
                user.delete()
            team.delete()

        orm(delete)

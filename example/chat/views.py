"""The example chat: every message is published by a view, under the sender's real name."""

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

import django_ws

FACILITY = "chat"


def index(request: HttpRequest) -> HttpResponse:
    context = {}
    if request.user.is_authenticated:
        context["groups"] = list(request.user.groups.values_list("name", flat=True))
        context["others"] = list(
            User.objects.exclude(pk=request.user.pk).order_by("username").values_list("username", flat=True)
        )
    return render(request, "chat/index.html", context)


def _text(request: HttpRequest) -> str:
    return request.POST.get("text", "").strip()[:500]


@require_POST
@login_required
def say(request: HttpRequest) -> JsonResponse:
    """Publish a line to the public room (broadcast)."""
    text = _text(request)
    if not text:
        return JsonResponse({"error": "empty message"}, status=400)
    [published] = django_ws.publish(FACILITY, {"from": request.user.get_username(), "text": text}, broadcast=True)
    return JsonResponse({"offset": published.offset})


@require_POST
@login_required
def private(request: HttpRequest) -> JsonResponse:
    """Send a private message: to its recipient, and to the sender's other tabs."""
    text = _text(request)
    to = request.POST.get("to", "")
    if not text or not User.objects.filter(username=to).exists():
        return JsonResponse({"error": "empty message or unknown user"}, status=400)
    me = request.user.get_username()
    django_ws.publish(FACILITY, {"kind": "private", "from": me, "to": to, "text": text}, users=sorted({to, me}))
    return JsonResponse({"sent": True})


@require_POST
@login_required
def team(request: HttpRequest) -> JsonResponse:
    """Post to the rooms of the sender's groups."""
    text = _text(request)
    groups = list(request.user.groups.values_list("name", flat=True))
    if not text or not groups:
        return JsonResponse({"error": "empty message or no group"}, status=400)
    payload = {"kind": "group", "from": request.user.get_username(), "text": text, "groups": groups}
    django_ws.publish(FACILITY, payload, groups=groups)
    return JsonResponse({"sent": True})


def presence_info(request: HttpRequest) -> dict[str, str] | None:
    """What the room shows next to a member who is online (DJANGO_WS["PRESENCE_INFO"])."""
    user = request.user
    if not user.is_authenticated:
        return None
    return {"name": user.get_full_name() or user.get_username()}

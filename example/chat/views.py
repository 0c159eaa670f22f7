from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

import django_ws


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/index.html")


@require_POST
@login_required
def say(request: HttpRequest) -> JsonResponse:
    """Publish a chat line to the public room, from an ordinary view."""
    text = request.POST.get("text", "").strip()[:500]
    if not text:
        return JsonResponse({"error": "empty message"}, status=400)
    [published] = django_ws.publish("chat", {"from": request.user.get_username(), "text": text}, broadcast=True)
    return JsonResponse({"offset": published.offset})

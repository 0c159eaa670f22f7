"""Group removals apply to open connections (``UNSUBSCRIBE_ON_GROUP_REMOVAL``).

A socket opened while its user was in a group keeps that group's subscription for
as long as it lives, unless told otherwise. When ``User.groups`` loses members (from
either side: ``user.groups.remove(group)``, ``group.user_set.remove(user)``,
``clear()``, or ``set()`` dropping some), the affected users' connections end that
group's subscription in every facility through :func:`django_ws.unsubscribe`.
"""

from __future__ import annotations

import logging
from typing import Any

from uwsgi_ws.exceptions import PublishError

from .conf import get_settings

logger = logging.getLogger(__name__)

_CLEARED = "_django_ws_cleared"  # instance attribute: what a clear() is about to remove


def on_groups_changed(
    sender: Any, instance: Any, action: str, reverse: bool, model: Any, pk_set: Any, **kw: Any
) -> None:
    """``m2m_changed`` receiver for ``User.groups.through``."""
    if action not in ("pre_clear", "post_clear", "post_remove") or not get_settings().unsubscribe_on_group_removal:
        return
    if action == "pre_clear":
        # After the clear nothing tells what was removed: read it now.
        related = instance.user_set.all() if reverse else instance.groups.all()
        setattr(instance, _CLEARED, list(related))
        return
    if action == "post_clear":
        removed = getattr(instance, _CLEARED, [])
        if hasattr(instance, _CLEARED):
            delattr(instance, _CLEARED)
    else:
        removed = list(model.objects.filter(pk__in=pk_set or ()))
    if not removed:
        return
    from .publishing import unsubscribe

    try:
        if reverse:  # instance is a group, removed are users
            unsubscribe(users=removed, group=instance)
        else:
            for group in removed:
                unsubscribe(users=[instance], group=group)
    except PublishError as exc:
        logger.warning("could not end the group subscriptions of open connections: %s", exc)

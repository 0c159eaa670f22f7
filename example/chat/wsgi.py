"""WSGI entry points of the example.

``application`` is for the front instance of the offload mode (plain Django);
``single_instance`` serves Django and websockets together under uWSGI --gevent.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")


def _application():
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def _single_instance():
    from django_ws.wsgi import get_wsgi_application

    return get_wsgi_application()


if os.environ.get("DJANGO_WS_SINGLE_INSTANCE") == "1":
    application = _single_instance()
else:
    application = _application()

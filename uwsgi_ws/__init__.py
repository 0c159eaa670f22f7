"""The websocket side of django-uwsgi-ws: runs inside uWSGI's gevent loop, never imports Django."""

__version__ = "0.1.0"

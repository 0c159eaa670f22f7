from django.apps import AppConfig


class DjangoWsConfig(AppConfig):
    name = "django_ws"
    verbose_name = "Websockets over uWSGI and Redis"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)

from django.apps import AppConfig


class DjangoWsConfig(AppConfig):
    name = "django_ws"
    verbose_name = "Websockets over uWSGI and Redis"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out

        from . import checks  # noqa: F401  (registers the system checks)
        from .logout import on_user_logged_out

        user_logged_out.connect(on_user_logged_out, dispatch_uid="django_ws.logout")

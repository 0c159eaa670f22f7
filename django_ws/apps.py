from django.apps import AppConfig


class DjangoWsConfig(AppConfig):
    name = "django_ws"
    verbose_name = "Websockets over uWSGI and Redis"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out

        from . import checks  # noqa: F401  (registers the system checks)
        from .logout import on_user_logged_out

        user_logged_out.connect(on_user_logged_out, dispatch_uid="django_ws.logout")

        from django.apps import apps

        if apps.is_installed("django.contrib.auth"):
            from django.contrib.auth import get_user_model
            from django.db.models.signals import m2m_changed

            from .groups import on_groups_changed

            groups = getattr(get_user_model(), "groups", None)
            if groups is not None:  # a custom user model may have no groups
                m2m_changed.connect(on_groups_changed, sender=groups.through, dispatch_uid="django_ws.groups")

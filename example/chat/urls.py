from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("say/", views.say, name="say"),
    path("private/", views.private, name="private"),
    path("team/", views.team, name="team"),
    path("login/", auth_views.LoginView.as_view(template_name="chat/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
]

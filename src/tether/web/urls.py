"""The web UI's routes, mounted at `/` after the API's."""

from django.contrib.auth import views as auth_views
from django.urls import path

from . import account_views, audit_views, fleet_views, run_views, setup_views, views

app_name = "web"

urlpatterns = [
    path("static/web/<path:path>", views.static_file, name="static"),
    path("login/", account_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="web:login"), name="logout"),
    path("", fleet_views.fleet, name="fleet"),
    path("fleet/rows/", fleet_views.fleet_rows, name="fleet-rows"),
    path("agents/<int:agent_id>/", views.agent_detail, name="agent"),
    path("agents/<int:agent_id>/status/", views.agent_status, name="agent-status"),
    path("agents/<int:agent_id>/history/", views.agent_history, name="agent-history"),
    path("agents/<int:agent_id>/run/", views.run_command, name="agent-run"),
    path("agents/<int:agent_id>/template-params/", views.template_params, name="template-params"),
    path("commands/<int:command_id>/", views.command_detail, name="command"),
    path("commands/<int:command_id>/cancel/", views.command_cancel, name="command-cancel"),
    path("commands/<int:command_id>/console/", views.command_console, name="command-console"),
    path("runs/", run_views.runs_page, name="runs"),
    path("runs/agents/", run_views.run_picker, name="run-picker"),
    path("runs/template-params/", run_views.run_template_params, name="run-template-params"),
    path("runs/<int:run_id>/", run_views.run_detail, name="run"),
    path("runs/<int:run_id>/cancel/", run_views.run_cancel, name="run-cancel"),
    path("deployments/<int:deployment_id>/", views.deployment_detail, name="deployment"),
    path("servers/", setup_views.servers, name="servers"),
    path("servers/<int:server_id>/rotate/", setup_views.server_rotate, name="server-rotate"),
    path("servers/<int:server_id>/install/", setup_views.server_install, name="server-install"),
    path("servers/<int:server_id>/delete/", setup_views.server_delete, name="server-delete"),
    path("templates/", setup_views.templates, name="templates"),
    path("templates/<int:template_id>/", setup_views.template_edit, name="template-edit"),
    path(
        "templates/<int:template_id>/delete/", setup_views.template_delete, name="template-delete"
    ),
    path("account/tokens/", account_views.tokens, name="tokens"),
    path("audit/", audit_views.audit_page, name="audit"),
    path("account/tokens/<int:token_id>/revoke/", account_views.token_revoke, name="token-revoke"),
]
urlpatterns += [
    path(
        f"agents/<int:agent_id>/{action}/",
        views.agent_action,
        {"action": action},
        name=f"agent-{action}",
    )
    for action in (*views.LIFECYCLE_ACTIONS, "certificate")
]
urlpatterns += [
    path(
        f"commands/<int:command_id>/{stream}.txt",
        views.command_raw,
        {"stream": stream},
        name=f"command-{stream}",
    )
    for stream in ("stdout", "stderr")
]

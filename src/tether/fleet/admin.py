from django.contrib import admin

from .models import Agent, Server


@admin.register(Server)
class ServerAdmin(admin.ModelAdmin):
    list_display = ["name", "host", "owner", "created_at"]
    exclude = ["token_hash", "ssh_private_key_encrypted"]


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["hostname", "server", "status", "version", "last_heartbeat"]
    list_filter = ["status"]
    exclude = ["token_hash", "secret_key_encrypted"]

from django.contrib import admin

from .models import Command, CommandTemplate


@admin.register(Command)
class CommandAdmin(admin.ModelAdmin):
    list_display = ["id", "agent", "status", "exit_code", "created_at"]
    list_filter = ["status"]


admin.site.register(CommandTemplate)

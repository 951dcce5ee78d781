"""The audit log page: the events the user may read (staff: all, others: their own), with
the API's filters as a GET form. The filters are read by the API's own serializer, so the
page refuses what `GET /api/audit/` refuses, with the same message."""

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from rest_framework.exceptions import ValidationError

from tether.accounts.api.audit import filtered_events
from tether.accounts.models import AuditEvent
from tether.errors import first_message

AUDIT_PAGE = 100  # events per page
FILTERS = ("actor", "action", "target", "since", "until")


@login_required
@require_GET
def audit_page(request: HttpRequest) -> HttpResponse:
    error, status = "", 200
    try:
        events = filtered_events(request.user, request.GET)
    except ValidationError as exc:
        error, status = first_message(exc.detail), 400
        events = AuditEvent.objects.none()
    page = Paginator(events, AUDIT_PAGE).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "events": page.object_list,
        "error": error,
        "filters": {key: request.GET.get(key, "") for key in FILTERS},
    }
    return render(request, "web/audit.html", context, status=status)

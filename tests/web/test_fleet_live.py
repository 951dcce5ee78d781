"""The fleet page's live fragment: a poll whose fingerprint (`seen`) still holds is a 204
and renders nothing; anything a row or a counter shows changes the fingerprint; an online
agent's heartbeats do not (its row says it was heard from within the offline threshold)."""

import re
from datetime import timedelta
from unittest import mock

from django.test import Client, override_settings
from django.utils import timezone

from tether.fleet import services as fleet_services
from tether.fleet.models import Agent, Server

from ..base import BaseTestCase


@override_settings(HEARTBEAT_INTERVAL=30)
class FleetFragmentTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = Client()
        self.client.force_login(self.alice)
        self.other = fleet_services.register_agent(server=self.server, hostname="web-2").agent
        fleet_services.record_heartbeat(agent=self.agent)

    def seen(self, query: str = "") -> str:
        response = self.client.get(f"/fleet/rows/{query}")
        self.assertEqual(response.status_code, 200)
        return re.search(r'name="seen" value="(\w+)"', response.content.decode()).group(1)

    def poll(self, seen: str, query: str = "?") -> int:
        return self.client.get(f"/fleet/rows/{query}&seen={seen}").status_code

    def assertRedrawnAfter(self, change: object, query: str = "?") -> None:
        seen = self.seen(query)
        self.assertEqual(self.poll(seen, query), 204)
        change()
        self.assertEqual(self.poll(seen, query), 200)

    def test_an_unchanged_fragment_is_a_204_without_rendering(self) -> None:
        seen = self.seen("?q=web")

        with self.assertTemplateNotUsed("web/_fleet_rows.html"):
            response = self.client.get(f"/fleet/rows/?q=web&seen={seen}")

        self.assertEqual(response.status_code, 204)
        self.assertEqual(response.content, b"")

    def test_the_full_page_carries_the_fingerprint_of_its_rows(self) -> None:
        page = self.client.get("/").content.decode()
        seen = re.search(r'name="seen" value="(\w+)"', page).group(1)

        self.assertEqual(self.poll(seen), 204)
        self.assertIn('hx-include="#fleet-filters, #fleet-state input"', page)

    def test_a_fingerprint_holds_only_for_its_filters_and_page(self) -> None:
        seen = self.seen("?q=web")

        self.assertEqual(self.poll(seen, "?q=web-2"), 200)
        self.assertEqual(self.poll(seen, "?q=web&status=online"), 200)

    def test_a_status_change_redraws(self) -> None:
        self.assertRedrawnAfter(
            lambda: Agent.objects.filter(pk=self.other.pk).update(status="offline")
        )

    def test_a_new_version_redraws(self) -> None:
        self.assertRedrawnAfter(lambda: Agent.objects.filter(pk=self.agent.pk).update(version="2"))

    def test_new_tags_redraw(self) -> None:
        self.assertRedrawnAfter(lambda: Agent.objects.filter(pk=self.agent.pk).update(tags=["x"]))

    def test_a_renamed_server_redraws(self) -> None:
        self.assertRedrawnAfter(lambda: Server.objects.filter(pk=self.server.pk).update(name="n"))

    def test_a_new_agent_redraws(self) -> None:
        self.assertRedrawnAfter(
            lambda: fleet_services.register_agent(server=self.server, hostname="web-3")
        )

    def test_a_removed_agent_redraws(self) -> None:
        self.assertRedrawnAfter(lambda: Agent.objects.filter(pk=self.other.pk).delete())

    def test_a_change_in_the_counters_alone_redraws(self) -> None:
        # web-2 is not on the page (filtered out), but it is counted.
        self.assertRedrawnAfter(
            lambda: Agent.objects.filter(pk=self.other.pk).update(status="online"), "?q=web-1"
        )

    def test_an_offline_agents_last_heartbeat_redraws(self) -> None:
        Agent.objects.filter(pk=self.other.pk).update(status="offline")
        self.assertRedrawnAfter(
            lambda: Agent.objects.filter(pk=self.other.pk).update(last_heartbeat=timezone.now())
        )

    def test_an_online_agents_heartbeats_do_not_redraw(self) -> None:
        seen = self.seen()
        later = timezone.now() + timedelta(seconds=20)

        Agent.objects.filter(pk=self.agent.pk).update(last_heartbeat=later)

        self.assertEqual(self.poll(seen), 204)

    def test_an_online_agent_is_said_heard_from_within_the_threshold(self) -> None:
        body = self.client.get("/fleet/rows/?q=web-1").content.decode()

        self.assertIn(">within 90 s<", body)
        self.assertNotIn("<time", body)

    def test_an_agent_not_online_shows_when_it_was_last_heard_from(self) -> None:
        beat = timezone.now() - timedelta(minutes=5)
        Agent.objects.filter(pk=self.other.pk).update(status="offline", last_heartbeat=beat)

        body = self.client.get("/fleet/rows/?q=web-2").content.decode()

        self.assertIn(f'<time datetime="{beat.isoformat()}"', body)
        self.assertIn("data-ago>5 min ago</time>", body)
        self.assertIn("data-server-now=", body)

    def test_a_pending_agent_was_never_heard_from(self) -> None:
        self.assertIn(">never<", self.client.get("/fleet/rows/?q=web-2").content.decode())


class FleetPagesTestCase(BaseTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = Client()
        self.client.force_login(self.alice)
        for n in range(2, 6):
            fleet_services.register_agent(server=self.server, hostname=f"web-{n}")

    def test_it_shows_a_page_of_rows_and_links_keep_the_filters(self) -> None:
        with mock.patch("tether.web.fleet_views.FLEET_PAGE", 2):
            first = self.client.get("/fleet/rows/?q=web&seen=stale").content.decode()
            second = self.client.get("/?q=web&page=2").content.decode()

        self.assertEqual(first.count("data-agent="), 2)
        self.assertIn("page 1 of 3", first)
        self.assertIn('href="?q=web&amp;page=2"', first)  # the fingerprint is the poll's only
        self.assertIn('name="page" value="1"', first)
        self.assertIn("web-3", second)
        self.assertNotIn("web-1<", second)
        self.assertIn('name="page" value="2"', second)
        self.assertIn('href="?q=web&amp;page=3"', second)

    def test_a_page_past_the_end_shows_the_last(self) -> None:
        with mock.patch("tether.web.fleet_views.FLEET_PAGE", 2):
            body = self.client.get("/fleet/rows/?page=99").content.decode()

        self.assertIn("page 3 of 3", body)
        self.assertIn('name="page" value="3"', body)

    def test_a_filter_shows_how_many_match(self) -> None:
        body = self.client.get("/fleet/rows/?q=web-2").content.decode()

        self.assertIn('id="count-matching">1<', body)
        self.assertIn('id="count-total">5<', body)

"""The web UI in a real Chromium (Debian's, driven by Playwright) against a real `tether
serve` and real agents: live status, live output, cancel, escaping, template quoting and
ownership, as an operator sees them. Screenshots land in var/screenshots/."""

import re
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import (
    ADMIN_PASSWORD,
    FINAL,
    ROOT,
    AgentProcess,
    Api,
    Fleet,
    TetherServer,
    wait_for,
)

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
expect = sync_api.expect
# Assertions wait as long as actions: the suite runs beside servers and agents on 2 cores.
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator["sync_api.Browser"]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def logged_in(browser: "sync_api.Browser", server: TetherServer, username: str, password: str):
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto("/")
    assert "/login/" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Fleet")
    return page


@pytest.fixture
def page(browser: "sync_api.Browser", tether: TetherServer) -> Iterator["sync_api.Page"]:
    page = logged_in(browser, tether, "admin", ADMIN_PASSWORD)
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def shared_fleet(
    tether: TetherServer, admin_api: Api, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """One online agent for the console tests of this module."""
    fleet = Fleet(tether, admin_api, tmp_path_factory.mktemp("web-fleet"))
    fleet.start_agent()
    yield fleet
    if fleet.agent_proc and fleet.agent_proc.proc and fleet.agent_proc.proc.poll() is None:
        fleet.agent_proc.kill(signal.SIGTERM)


def screenshot(page: "sync_api.Page", name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def run(page: "sync_api.Page", fleet: Fleet, command: str) -> "sync_api.Locator":
    """Type a command into the agent page's form and run it; the console that follows it."""
    page.goto(f"/agents/{fleet.agent_id}/")
    page.fill("input[name=command]", command)
    page.click("#run-form button[type=submit]")
    console = page.locator("#console .console")
    expect(console).to_have_count(1)
    return console


def test_an_agent_comes_online_without_reload_and_its_stop_has_a_live_log(
    page: "sync_api.Page", tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    status, server = admin_api.get(f"/api/servers/{fleet.server_id}/")
    assert status == 200
    # The suite's server holds more agents than one page shows: find this one by its server.
    page.goto(f"/?q={server['name']}")
    page.evaluate("window.notReloaded = true")

    state = Path(tempfile.mkdtemp(prefix="agent-", dir=tmp_path))
    fleet.agent_proc = AgentProcess(tether, fleet.server_token, state).start()
    row = page.locator("tr", has_text=server["name"])
    expect(row.locator(".badge")).to_have_text("online")
    assert page.evaluate("window.notReloaded") is True
    screenshot(page, "fleet.png")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "fleet-phone.png")
    page.set_viewport_size({"width": 1280, "height": 900})

    row.locator("a").click()
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("form[action$='/stop/'] button")
    expect(page).to_have_url(re.compile(r"/deployments/\d+/$"))
    expect(page.locator("pre.output")).to_contain_text("stopping the agent")
    expect(page.locator("[data-field=status]")).to_have_text("succeeded")
    screenshot(page, "deployment.png")
    assert fleet.agent_proc.proc.wait(timeout=15) == 0


def test_output_streams_into_the_page_while_the_command_runs(
    page: "sync_api.Page", shared_fleet: Fleet
) -> None:
    console = run(page, shared_fleet, "for i in 1 2 3; do echo tick-$i; sleep 1; done")
    output = console.locator("pre.output")
    expect(output).to_contain_text("tick-1")
    command_id = int(console.get_attribute("data-command"))
    assert shared_fleet.command(command_id)["status"] not in FINAL
    expect(console.locator("[data-field=exit]")).to_have_text("exit 0")
    expect(output).to_have_text("tick-1\ntick-2\ntick-3\n")
    expect(console.locator("[data-field=duration]")).to_contain_text(" s")
    expect(page.locator("#history")).to_contain_text("tick-$i")
    screenshot(page, "agent.png")


def test_a_running_command_is_cancelled_from_the_page(
    page: "sync_api.Page", shared_fleet: Fleet
) -> None:
    console = run(page, shared_fleet, "sleep 300")
    expect(console.locator("[data-field=status]")).to_have_text("running")
    console.locator("[data-cancel] button").click()
    expect(console.locator("[data-field=status]")).to_have_text("cancelled")
    command_id = int(console.get_attribute("data-command"))
    assert shared_fleet.command(command_id)["status"] == "cancelled"


def test_a_blank_command_is_refused_in_the_page(page: "sync_api.Page", shared_fleet: Fleet) -> None:
    run_form = run(page, shared_fleet, "echo first")
    expect(run_form.locator("[data-field=exit]")).to_have_text("exit 0")
    page.fill("input[name=command]", "   ")
    page.click("#run-form button[type=submit]")
    expect(page.locator("#console")).to_contain_text("Give either a command or a template.")


def test_check_status_answers_in_the_page(page: "sync_api.Page", shared_fleet: Fleet) -> None:
    page.goto(f"/agents/{shared_fleet.agent_id}/")
    page.click("[data-check-status]")
    # Reachable or not (the reason then), the page shows the answer instead of failing.
    expect(page.locator(".status-check")).to_contain_text("reachable")
    expect(page.locator(".status-check")).not_to_contain_text("checking")


def test_check_status_reaches_an_agent_started_with_default_flags(
    page: "sync_api.Page", tether: TetherServer, admin_api: Api, tmp_path: Path
) -> None:
    fleet = Fleet(tether, admin_api, tmp_path)
    fleet.start_agent()  # the README's flags: the RPC endpoint is on by default

    def certificate_installed() -> bool:
        status, body = admin_api.post(f"/api/agents/{fleet.agent_id}/update_certificate/", {})
        return status == 200 and bool(body["serial"]) and not body["pending"]

    try:
        wait_for(certificate_installed, timeout=10, what="the agent's certificate installed")
        page.goto(f"/agents/{fleet.agent_id}/")
        certificate = page.locator("xpath=//dt[text()='Certificate']/following-sibling::dd[1]")
        expect(certificate).to_contain_text("expires")
        page.click("[data-check-status]")
        answer = page.locator(".status-check")
        expect(answer).to_contain_text("reachable, version")
        expect(answer).not_to_contain_text("not reachable")
        screenshot(page, "check-status.png")
    finally:
        fleet.agent_proc.kill(signal.SIGTERM)


def test_html_in_output_is_shown_as_text(page: "sync_api.Page", shared_fleet: Fleet) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    payload = "<img src=x onerror=alert(1)>"
    console = run(page, shared_fleet, f"printf '%s\\n' '{payload}'")
    expect(console.locator("[data-field=exit]")).to_have_text("exit 0")
    expect(console.locator("pre.output")).to_have_text(payload + "\n")
    command_id = console.get_attribute("data-command")
    page.goto(f"/commands/{command_id}/")
    expect(page.locator("pre.output")).to_have_text(payload + "\n")
    assert page.locator("img").count() == 0
    assert dialogs == []


def test_a_template_value_cannot_add_a_command(page: "sync_api.Page", shared_fleet: Fleet) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    name = f"echo-{uuid.uuid4().hex[:6]}"
    page.goto("/templates/")
    page.fill("input[name=name]", name)
    page.fill("textarea[name=command]", "echo {value}")
    page.fill("textarea[name=parameters]", '[{"name": "value", "type": "string"}]')
    page.click("form.stack button[type=submit]")
    expect(page.locator("table")).to_contain_text(name)

    page.goto(f"/agents/{shared_fleet.agent_id}/")
    page.select_option("select[name=template]", label=name)
    page.fill("input[name=param_value]", f"; touch {marker}")
    page.click("#run-form button[type=submit]")
    console = page.locator("#console .console")
    expect(console.locator("[data-field=exit]")).to_have_text("exit 0")
    expect(console.locator("pre.output")).to_have_text(f"; touch {marker}\n")
    assert not marker.exists()


def next_fleet_poll(page: "sync_api.Page") -> "sync_api.Response":
    with page.expect_response(lambda response: "/fleet/rows/" in response.url) as polled:
        pass
    return polled.value


def test_an_unchanged_fleet_page_is_left_as_it_is_and_a_change_is_drawn(
    page: "sync_api.Page", shared_fleet: Fleet, admin_api: Api
) -> None:
    # The suite's server holds more agents than one page shows: find this one by its server.
    _, server = admin_api.get(f"/api/servers/{shared_fleet.server_id}/")
    page.goto(f"/?q={server['name']}")
    row = page.locator(f'tr[data-agent="{shared_fleet.agent_id}"]')
    expect(row.locator(".badge")).to_have_text("online")
    page.evaluate("document.querySelector('#fleet table').kept = true")

    # Other tests' agents may change meanwhile: some poll soon finds the page as it was.
    polls = [next_fleet_poll(page)]
    while polls[-1].status != 204 and len(polls) < 10:
        polls.append(next_fleet_poll(page))

    assert polls[-1].status == 204, [poll.status for poll in polls]
    assert "seen=" in polls[-1].url and "page=1" in polls[-1].url
    assert page.evaluate("document.querySelector('#fleet table').kept") is True
    tag = f"drawn-{uuid.uuid4().hex[:6]}"
    url = f"/api/agents/{shared_fleet.agent_id}/"
    assert admin_api.request("PATCH", url, {"tags": [tag]})[0] == 200
    try:
        expect(row.locator(".tag")).to_have_text(tag)
        assert page.evaluate("document.querySelector('#fleet table').kept") is None
    finally:
        admin_api.request("PATCH", url, {"tags": []})


def test_another_users_agent_is_not_found_and_logging_out_leads_to_login(
    browser: "sync_api.Browser", tether: TetherServer, shared_fleet: Fleet
) -> None:
    username = f"mallory-{uuid.uuid4().hex[:6]}"
    tether.create_user(username, "mallory-pw-123")
    page = logged_in(browser, tether, username, "mallory-pw-123")
    try:
        expect(page.locator("#count-total")).to_have_text("0")
        response = page.goto(f"/agents/{shared_fleet.agent_id}/")
        assert response is not None and response.status == 404
        page.goto("/")
        page.click("text=Log out")
        expect(page).to_have_url(re.compile(r"/login/$"))
        page.goto("/")
        assert "/login/?next=/" in page.url
    finally:
        page.context.close()


@pytest.fixture
def tagged_trio(tether: TetherServer, admin_api: Api, tmp_path: Path) -> Iterator[str]:
    """Three online agents, each on a server of its own, sharing a tag no other agent has."""
    tag = f"trio-{uuid.uuid4().hex[:6]}"
    fleets = [Fleet(tether, admin_api, tmp_path) for _ in range(3)]
    for fleet in fleets:  # started together, then awaited
        state = Path(tempfile.mkdtemp(prefix="agent-", dir=tmp_path))
        fleet.agent_proc = AgentProcess(tether, fleet.server_token, state).start()
    for fleet in fleets:
        fleet.agent_id = fleet.wait_online()["id"]
        status, body = admin_api.request("PATCH", f"/api/agents/{fleet.agent_id}/", {"tags": [tag]})
        assert status == 200, body
    yield tag
    for fleet in fleets:
        fleet.agent_proc.kill(signal.SIGTERM)


def test_a_run_to_three_agents_shows_three_rows_turning_succeeded_live(
    page: "sync_api.Page", tagged_trio: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"  # the targets run until the test creates it
    page.goto("/runs/")
    with page.expect_response(lambda response: f"tag={tagged_trio}" in response.url):
        page.fill("input[name=tag][form=picker-filters]", tagged_trio)
    expect(page.locator("#run-many .filters.htmx-request")).to_have_count(0)  # rows swapped in
    expect(page.locator("#picker [name=agents]")).to_have_count(3)
    page.check("#picker [data-check-all]")
    expect(page.locator("#picker [name=agents]:checked")).to_have_count(3)
    page.fill("input[name=command]", f"while [ ! -e {go} ]; do sleep 0.1; done; echo done")
    page.fill("input[name=max_concurrency]", "3")
    screenshot(page, "runs.png")
    page.click("#run-many button[type=submit]")

    expect(page).to_have_url(re.compile(r"/runs/\d+/$"))
    page.evaluate("window.notReloaded = true")
    rows = page.locator(".run-grid tr[data-command]")
    expect(rows).to_have_count(3)
    for row in rows.all():
        expect(row.locator("[data-field=status]")).to_have_text("running")
    expect(page.locator("[data-count=running]")).to_have_text("3")
    go.touch()
    for row in rows.all():
        expect(row.locator("[data-field=status]")).to_have_text("succeeded")
        expect(row.locator("[data-field=exit]")).to_have_text("0")
        expect(row.locator("[data-field=duration]")).to_contain_text(" s")
    expect(page.locator("[data-count=succeeded]")).to_have_text("3")
    expect(page.locator(".run-summary [data-field=status]")).to_have_text("succeeded")
    expect(page.locator(".run-summary [data-cancel]")).to_be_hidden()
    assert page.evaluate("window.notReloaded") is True

    rows.first.locator("[data-output]").click()
    expect(page.locator(".target-output pre.output")).to_have_text("done\n")
    screenshot(page, "run.png")
    rows.first.locator("[data-output]").click()
    expect(page.locator(".target-output")).to_have_count(0)

"""The web pages in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright; no browser is downloaded).

The service runs in a thread (uvicorn with ``create_app``, API only: no workers) on a free
loopback port with a temporary data directory; studies are submitted through the API and their
trials told to Optuna's storage (:func:`tests.test_pages.populate`), so nothing trains. Every
page is checked for console errors and photographed under ``test-artifacts/``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.config import Settings
from tests.service.test_api_studies import DIGITS_SPEC
from tests.service.test_pages import JSON, failed_trial, populate
from worker.study._studies import load_study

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
VIEWPORT = {"width": 1440, "height": 900}
#: Chromium reports every non-2xx fetch as a console error; these tests provoke some on purpose.
EXPECTED_HTTP_ERROR = "the server responded with a status of 422"

if not CHROMIUM.exists():
    pytest.fail(
        f"{CHROMIUM} is missing: install Debian's chromium package (`apt-get install chromium`)",
        pytrace=False,
    )

from playwright.sync_api import Page, sync_playwright  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    settings = Settings(home=tmp_path_factory.mktemp("home"), workers=0, cache_ttl_s=0.0)
    app = create_app(settings)
    port = free_port()
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the service did not start within 30 s")
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=base_url, headers=JSON, timeout=30)
    storage = app.state.resources.storage

    def submit(**changes: Any) -> str:
        response = api.post("/studies", json={**DIGITS_SPEC, **changes})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    studies = {
        "populated": submit(name="populated"),
        "empty": submit(name="empty"),
        "failed": submit(name="all-failed", n_trials=3),
        "one-trial": submit(name="one-trial", n_trials=1),
    }
    populate(storage, studies["populated"], completed=7, failed=1)
    failed = load_study(storage, studies["failed"])
    for reason in ("CUDA out of memory", "worker died (no heartbeat)"):
        failed.add_trial(failed_trial(reason))
    populate(storage, studies["one-trial"], completed=1)
    yield {"url": base_url, "api": api, "studies": studies, "submit": submit, "storage": storage}
    api.close()
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


class ConsoleErrors(list):
    """Console errors and uncaught exceptions of a page."""

    def unexpected(self) -> list[str]:
        return [message for message in self if EXPECTED_HTTP_ERROR not in message]


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Page, ConsoleErrors]]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors = ConsoleErrors()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    yield page, errors
    context.close()


def open_page(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("document.body.dataset.loaded === 'true'")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


FRONT_TRACE = """() => {
  const plot = document.getElementById('pareto-plot');
  const front = (plot.data || []).find((t) => t.meta && t.meta.role === 'front');
  return front ? {x: Array.from(front.x), y: Array.from(front.y), n: Array.from(front.customdata)}
               : {x: [], y: [], n: []};
}"""


# --------------------------------------------------------------------------- studies page


def test_studies_page_lists_every_study_with_its_progress(server, page):
    page, errors = page
    open_page(page, server["url"] + "/")
    for study_id in server["studies"].values():
        assert page.locator(f"#studies-body tr[data-study-id='{study_id}']").count() == 1
    populated = page.locator(f"tr[data-study-id='{server['studies']['populated']}']")
    assert "7 / 8 completed" in populated.inner_text()
    assert "1 failed" in populated.inner_text()
    assert populated.locator(".progress .done").count() == 1
    assert populated.get_by_role("button", name="Cancel").count() == 1
    page.wait_for_function("document.querySelectorAll('#f-dataset option').length > 0")
    screenshot(page, "studies")
    assert errors.unexpected() == []


def test_the_form_submits_a_study_that_then_appears_in_the_list(server, page):
    page, errors = page
    open_page(page, server["url"] + "/")
    page.wait_for_function("document.querySelectorAll('#f-families input').length > 0")
    spec = page.evaluate("JSON.parse(document.getElementById('spec-json').value)")
    assert spec["dataset"]["name"] == "digits"  # the catalog's defaults are filled in

    page.fill("#f-n-trials", "0")
    page.locator("#f-n-trials").dispatch_event("change")
    page.click("#submit-study")
    page.wait_for_selector("#form-errors:not([hidden])")
    assert "n_trials" in page.inner_text("#form-errors")  # the API's problem names the field

    page.fill("#f-name", "from-the-form")
    page.fill("#f-n-trials", "3")
    page.locator("#f-n-trials").dispatch_event("change")
    assert '"name": "from-the-form"' in page.input_value("#spec-json")
    page.click("#submit-study")
    page.wait_for_selector("#studies-body a:text-is('from-the-form')")
    listed = server["api"].get("/studies", params={"size": 50}).json()["items"]
    assert [s["n_trials"] for s in listed if s["name"] == "from-the-form"] == [3]
    screenshot(page, "studies-after-submit")
    assert errors.unexpected() == []


def test_the_json_editor_flags_malformed_json(server, page):
    page, errors = page
    open_page(page, server["url"] + "/")
    page.wait_for_function("document.getElementById('spec-json').value.length > 0")
    page.fill("#spec-json", '{"name": "broken",')
    assert "Not valid JSON" in page.inner_text("#spec-status")
    page.click("#submit-study")
    assert "not valid JSON" in page.inner_text("#form-errors")
    assert errors.unexpected() == []


def test_cancel_from_the_list(server, page):
    page, errors = page
    study_id = server["submit"](name="to-cancel")
    page.on("dialog", lambda dialog: dialog.accept())
    open_page(page, server["url"] + "/")
    row = page.locator(f"tr[data-study-id='{study_id}']")
    row.get_by_role("button", name="Cancel").click()
    row.locator(".badge.cancelled").wait_for()
    assert server["api"].get(f"/studies/{study_id}").json()["status"] == "cancelled"
    assert row.get_by_role("button", name="Cancel").count() == 0
    assert errors.unexpected() == []


# --------------------------------------------------------------------------- study page


def test_a_running_study_page_refreshes_by_itself(server, page):
    page, errors = page
    study_id = server["submit"](name="live")
    open_page(page, f"{server['url']}/studies/{study_id}")
    assert page.evaluate(FRONT_TRACE)["n"] == []
    populate(server["storage"], study_id, completed=2)
    page.wait_for_function(
        "document.querySelectorAll('#trials-table .badge.COMPLETE').length === 2"
    )
    page.wait_for_function(f"({FRONT_TRACE})().n.length > 0")
    assert "2 / 8 completed" in page.inner_text("#study-progress")
    assert errors.unexpected() == []


def test_study_page_highlights_as_many_points_as_the_api_front(server, page):
    page, errors = page
    study_id = server["studies"]["populated"]
    open_page(page, f"{server['url']}/studies/{study_id}")
    front = server["api"].get(f"/studies/{study_id}/pareto").json()["trials"]
    drawn = page.evaluate(FRONT_TRACE)
    assert sorted(drawn["n"]) == sorted(t["number"] for t in front)
    assert page.locator("#front-table tbody tr").count() == len(front)
    for plot in ("curves-plot", "hypervolume-plot", "importance-plot", "parallel-plot"):
        assert page.evaluate(f"document.getElementById('{plot}').data.length") > 0, plot
    assert page.inner_text("#study-name") == "populated"
    screenshot(page, "study")
    assert errors.unexpected() == []


def test_changing_eps_redraws_the_front_from_the_radii(server, page):
    page, errors = page
    study_id = server["studies"]["populated"]
    open_page(page, f"{server['url']}/studies/{study_id}")
    before = page.evaluate(FRONT_TRACE)
    page.fill("#eps-input", "1")
    page.locator("#eps-input").dispatch_event("change")
    page.wait_for_function("document.getElementById('pareto-plot').dataset.eps === '1'")
    after = page.evaluate(FRONT_TRACE)
    front = server["api"].get(f"/studies/{study_id}/pareto", params={"eps": 1.0}).json()
    expected = sorted(
        (t["values"]["accuracy"], t["values"]["certified_accuracy_eps_1"]) for t in front["trials"]
    )
    drawn = sorted(zip(after["x"], after["y"], strict=True))
    assert len(drawn) == len(expected)
    for point, wanted in zip(drawn, expected, strict=True):
        assert point == pytest.approx(wanted)
    assert (after["x"], after["y"]) != (before["x"], before["y"])
    screenshot(page, "study-eps-1")
    assert errors.unexpected() == []


def test_requirement_filter_highlights_and_recommends(server, page):
    page, errors = page
    study_id = server["studies"]["populated"]
    open_page(page, f"{server['url']}/studies/{study_id}")
    page.fill("#eps-input", "0.5")
    page.locator("#eps-input").dispatch_event("change")
    page.wait_for_function("document.getElementById('pareto-plot').dataset.eps === '0.5'")
    page.fill("#req-certified", "0.3")
    page.locator("#req-certified").dispatch_event("change")
    page.wait_for_selector("#recommendation:not([hidden])")
    expected = server["api"].get(
        f"/studies/{study_id}/recommend", params={"eps": 0.5, "min_certified_accuracy": 0.3}
    )
    number = expected.json()["trial"]["number"]
    assert f"trial #{number}" in page.inner_text("#recommendation")
    starred = page.evaluate(
        "document.getElementById('pareto-plot').data"
        ".filter((t) => t.meta && t.meta.role === 'recommended').map((t) => t.customdata[0])"
    )
    assert starred == [number]
    screenshot(page, "study-requirement")
    assert errors.unexpected() == []


@pytest.mark.parametrize("which", ["empty", "failed", "one-trial"])
def test_empty_failed_and_one_trial_studies_render(server, page, which):
    page, errors = page
    study_id = server["studies"][which]
    open_page(page, f"{server['url']}/studies/{study_id}")
    front = page.evaluate(FRONT_TRACE)
    if which == "one-trial":
        assert len(front["n"]) == 1
    else:
        assert front["n"] == []
        message = page.evaluate("document.getElementById('pareto-plot').layout.meta.empty")
        assert "No completed trial" in message
    if which == "failed":
        assert page.locator("#trials-table .badge.FAIL").count() == 2
        assert "CUDA out of memory" in page.inner_text("#trials-table")
    screenshot(page, f"study-{which}")
    assert errors.unexpected() == []


# --------------------------------------------------------------------------- trial page


def test_trial_page_shows_curves_radii_and_parameters(server, page):
    page, errors = page
    study_id = server["studies"]["populated"]
    open_page(page, f"{server['url']}/studies/{study_id}/trials/2")
    assert page.evaluate("document.getElementById('training-plot').data.length") == 3
    assert page.evaluate("document.getElementById('radii-plot').data[0].type") == "histogram"
    assert "margin" in page.inner_text("#params-table")
    assert "certified accuracy @ 0.3" in page.inner_text("#metrics-table")
    assert page.inner_text("#mlflow-run") == "run0002"
    assert page.inner_text("#crumb-study") == "populated"
    screenshot(page, "trial")
    assert errors.unexpected() == []


def test_failed_trial_page_says_why(server, page):
    page, errors = page
    study_id = server["studies"]["failed"]
    open_page(page, f"{server['url']}/studies/{study_id}/trials/1")
    assert "worker died" in page.inner_text("#trial-failure")
    assert page.is_disabled("#register-button")
    screenshot(page, "trial-failed")
    assert errors.unexpected() == []

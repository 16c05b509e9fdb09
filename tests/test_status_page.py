"""The live status page in a real headless browser (Debian's chromium + chromedriver).

The page is loaded from the admin listener of the real proxy; a provider is forced down through
the admin API, and the page, refreshing itself, must show that provider's card turn down and the
failover in its history. `make test` installs chromium and chromium-driver when missing.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from failover_proxy.sim.faults import FaultBackend

from .conftest import FileProxy, backend_lines

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def providers() -> AsyncIterator[list[FaultBackend]]:
    backends = [FaultBackend(f"{p}-a", p) for p in ("aws", "azure", "gcp")]
    for backend in backends:
        await backend.start()
    yield backends
    for backend in backends:
        await backend.stop()


_SNAPSHOT = """
const cards = {};
for (const card of document.querySelectorAll(".provider[data-upstream='web']")) {
  cards[card.dataset.provider] = {state: card.dataset.state, class: card.className,
                                  text: card.innerText};
}
return {cards: cards, events: document.getElementById("events").innerText,
        readiness: document.getElementById("readiness").innerText};
"""


def snapshot(driver: WebDriver) -> dict[str, Any]:
    """The page as drawn at one moment (it redraws every second, so elements come and go)."""
    drawn: dict[str, Any] = driver.execute_script(_SNAPSHOT)
    return drawn


def card_states(driver: WebDriver) -> dict[str, str]:
    return {name: card["state"] for name, card in snapshot(driver)["cards"].items()}


def wait_for(driver: WebDriver, check: Callable[[WebDriver], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check(driver):
        if time.monotonic() > deadline:
            raise AssertionError(f"page never showed it; cards: {card_states(driver)}")
        time.sleep(0.1)


async def test_status_page_shows_a_forced_down_provider(
    browser: WebDriver,
    providers: list[FaultBackend],
    file_proxy: Callable[[str], Awaitable[FileProxy]],
) -> None:
    entries = backend_lines(providers)
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0, token: drill}\naccess_log: {enabled: false}\n"
        f"upstreams:\n  web:\n    backends:\n{entries}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    await asyncio.to_thread(browser.get, proxy.admin + "/")
    await asyncio.to_thread(
        wait_for, browser, lambda d: card_states(d) == {"aws": "up", "azure": "up", "gcp": "up"}
    )
    assert snapshot(browser)["readiness"] == "ready"
    async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
        forced = await admin.post("/providers/web/azure/force-down",
                                  headers={"Authorization": "Bearer drill"})
    assert forced.status_code == 200
    await asyncio.to_thread(wait_for, browser, lambda d: card_states(d)["azure"] == "down")
    page = snapshot(browser)
    azure = page["cards"]["azure"]
    assert "state-down" in azure["class"]
    assert "forced down by an operator" in azure["text"]
    assert "0% of new requests" in azure["text"]
    assert "50% of new requests" in page["cards"]["aws"]["text"]
    assert "azure left rotation, traffic to aws, gcp" in page["events"]
    # The page is self-contained: nothing it loads comes from anywhere but the admin listener.
    sources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert sources and all(src.startswith(proxy.admin) for src in sources), sources


async def test_status_page_shows_a_region_forced_down(
    browser: WebDriver,
    file_proxy: Callable[[str], Awaitable[FileProxy]],
) -> None:
    backends = [FaultBackend("aws-e", "aws", "us-east-1"), FaultBackend("aws-w", "aws", "us-west-2"),
                FaultBackend("gcp-a", "gcp", "us-central1")]
    for backend in backends:
        await backend.start()
    try:
        entries = "".join(
            f'      - {{name: {b.name}, url: "http://127.0.0.1:{b.port}", provider: {b.provider}, '
            f"region: {b.region}}}\n" for b in backends
        )
        proxy = await file_proxy(
            "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
            f"upstreams:\n  web:\n    backends:\n{entries}"
            "routes:\n  - {path_prefix: /, upstream: web}\n"
        )
        await asyncio.to_thread(browser.get, proxy.admin + "/")
        async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
            forced = await admin.post("/providers/web/aws/regions/us-east-1/force-down")
        assert forced.status_code == 200 and forced.json()["state"] == "down"

        def regions(driver: WebDriver) -> dict[str, str]:
            found: dict[str, str] = driver.execute_script(
                "const r = {}; for (const li of document.querySelectorAll("
                "\".provider[data-provider='aws'] .region\")) r[li.dataset.region] = li.innerText;"
                " return r;")
            return found

        await asyncio.to_thread(
            wait_for, browser, lambda d: "down" in regions(d).get("us-east-1", ""))
        shown = regions(browser)
        assert shown["us-east-1"] == "us-east-1 down · 0%"
        assert shown["us-west-2"].startswith("us-west-2 up")
        assert card_states(browser)["aws"] == "degraded"
        assert "aws/us-east-1 left rotation" in snapshot(browser)["events"]
    finally:
        for backend in backends:
            await backend.stop()


_CHARTS = """
const found = {};
for (const card of document.querySelectorAll(".provider[data-upstream='web']")) {
  const charts = card.querySelector(".charts");
  found[card.dataset.provider] = {
    points: Number(charts.dataset.points),
    lines: charts.querySelectorAll("polyline").length,
    captions: [...charts.querySelectorAll("figcaption")].map((c) => c.textContent),
    lever: card.querySelector(":scope > .lever").textContent,
  };
}
return found;
"""


def charts(driver: WebDriver) -> dict[str, Any]:
    found: dict[str, Any] = driver.execute_script(_CHARTS)
    return found


def click(driver: WebDriver, selector: str) -> None:
    """Find and click in one script turn: the page redraws every second."""
    driver.execute_script(f"document.querySelector({selector!r}).click()")


def answer_dialog(driver: WebDriver, text: str | None) -> str:
    """Wait for the page's prompt or confirm; type `text` (None: only accept). Its message."""
    alert = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
    assert alert
    message = alert.text
    if text is not None:
        alert.send_keys(text)
    alert.accept()
    return message


def notice(driver: WebDriver) -> str:
    shown: str = driver.execute_script("return document.getElementById('notice').textContent")
    return shown


async def test_status_page_charts_traffic_and_pulls_levers_with_the_token(
    browser: WebDriver,
    providers: list[FaultBackend],
    file_proxy: Callable[[str], Awaitable[FileProxy]],
) -> None:
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0, token: drill, history_interval: 200ms}\n"
        "access_log: {enabled: false}\n"
        f"upstreams:\n  web:\n    backends:\n{backend_lines(providers)}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    sending = True

    async def traffic() -> None:
        async with httpx.AsyncClient(trust_env=False) as http:
            while sending:
                await http.get(f"http://127.0.0.1:{proxy.port}/")
                await asyncio.sleep(0.005)

    sender = asyncio.create_task(traffic())
    try:
        await asyncio.to_thread(browser.get, proxy.admin + "/")

        def charted(driver: WebDriver) -> bool:
            shown = charts(driver)
            return len(shown) == 3 and all(
                c["points"] >= 3 and c["lines"] >= 3 and not c["captions"][0].endswith("\u2013")
                for c in shown.values())

        await asyncio.to_thread(wait_for, browser, charted, 15)
        shown = await asyncio.to_thread(charts, browser)
        for provider, card in shown.items():
            rps = float(card["captions"][0].split()[1])
            assert rps > 0, (provider, card)
            assert card["captions"][1] == "5xx 0.0%", card
            assert card["captions"][2].startswith("p99 ") and card["captions"][2].endswith(" ms")
        async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
            history = (await admin.get("/status/history")).json()
        points = history["upstreams"]["web"]["aws"]
        assert history["window_s"] == 900 and history["interval_s"] == 0.2
        assert sum(p["rps"] for p in points[-3:]) > 0 and points[-1]["error_ratio"] == 0

        # A wrong token: refused, nothing changes, the token is asked for again next time.
        lever = ".provider[data-provider='azure'] > .lever"
        await asyncio.to_thread(click, browser, lever)
        asked = await asyncio.to_thread(answer_dialog, browser, "wrong")
        assert asked == "Admin token to force down azure for web:"
        await asyncio.to_thread(
            wait_for, browser, lambda d: "refused, wrong token" in notice(d))
        assert card_states(browser)["azure"] == "up"
        # The right token forces azure down; the button turns into "restore".
        await asyncio.to_thread(click, browser, lever)
        await asyncio.to_thread(answer_dialog, browser, "drill")
        await asyncio.to_thread(
            wait_for, browser, lambda d: card_states(d)["azure"] == "down"
            and charts(d)["azure"]["lever"] == "restore")
        assert "forced down by an operator" in snapshot(browser)["cards"]["azure"]["text"]
        # The token is kept for this tab: restore asks nothing more.
        await asyncio.to_thread(click, browser, lever)
        await asyncio.to_thread(
            wait_for, browser, lambda d: charts(d)["azure"]["lever"] == "force down")
        # Drain one backend from its button.
        await asyncio.to_thread(click, browser, ".backend[data-backend='gcp-a'] .lever")

        def gcp_draining(driver: WebDriver) -> bool:
            state: str = driver.execute_script(
                "return document.querySelector(\".backend[data-backend='gcp-a']\").dataset.state")
            return state == "draining"

        await asyncio.to_thread(wait_for, browser, gcp_draining)
        async with httpx.AsyncClient(base_url=proxy.admin, trust_env=False) as admin:
            status = (await admin.get("/status")).json()
        gcp = status["upstreams"]["web"]["providers"]["gcp"]["backends"]["gcp-a"]
        assert gcp["state"] == "draining"
        assert "gcp-a: done" in await asyncio.to_thread(notice, browser)
    finally:
        sending = False
        await sender


async def test_status_page_shows_capacity_and_what_was_shed(
    browser: WebDriver,
    providers: list[FaultBackend],
    file_proxy: Callable[[str], Awaitable[FileProxy]],
) -> None:
    """Backends of 2 req/s each (a bucket of one request): a burst of twelve is mostly shed,
    and the page says how much, beside each backend's declared capacity."""
    entries = backend_lines(providers).replace("}", ", capacity: 2}")
    proxy = await file_proxy(
        "listen: {port: 0}\nadmin: {port: 0}\naccess_log: {enabled: false}\n"
        f"upstreams:\n  web:\n    backends:\n{entries}"
        "routes:\n  - {path_prefix: /, upstream: web}\n"
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        answers = [await http.get(f"http://127.0.0.1:{proxy.port}/") for _ in range(12)]
    shed = [a for a in answers if a.status_code == 503]
    assert len(shed) >= 6 and all(a.headers["retry-after"] == "1" for a in shed)
    await asyncio.to_thread(browser.get, proxy.admin + "/")
    await asyncio.to_thread(wait_for, browser, lambda d: len(card_states(d)) == 3)
    text = browser.execute_script(
        "return document.querySelector(\"article.upstream[data-upstream='web']\").innerText")
    assert f"{len(shed)} shed at capacity" in text, text
    assert "capacity 2 req/s" in snapshot(browser)["cards"]["aws"]["text"]

"""The kiosk example end to end: a real index, the real app in a subprocess, a real browser.

Chromium is Debian's (/usr/bin/chromium) driven by Selenium through Debian's chromedriver; the
session fixture installs both with apt-get when they are missing (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "kiosk" / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The network is closed here: without these, Chromium floods refused connections.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1100",
)
#: `cmn-edge`, through the interpreter running the tests.
CMN_EDGE = (sys.executable, "-c", "from cmn_edge.cli import main; main()")
WAIT = 180  # seconds; only ever a ceiling: the CPU is shared with training runs


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium and chromedriver, installed with apt-get when missing."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing and there is no apt-get to install it with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.fail(
                f"cannot install the test browser: `{' '.join(command)}` exited "
                f"{done.returncode} (needs root and the Debian mirror): {' | '.join(tail)}"
            )
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} or {CHROMEDRIVER} is missing")
    return CHROMIUM


@pytest.fixture
def browser(chromium: Path, tmp_path: Path):
    from selenium import webdriver  # pip install -e ".[test]"
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gallery_index(tmp_path_factory, photos: dict[str, Path]) -> Path:
    """A real index of the example photos plus a mirrored cat, built by the README's command."""
    tmp_path = tmp_path_factory.mktemp("kiosk")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for path in photos.values():
        shutil.copy(path, gallery / path.name)
    ImageOps.mirror(Image.open(photos["cat"]).convert("RGB")).save(gallery / "cat-mirrored.jpg")
    index = tmp_path / "index"
    build = subprocess.run(
        [*CMN_EDGE, "index", "build", str(gallery), "--index", str(index), "--threads", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert build.returncode == 0, build.stderr
    assert "indexed 6 images" in build.stdout
    return index


@pytest.fixture(scope="module")
def named_index(gallery_index: Path, photos: dict[str, Path], embedder) -> dict[int, str]:
    """Name the concepts the cat photo shares most with the gallery, as a person would."""
    from cmn_edge.index import ConceptIndex

    index = ConceptIndex.load(gallery_index)
    cat = embedder.embed([photos["cat"]])[0]
    shared = sum(cat * index.embedding(i) for i in index.ids)
    names = {int(i): f"look-{n}" for n, i in enumerate(np.argsort(-shared)[:15])}
    for concept, name in names.items():
        index.set_concept_name(concept, name)
    index.save()
    return names


@pytest.fixture(scope="module")
def kiosk(gallery_index: Path, named_index: dict[int, str]):
    """The app as a real subprocess on a free localhost port; yields its base URL."""
    tmp_path = gallery_index.parent
    port = free_port()
    log = open(tmp_path / "kiosk.log", "w")
    process = subprocess.Popen(
        [sys.executable, str(APP), "--index", str(gallery_index), "--port", str(port),
         "--threads", "2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                assert reply.status == 200
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                process.kill()
                pytest.fail(f"kiosk did not start:\n{(tmp_path / 'kiosk.log').read_text()}")
            time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    finally:
        process.kill()
        log.close()


def scores(driver) -> list[tuple[str, str]]:
    cards = driver.find_elements("css selector", "#results .hit")
    return [
        (c.get_attribute("data-name"), c.find_element("css selector", ".score").text)
        for c in cards
    ]


def test_kiosk_in_a_real_browser(
    kiosk: str, browser, photos, named_index: dict[int, str], tmp_path: Path
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    browser.get(kiosk)
    assert "Find similar photos" in browser.find_element("tag name", "h1").text
    assert "6 photos in the gallery" in browser.find_element("tag name", "header").text

    # A visitor picks the cat photo with the page's file input.
    browser.find_element("id", "photo").send_keys(str(photos["cat"]))
    wait.until(lambda d: d.find_element("id", "results").get_attribute("data-version") == "1")
    first = scores(browser)
    assert len(first) == 6  # k=8 asked, the gallery has 6
    assert first[0][0] in {"cat.jpg", "cat-mirrored.jpg"}, first
    values = [float(s) for _, s in first]
    assert values == sorted(values, reverse=True)
    # every thumbnail was served and decoded
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    ))

    # The concept chips: switching one off searches again without it; the scores change.
    chips = browser.find_elements("css selector", "#concepts .chip")
    assert len(chips) >= 3
    shown = {int(c.get_attribute("data-concept")): c.text for c in chips}
    assert shown == {i: named_index.get(i, f"#{i}") for i in shown}  # names where named
    assert set(shown) & set(named_index)
    off = chips[0].get_attribute("data-concept")
    chips[0].click()
    wait.until(lambda d: d.find_element("id", "results").get_attribute("data-version") == "2")
    assert chips[0].get_attribute("aria-pressed") == "false"
    second = scores(browser)
    assert dict(second) != dict(first), "switching the top concept off changed no score"
    assert "without 1 concept" in browser.find_element("id", "status").text

    # "Why?" on the top hit draws the heatmap of the score shown: that concept left out.
    browser.find_element("css selector", "#results .hit .why").click()
    wait.until(heatmap_loaded(f"?off={off}"))
    assert browser.find_element("id", "explain").is_displayed()
    assert "without 1 concept" in browser.find_element("id", "explain-title").text
    width = browser.execute_script("return document.getElementById('heatmap').naturalWidth")
    assert width > 400
    assert "error" not in browser.find_element("id", "status").get_attribute("class")
    masked_png = fetch(browser.find_element("id", "heatmap").get_attribute("src"))

    # The whole page in one picture: grow the window to the page's height.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 120, 4000))
    shot = tmp_path / "kiosk.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    try:  # for people reviewing the page by eye
        shutil.copy(shot, "/tmp/kiosk_screenshot.png")
    except OSError:
        pass

    # On again: the first scores exactly, and the open explanation follows.
    chips[0].click()
    wait.until(lambda d: d.find_element("id", "results").get_attribute("data-version") == "3")
    assert dict(scores(browser)) == dict(first)
    wait.until(heatmap_loaded(".png"))
    full_png = fetch(browser.find_element("id", "heatmap").get_attribute("src"))
    assert masked_png != full_png  # a different score and legend were drawn


def heatmap_loaded(src_ends: str):
    def check(driver) -> bool:
        return driver.execute_script(
            "const i = document.getElementById('heatmap');"
            "return i.src.endsWith(arguments[0]) && i.complete && i.naturalWidth > 0;",
            src_ends,
        )

    return check


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=WAIT) as reply:
        data = reply.read()
    assert data.startswith(b"\x89PNG"), url
    return data


def test_kiosk_rejects_a_file_that_is_not_a_photo(kiosk: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("this is text, not a JPEG")
    browser.get(kiosk)
    browser.find_element("id", "photo").send_keys(str(not_a_photo))
    WebDriverWait(browser, WAIT).until(
        lambda d: "error" in d.find_element("id", "status").get_attribute("class")
    )
    status = browser.find_element("id", "status").text
    assert status.startswith("notes.jpg: ") and "not an image" in status, status
    assert browser.find_elements("css selector", "#results .hit") == []

"""The HTML site in a real browser: Debian's Chromium, headless, driven by Selenium through the
system chromedriver (never Selenium Manager), loads the site from disk (file://) after a real
run (nearest-prototype, diffusion and nn-propagation on 8 Omniglot tasks, pixel features) and
`fsbench leaderboard --all --html`. It checks the rows against the store, sorts by clicking
headers, filters by setting, opens a provenance panel and saves a screenshot.

Skips, saying why, when chromium, chromedriver or selenium are missing (Debian: apt-get install
chromium chromium-driver; pip install -e ".[test]")."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewshot_bench.cli import main
from fewshot_bench.run.fixtures import write_episodic_protocol
from fewshot_bench.run.store import load_results

METHODS = ("nearest-prototype", "diffusion", "nn-propagation")
N_TASKS = 8


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
        )
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
    )
    from selenium.webdriver.chrome.service import Service

    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "chromium / chromedriver not found (Debian: apt-get install chromium chromium-driver)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in containers; the page is our own local file
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, should the page ask for it
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """(the site folder, the results store) of a real run."""
    root = tmp_path_factory.mktemp("browser")
    proto = write_episodic_protocol(root, "tiny-5w1s", n_tasks=N_TASKS, n_unlabeled=5)
    wd = root / "runs"
    run = ["run", str(proto), "--backbone", "pixels", "--quiet", "--workdir", str(wd)]
    run += ["--data-root", str(shared_data)]
    for m in METHODS:
        run += ["-m", m]
    assert main(run) == 0
    out = root / "site"
    assert main(["leaderboard", "--all", "--workdir", str(wd), "--html", str(out)]) == 0
    return out, wd / "results.sqlite"


def _text(element) -> str:
    """An element's text, whitespace collapsed (headers wrap on narrow windows)."""
    return " ".join(str(element.get_attribute("textContent")).split())


def _rows(driver) -> list[dict[str, str]]:
    """The board's visible body rows: method, setting, accuracy text and sort key, tasks."""
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.CSS_SELECTOR, "table.board")
    heads = [_text(th) for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    col = {h: i for i, h in enumerate(heads)}
    out = []
    for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        if not tr.is_displayed():
            continue
        cells = tr.find_elements(By.TAG_NAME, "td")
        acc = cells[col["Accuracy (%)"]]
        out.append(
            {
                "method": cells[col["Method"]].text.strip(),
                "setting": cells[col["Setting"]].text.strip(),
                "accuracy": acc.text.strip(),
                "key": acc.get_attribute("data-sort"),
                "tasks": cells[col["Tasks"]].text.strip(),
            }
        )
    return out


def _header(driver, text: str):
    from selenium.webdriver.common.by import By

    for th in driver.find_elements(By.CSS_SELECTOR, "table.board thead th"):
        if _text(th) == text:
            return th
    raise AssertionError(f"no column {text!r}")


def test_site_in_chromium(browser, site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, store = site
    driver = browser
    driver.get((out / "index.html").as_uri())
    assert "Leaderboards" in driver.title
    driver.find_element(By.LINK_TEXT, "tiny-5w1s").click()
    assert driver.current_url.endswith("/tiny-5w1s.html")

    # 1. rows against the store: one per method, its setting, task count and mean accuracy
    df = load_results(store)
    assert sorted(df["method"].unique()) == sorted(METHODS)
    rows = _rows(driver)
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    for r in rows:
        mine = df[df["method"] == r["method"]]
        assert r["setting"] == mine["setting"].iloc[0]
        assert r["tasks"] == str(len(mine)) == str(N_TASKS)
        assert r["accuracy"].split(" ± ")[0] == f"{100 * mine['accuracy'].mean():.2f}"
    assert [float(r["key"]) for r in rows] == sorted((float(r["key"]) for r in rows), reverse=True)
    settings = {r["method"]: r["setting"] for r in rows}
    assert set(settings.values()) == {"inductive", "transductive", "semi-supervised"}

    # 2. sorting: a click sorts ascending, a second click descending; text columns too
    acc = _header(driver, "Accuracy (%)")
    acc.click()
    assert acc.get_attribute("aria-sort") == "ascending"
    keys = [float(r["key"]) for r in _rows(driver)]
    assert keys == sorted(keys)
    acc.click()
    assert acc.get_attribute("aria-sort") == "descending"
    keys = [float(r["key"]) for r in _rows(driver)]
    assert keys == sorted(keys, reverse=True)
    _header(driver, "Method").click()
    assert [r["method"] for r in _rows(driver)] == sorted(METHODS)
    assert acc.get_attribute("aria-sort") is None

    # 3. the setting filter: only that setting's rows remain visible
    select = Select(driver.find_element(By.ID, "setting-filter"))
    options = [o.get_attribute("value") for o in select.options]
    assert options == ["", "inductive", "transductive", "semi-supervised"]
    for setting in options[1:]:
        select.select_by_value(setting)
        visible = _rows(driver)
        assert [r["method"] for r in visible] == [
            m for m in sorted(METHODS) if settings[m] == setting
        ]
        count = driver.find_element(By.ID, "shown-count").text
        assert count == f"{len(visible)} of {len(METHODS)} entries shown"
    select.select_by_value("")
    assert len(_rows(driver)) == len(METHODS)

    # 4. an entry's provenance panel opens from its link and says how to reproduce it
    panels = driver.find_elements(By.CSS_SELECTOR, "section.prov")
    assert len(panels) == len(METHODS) and not any(p.is_displayed() for p in panels)
    driver.find_element(By.LINK_TEXT, "diffusion").click()
    shown = [p for p in panels if p.is_displayed()]
    assert len(shown) == 1
    text = shown[0].text
    assert "fsbench run tiny-5w1s -m diffusion --backbone pixels --seeds 0" in text
    assert f"{N_TASKS} (sampled)" in text and "Wall time" in text

    # 5. everything it refers to is on disk (the CSS hid the panels and the script sorted,
    # so both loaded), and the scripts ran without errors
    urls = driver.execute_script(
        "return Array.from(document.querySelectorAll('[src], [href]'))"
        ".map(function (e) { return e.src || e.href; })"
    )
    assert urls and all(u.startswith("file://") for u in urls), urls
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    # 6. a screenshot of the board
    driver.get((out / "tiny-5w1s.html").as_uri())
    shot = tmp_path / "tiny-5w1s.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

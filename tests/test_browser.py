"""The page in a real browser (Debian's chromium, driven by playwright): run an episode pair and see
both videos play, then run another and see the first one's panels go at once; an example and the
task dropdown fill the boxes. Saves outputs/screenshots/app.png."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rate_core.tasks import TASKS
from tests.test_app import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_browser_runs_an_episode_and_both_videos_play():
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert app.poll() is None and time.time() < deadline, "the app did not start"
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            # the chosen task says what its agent must remember, and what the shipped checkpoints score
            page.get_by_text(TASKS["tmaze"].about[:60]).wait_for(timeout=30_000)
            assert "Shipped checkpoints, success rate" in page.inner_text("body")
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function("document.querySelectorAll('video').length >= 2", timeout=60_000)
            # both videos load and advance: they play in this browser
            page.wait_for_function(
                "Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 2 && v.currentTime > 0.3)",
                timeout=60_000)
            durations = page.evaluate("Array.from(document.querySelectorAll('video')).map(v => v.duration)")
            assert len(durations) == 2 and abs(durations[0] - durations[1]) < 0.1, durations
            page.get_by_text("Inside the memory").scroll_into_view_if_needed()
            # the memory panel is drawn (the replay's caption is there) and no progress text has been seen for
            # 2 s (the page load's own run leaves the caption there before Run's panel starts drawing)
            page.wait_for_function("""() => {
                const text = document.body.innerText;
                if (!text.includes('replayed with only the cue changed') || /processing|steps \\|/.test(text)) {
                    window.quietSince = null;
                    return false;
                }
                window.quietSince = window.quietSince || Date.now();
                return Date.now() - window.quietSince > 2000;
            }""", timeout=90_000)
            page.wait_for_timeout(1000)
            out = ROOT / "outputs" / "screenshots"
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / "app.png"), full_page=True)
            assert "success" in page.content()
            # Run again: the last run's outcome and panels go at once, and the new ones come with the new pair
            caption = "replayed with only the cue changed"
            page.locator("input[type=number]").first.fill("1")  # the seed
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_function(f"!document.body.innerText.includes('{caption}')", timeout=5_000, polling=50)
            page.get_by_text(caption).first.wait_for(timeout=90_000)
            assert "Seed 1," in page.inner_text("body")
            # an example of another task fills every box with its own values (the task's change does not
            # reset them); picking a task in the dropdown brings that task's default run
            page.get_by_text("Minigrid-Memory: seed 1, grid size = 91").click()
            grid_size = page.get_by_label("grid size (odd) (7 to 201)")
            page.wait_for_function("() => document.body.innerText.includes('Minigrid')", timeout=10_000)
            page.wait_for_timeout(1500)  # the task's change event has run
            assert grid_size.input_value() == "91"
            assert page.get_by_label("seed", exact=True).input_value() == "1"
            assert page.get_by_label("target return", exact=True).input_value() == "0.96"
            page.get_by_label("task", exact=True).click()
            page.get_by_role("option", name="tmaze").click()
            page.wait_for_timeout(1500)
            assert page.get_by_label("corridor length T (steps) (10 to 1200)").input_value() == "300"
            assert page.get_by_label("target return", exact=True).input_value() == "1"
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=10)

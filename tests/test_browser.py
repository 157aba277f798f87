"""The page in a real browser (Debian's chromium, driven by playwright): run an episode pair and see
both videos play, then run another and see the first one's panels go at once; a second Run press or
another task supersedes the run that plays; both videos restart together; an input out of range gets
the app's own message; an example and the task dropdown fill the boxes. Saves outputs/screenshots/app.png."""

import os
import re
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


def both_videos_in_step(page) -> None:
    """Both players play, on one timeline: each restarted with the run, even one whose file did not change."""
    page.wait_for_function("Array.from(document.querySelectorAll('video')).length === 2 && Array.from("
                           "document.querySelectorAll('video')).every(v => v.readyState >= 2 && v.currentTime > 0.5)",
                           timeout=60_000)
    times = page.evaluate("Array.from(document.querySelectorAll('video')).map(v => v.currentTime)")
    assert abs(times[0] - times[1]) < 0.25, times


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_browser_runs_an_episode_and_both_videos_play():
    from playwright.sync_api import expect, sync_playwright

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
            # a video that fell behind (a stalled tab) is put back on the other's time within a couple of seconds
            page.evaluate("(v => { v.currentTime = Math.max(0, v.currentTime - 1.5); })"
                          "(document.querySelector('#right_video video'))")
            page.wait_for_timeout(2500)
            both_videos_in_step(page)
            # a phone-wide window: the score table scrolls in its own box, the checkbox keeps a line's width
            page.set_viewport_size({"width": 420, "height": 900})
            page.wait_for_timeout(500)
            widths = page.evaluate("[document.querySelector('#sample_box').getBoundingClientRect().width, "
                                   "document.querySelector('#task_text table').getBoundingClientRect().right, "
                                   "window.innerWidth]")
            assert widths[0] >= 150 and widths[1] <= widths[2], widths
            page.set_viewport_size({"width": 1280, "height": 900})
            # Run again, and again within 0.3 s with another seed: the last run's outcome, videos and panels go at
            # once, the second press is not dropped but supersedes the first, and the page shows the seed it plays
            caption = "replayed with only the cue changed"
            seed, run = page.get_by_label("seed", exact=True), page.get_by_role("button", name="Run", exact=True)
            seed.fill("12")
            run.click()
            page.wait_for_function(f"!document.body.innerText.includes('{caption}')", timeout=5_000, polling=50)
            assert page.locator("video").count() == 0
            page.wait_for_timeout(200)
            seed.fill("13")
            run.click()
            outcome = page.locator("#outcome")
            # the outcome line, once the page's status text ("processing | ...") has left it
            expect(outcome).to_have_text(re.compile(r"^\s*T-Maze \(passive\): seed 13, corridor length T = 300,"),
                                         timeout=90_000)
            page.get_by_text(caption).first.wait_for(timeout=90_000)
            both_videos_in_step(page)
            # another task chosen while a run plays stops it (the outcome says so); the new task's Run is played
            page.get_by_label("task", exact=True).click()
            page.get_by_role("option", name="Memory Maze 9x9").click()
            page.wait_for_timeout(1500)
            seed.fill("41")
            run.click()
            # (the page's status text may precede the line while the run plays)
            page.wait_for_function("(t => t.includes('Playing Memory Maze') && t.includes('seed 41,'))"
                                   "(document.querySelector('#outcome').innerText)", timeout=15_000)
            page.wait_for_timeout(2000)
            page.get_by_label("task", exact=True).click()
            page.get_by_role("option", name="T-Maze (passive)").click()
            page.wait_for_function("document.querySelector('#outcome').innerText.startsWith('Stopped')", timeout=10_000)
            # picking a task in the dropdown brings that task's default run
            # (the boxes fill in as the page updates, after the outcome line: wait for them too)
            expect(page.get_by_label("corridor length T (steps) (10 to 1200)")).to_have_value("300", timeout=10_000)
            expect(page.get_by_label("target return", exact=True)).to_have_value("1", timeout=10_000)
            seed.fill("42")
            run.click()
            # (the task's default run left its caption on the page: wait for this run's outcome line first)
            expect(outcome).to_have_text(re.compile(r"^\s*T-Maze \(passive\): seed 42,"), timeout=90_000)
            page.get_by_text(caption).first.wait_for(timeout=90_000)
            page.wait_for_timeout(2000)  # the stopped Memory Maze run would have shown by now, had it not stopped
            assert "Memory Maze" not in outcome.inner_text() and '"task"\n:\n"tmaze"' in page.inner_text("body")
            both_videos_in_step(page)
            # out of the setting's range, also after a round trip through another task: the app's own message
            page.get_by_label("corridor length T (steps) (10 to 1200)").fill("3")
            run.click()
            page.wait_for_function("document.querySelector('#outcome').innerText.startsWith('Not played')",
                                   timeout=10_000)
            message = "corridor length T (steps) must be a whole number from 10 to 1200, got 3"
            assert message in outcome.inner_text() and "minimum value" not in page.inner_text("body")
            assert page.locator("video").count() == 0 and "replayed with" not in page.inner_text("body")
            # no error toast, and the emptied boxes are not badged "Error": the outcome line says it all
            assert "Error" not in page.inner_text("#left_video") + page.inner_text("#right_video")
            assert page.locator(".toast-body").count() == 0
            # a whole-number box given a fraction: the app's message, not a silent rounding to another episode
            page.get_by_label("corridor length T (steps) (10 to 1200)").fill("300")
            seed.fill("1.5")
            run.click()
            page.wait_for_function("document.querySelector('#outcome').innerText.includes('seed must be')",
                                   timeout=10_000)
            assert "seed must be a whole number from 0 to 2147483647, got 1.5" in outcome.inner_text()
            # an example of another task fills every box with its own values (the task's change does not reset them)
            page.get_by_text("Minigrid-Memory: seed 1, grid size = 91").click()
            grid_size = page.get_by_label("grid size (odd) (7 to 201)")
            page.wait_for_function("() => document.body.innerText.includes('Minigrid')", timeout=10_000)
            page.wait_for_timeout(1500)  # the task's change event has run
            assert grid_size.input_value() == "91"
            assert page.get_by_label("seed", exact=True).input_value() == "1"
            assert page.get_by_label("target return", exact=True).input_value() == "0.96"
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=10)

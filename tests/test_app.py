"""The demo page starts, serves its content, and reports unusable checkpoints instead of failing."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app.ui import build_demo, describe, shipped_checkpoints
from rate_core.checkpoint import save_checkpoint
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_describe_gives_the_parameter_count():
    text, config = describe("tmaze", "rate")
    assert "1,335,232 parameters" in text and "1,723,840" in text
    assert config["num_mem_tokens"] == 10


def test_shipped_checkpoints_lists_good_and_reports_bad(tmp_path):
    save_checkpoint(tiny_model("rate"), tmp_path / "unit_test" / "rate")
    bad = tmp_path / "unit_test" / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    rows = shipped_checkpoints(tmp_path)
    assert ["unit_test", "rate", "unit_test/rate", "ok"] in rows
    broken = [row for row in rows if row[2] == "unit_test/broken"][0]
    assert broken[3].startswith("unusable:") and "not valid JSON" in broken[3]


def test_page_serves(tmp_path):
    demo = build_demo()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as response:
            config = json.loads(response.read())
        assert "Recurrent Action Transformer with Memory" in json.dumps(config)
    finally:
        demo.close()


def test_app_py_starts_from_the_command_line():
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()
                time.sleep(0.5)
        else:
            raise AssertionError("app.py did not serve within 30 s")
    finally:
        process.terminate()
        process.wait(timeout=10)

"""The command-line tools run and print what they promise."""

import contextlib
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_summary_prints_all_tasks_next_to_the_paper():
    out = run("-m", "training.summary")
    for task, paper in [("tmaze", "1,723,840"), ("vizdoom_two_colors", "4,537,504"),
                        ("minigrid_memory", "2,000,864"), ("memory_maze", "1,639,840")]:
        line = next(line for line in out.splitlines() if line.startswith(task) and " rate " in line)
        assert paper in line
    assert "Why the counts differ" in out


def test_bench_train_runs_with_tiny_settings():
    out = run("-m", "training.bench_train", "--steps", "1", "--rate-batch", "2", "--dt-batch", "2",
              "--micro-batch", "0")
    rows = [line.split() for line in out.splitlines() if line.startswith(("rate ", "dt "))]
    assert [r[0] for r in rows] == ["rate", "dt"]
    for row in rows:
        assert float(row[4].replace(",", "")) > 0 and float(row[5]) > 0 and float(row[6].replace(",", "")) > 0
    assert "RATE vs the reference implementation" in out


def test_help_explains_options():
    assert "--rate-batch" in run("-m", "training.bench_train", "--help")
    assert "--port" in run("app.py", "--help")


def help_options(config_class, monkeypatch) -> dict[str, str]:
    """The options of a tyro CLI's --help, each with its whole help text on one line."""
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        tyro.cli(config_class, args=["--help"])
    options, current = {}, None
    for line in out.getvalue().splitlines():
        text = line.strip("│ ").strip()
        if text.startswith(("--", "[")):  # an option, or a positional argument's metavar
            current = text.split()[0]
            options[current] = text
        elif current and text:
            options[current] += " " + text
    return options


def test_every_tool_states_each_default_once(monkeypatch):
    tools = 0
    for path in sorted((ROOT / "training").glob("*.py")):
        found = re.search(r"tyro\.cli\((\w+)", path.read_text())
        if not found:
            continue
        tools += 1
        options = help_options(getattr(importlib.import_module(f"training.{path.stem}"), found.group(1)), monkeypatch)
        assert options, path.stem
        for option, text in options.items():
            assert text.count("default:") <= 1, (path.stem, text)
            assert "(default: )" not in text, (path.stem, text)
    assert tools >= 15
    options = help_options(importlib.import_module("training.train").TrainConfig, monkeypatch)
    assert "(default: the task's)" in options["--epochs"] and "(default: runs/<task>/<model>)" in options["--out"]


def test_bench_rollout_prints_ratios_last():
    out = run("-m", "training.bench_rollout", "--length", "60", "--envs", "4", "--reference-envs", "1",
              "--recompute-steps", "50")
    assert "actions of the three loops agree: True" in out
    last = out.strip().splitlines()[-1]
    ref, batched = (float(part.split("=")[1]) for part in last.split())
    assert last.startswith("speedup_vs_reference=") and ref > 0 and batched > 0


def test_expert_report_scores_the_expert_per_group():
    out = run("-m", "training.expert_report", "--task", "tmaze", "--episodes", "4", "--settings", "episode_length=20")
    assert "tmaze expert over 4 episodes" in out and "success 1.000" in out
    assert "up: 2 episodes" in out and "down: 2 episodes" in out


def test_bench_env_prints_steps_per_second_last():
    out = run("-m", "training.bench_env", "--task", "tmaze", "--steps", "200")
    assert float(out.strip().splitlines()[-1].split("=")[1]) > 0

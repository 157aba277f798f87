"""The command-line tools run and print what they promise."""

import contextlib
import importlib
import io
import pickle
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from training.cli import cli

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
    for row in rows:  # mode, batch, device, warm-up s, s/step, tokens/s, peak GiB, GFLOP/step, GFLOP/s
        assert float(row[3]) > 0 and float(row[5].replace(",", "")) > 0 and float(row[6]) > 0
        assert float(row[7].replace(",", "")) > 0
    # the reference's tokens/s was recorded at batch 128 on a CPU: no ratio against it for another setting
    assert "reference implementation" not in out


def test_benchmarks_refuse_bad_options_in_one_line_before_any_work():
    from training import bench_attention, bench_train

    for argv, message in [(["--steps", "0"], "--steps must be at least 1"),
                          (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto")]:
        with pytest.raises(SystemExit, match=message):
            bench_train.main(cli(bench_train.Args, argv))
    with pytest.raises(SystemExit, match="--checkpoints needs at least one checkpoint folder"):
        bench_attention.main(bench_attention.Args(checkpoints=()))


def test_help_explains_options():
    assert "--rate-batch" in run("-m", "training.bench_train", "--help")
    assert "--port" in run("app.py", "--help")


def help_rows(config_class, monkeypatch, columns: int = 1000) -> dict[str, list[str]]:
    """The options of a tool's --help (training.cli.cli), each with the rows its entry takes."""
    monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli(config_class, ["--help"])
    options, current = {}, None
    for line in out.getvalue().splitlines():
        line = line.replace("│", " ").rstrip()
        text = line.strip()
        if re.match(r" {1,3}(--|\[)", line):  # an option, or a positional argument's metavar
            current = text.split()[0]
            options[current] = [text]
        elif current and text and line.startswith(" " * 6):  # the entry's help goes on
            options[current].append(text)
        else:  # a group's title or edge, or a blank row
            current = None
    return options


def test_every_tool_states_each_default_once_in_one_paragraph(monkeypatch):
    tools = 0
    for path in sorted((ROOT / "training").glob("*.py")):
        found = re.search(r"\bcli\((\w+)\)", path.read_text())
        if not found or path.stem == "cli":
            continue
        tools += 1
        options = help_rows(getattr(importlib.import_module(f"training.{path.stem}"), found.group(1)), monkeypatch)
        assert options, path.stem
        for option, rows in options.items():
            text = " ".join(rows)
            assert text.count("default:") <= 1 and "(default: )" not in text, (path.stem, text)
            # on a wide terminal the help is one row (after the flags' own row where they are long): no
            # line break from the docstring's source lines
            assert len(rows) == 1 or (len(rows) == 2 and rows[0].split()[0] == option and "  " not in rows[0]), \
                (path.stem, rows)
    assert tools >= 15
    options = help_rows(importlib.import_module("training.train").TrainConfig, monkeypatch)
    assert "(default: the task's)" in options["--epochs"][0] and "(default: runs/<task>/<model>)" in options["--out"][0]


def test_cli_parses_into_the_tools_own_class():
    from training.train import TrainConfig

    config = cli(TrainConfig, ["--task", "memory_maze", "--epochs", "3", "--model-set", "n_head=8"])
    assert type(config) is TrainConfig and config.epochs == 3 and config.model_set == ("n_head=8",)
    assert config.batch_size is None and config.task == "memory_maze"
    assert pickle.loads(pickle.dumps(config)) == config  # e.g. to worker processes


def test_bench_rollout_prints_ratios_last():
    out = run("-m", "training.bench_rollout", "--length", "60", "--envs", "4", "--reference-envs", "1",
              "--recompute-steps", "50", "--rounds", "2", "--threads", "1")
    assert "actions of the three loops agree: True" in out
    # the loops take turns, round after round, and the speedups are the rounds' medians
    per_round = next(line for line in out.splitlines() if line.startswith("per-round speedups"))
    assert per_round.split(": ")[1].count(" / ") == 2
    last = out.strip().splitlines()[-1]
    ref, batched = (float(part.split("=")[1]) for part in last.split())
    assert last.startswith("speedup_vs_reference=") and ref > 0 and batched > 0



def test_bench_rollout_closes_every_env_it_makes(monkeypatch, capsys):
    from rate_core.envs.tmaze import TMazeVectorEnv
    from training import bench_rollout

    made, closed = [], []
    original_init, original_close = TMazeVectorEnv.__init__, TMazeVectorEnv.close

    def init(self, *args, **kwargs):
        made.append(id(self))
        original_init(self, *args, **kwargs)

    def close(self, **kwargs):
        closed.append(id(self))
        original_close(self, **kwargs)

    monkeypatch.setattr(TMazeVectorEnv, "__init__", init)
    monkeypatch.setattr(TMazeVectorEnv, "close", close)
    bench_rollout.main(bench_rollout.Args(length=30, envs=2, reference_envs=1, recompute_steps=20, device="cpu",
                                          rounds=1))
    assert "speedup_vs_reference=" in capsys.readouterr().out
    assert len(made) == 6 and set(closed) >= set(made)  # warm-up, engine, reference, batched, check, latency

def test_expert_report_scores_the_expert_per_group():
    out = run("-m", "training.expert_report", "--task", "tmaze", "--episodes", "4", "--settings", "episode_length=20")
    assert "tmaze expert over 4 episodes" in out and "success 1.000" in out
    assert "up: 2 episodes" in out and "down: 2 episodes" in out


def test_expert_report_gives_no_success_where_the_task_scores_return(monkeypatch, capsys):
    from training import expert_report

    row = {"episodes": 2, "success_rate": 0.0, "mean_return": 30.5, "return_sem": 1.5, "mean_length": 2100.0}
    monkeypatch.setattr(expert_report, "report", lambda task, episodes, settings, seed: {
        "task": task, "settings": settings, **row, "groups": {"red": row, "green": row}})
    expert_report.main(expert_report.Args(task="vizdoom_two_colors", episodes=2))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": return 30.500 +- 1.500, mean length 2100.0") and "success" not in "".join(lines)
    assert lines[1].split() == ["red:", "2", "episodes,", "return", "30.500", "+-", "1.500,", "mean", "length",
                                "2100.0"]
    single = {**row, "episodes": 1, "return_sem": 0.0}  # a group of one episode has no standard error, not 0
    monkeypatch.setattr(expert_report, "report", lambda task, episodes, settings, seed: {
        "task": task, "settings": settings, **row, "groups": {"red": single}})
    expert_report.main(expert_report.Args(task="vizdoom_two_colors", episodes=2))
    out = capsys.readouterr().out
    assert "red: 1 episodes, return 30.500 (one episode: no standard error), mean length 2100.0" in out


def test_bench_env_prints_steps_per_second_last():
    out = run("-m", "training.bench_env", "--task", "tmaze", "--steps", "200")
    assert float(out.strip().splitlines()[-1].split("=")[1]) > 0


def test_bench_attention_prints_the_speedup_of_blocks_last():
    out = run("-m", "training.bench_attention", "--checkpoints", "assets/checkpoints/tmaze/dt",
              "assets/checkpoints/memory_maze/rate", "--batch-size", "2", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("assets/")]
    assert len(rows) == 1 + 3  # DT's window, then RATE's three segments as its cache grows
    assert rows[0].split()[1:4] == ["450", "x", "450"] and rows[1].split()[1:4] == ["120", "x", "120"]
    assert rows[3].split()[1:4] == ["120", "x", "360"]
    last = out.strip().splitlines()[-1]
    assert last.startswith("median_speedup=") and "blocked_cases=1 one_block_cases=3" in last
    assert float(last.split()[0].split("=")[1]) > 0


def test_bench_attention_skip_below_puts_rate_segments_in_blocks_and_bad_values_are_refused():
    out = run("-m", "training.bench_attention", "--checkpoints", "assets/checkpoints/memory_maze/rate",
              "--batch-size", "2", "--repeats", "1", "--skip-below", "1")
    rows = [line for line in out.splitlines() if line.startswith("assets/")]
    assert [int(row.split()[4]) for row in rows] == [3, 3, 3]  # each segment in 3 blocks of query rows
    assert "blocked_cases=3 one_block_cases=0" in out.strip().splitlines()[-1]
    for value in ("0", "1.5"):
        result = subprocess.run([sys.executable, "-m", "training.bench_attention", "--skip-below", value], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert result.stderr.strip() == f"error: --skip-below must be in (0, 1], got {float(value)}"


def test_render_check_records_and_compares_observations_and_says_what_is_wrong(tmp_path):
    saved = tmp_path / "here.npz"
    out = run("-m", "training.render_check", "--task", "memory_maze", "--episodes", "1", "--steps", "6",
              "--save", str(saved))
    assert "7 observations (3, 64, 64) from 1 episode (seeds from 0)" in out and "renderer: MuJoCo, MUJOCO_GL=" in out
    out = run("-m", "training.render_check", "--compare", str(saved))  # the task and episodes from the file
    assert out.strip().splitlines()[-1] == "identical_observations=1.0000 differing_values=0.000000 rewards_equal=True"
    # a recording whose frames differ: the comparison says by how much
    with np.load(saved) as data:
        fields = dict(data)
    fields["observations"][0, 0, 0, 0] ^= 16
    np.savez(tmp_path / "other.npz", **fields)
    out = run("-m", "training.render_check", "--compare", str(tmp_path / "other.npz"))
    assert "identical observations 85.7%" in out and "largest difference 16" in out
    (tmp_path / "bad.npz").write_text("not a recording")
    for args, message in [(["--compare", str(saved), "--task", "tmaze"],
                           f"error: --compare {saved} holds memory_maze observations; give --task memory_maze"),
                          (["--compare", str(tmp_path / "bad.npz")],
                           f"error: --compare {tmp_path / 'bad.npz'} is not a recording of training.render_check "
                           "--save (not a .npz file it wrote)"),
                          ([], "error: give --save FILE (record here) or --compare FILE (compare with a recording)"),
                          (["--save", str(tmp_path / "x.txt")], f"error: --save {tmp_path / 'x.txt'}: the file "
                                                                "name must end in .npz")]:
        result = subprocess.run([sys.executable, "-m", "training.render_check", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and result.stderr.strip() == message


def test_benchmarks_refuse_a_missing_checkpoint_in_one_line():
    for args in (["training.bench_attention", "--checkpoints"], ["training.bench_rollout", "--checkpoint"]):
        result = subprocess.run([sys.executable, "-m", *args, "no/such/folder"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip() == ("error: no/such/folder: checkpoint folder does not exist (expected a folder "
                                         "with config.json and model.safetensors)")


def test_usage_names_the_module_to_run_and_errors_are_one_line():
    result = subprocess.run([sys.executable, "-m", "training.evaluate", "--bogus"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    text = " ".join((result.stdout + result.stderr).replace("│", " ").split())  # rich's box, any width
    assert result.returncode != 0 and "run: python -m training.evaluate --help" in text
    for args, message in [(["training.collect", "--task", "nope"], "error: unknown task 'nope'; known tasks: "),
                          (["training.bench_env", "--task", "nope"], "error: unknown task 'nope'; known tasks: "),
                          (["training.expert_report", "--task", "tmaze", "--episodes", "-4"],
                           "error: --episodes must be at least 1, got -4")]:
        result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and result.stderr.startswith(message) and "Traceback" not in result.stderr, \
            result.stderr


@pytest.mark.parametrize("module, argv, message", [
    ("training.bench_rollout", ["--envs", "0"], "--envs must be at least 1, got 0"),
    ("training.bench_rollout", ["--seed", "-1"], "--seed must be at least 0, got -1"),
    ("training.bench_attention", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("training.label_probe", ["--early", "0"], "--early must be at least 1, got 0"),
    ("training.colour_probe", ["--checkpoint", "x", "--cue", "3"], "--cue must be at most 2, got 3"),
    ("training.pursuit_probe", ["--checkpoint", "x", "--steps", "2000"], "--steps must be at most 1000, got 2000"),
    ("training.pursuit_probe", ["--checkpoint", "x", "--recall", "nan"], "--recall must be at least 0, got nan"),
    ("training.frame_probe", ["--seed", "-1"], "--seed must be at least 0, got -1")])
def test_options_out_of_their_bounds_end_in_one_line_before_any_work(module, argv, message):
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        cli(importlib.import_module(module).Args, argv)


def test_tools_refuse_what_they_cannot_do_before_any_work(tmp_path):
    from training import bench_rollout, colour_probe, expert_report

    for argv, message in [(["--envs", "2", "--reference-envs", "5"], "give at most 2"),
                          (["--checkpoint", "assets/checkpoints/minigrid_memory/rate"], "the benchmark plays T-Maze"),
                          (["--length", "1"], "--length: episode_length must be at least")]:
        with pytest.raises(SystemExit, match=message):
            bench_rollout.main(cli(bench_rollout.Args, argv))
    with pytest.raises(SystemExit, match="give at least 4 .or 0 to skip the memory probe"):
        colour_probe.main(cli(colour_probe.Args, ["--checkpoint", "x", "--memory-episodes", "1"]))
    with pytest.raises(SystemExit, match="checkpoint is for task 'tmaze', expected 'vizdoom_two_colors'"):
        colour_probe.main(cli(colour_probe.Args, ["--checkpoint", "assets/checkpoints/tmaze/rate",
                                                  "--forced-episodes", "0", "--memory-episodes", "0"]))
    with pytest.raises(SystemExit, match="cannot write a file there"):
        expert_report.main(cli(expert_report.Args, ["--episodes", "2", "--json", str(tmp_path / "no" / "x.json")]))


def test_device_checks_say_what_to_use(monkeypatch):
    import pytest
    import torch

    from training.cli import device_or_exit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_or_exit("auto") == "cpu" and device_or_exit("cpu") == "cpu"
    with pytest.raises(SystemExit, match="error: --device cuda: this machine has no CUDA device .*use cpu or auto"):
        device_or_exit("cuda")
    with pytest.raises(SystemExit, match="--device must be cpu, cuda, cuda:N or auto, got 'gpu'"):
        device_or_exit("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"--device cuda:2: this machine has 1 CUDA device \(cuda:0\)"):
        device_or_exit("cuda:2")


def test_ctrl_c_ends_a_tool_with_one_line():
    import gc

    import pytest

    from training.cli import run_main

    def interrupted(args):
        raise KeyboardInterrupt

    import signal

    terminate = signal.getsignal(signal.SIGTERM)
    assert gc.get_freeze_count() == 0
    try:
        with pytest.raises(SystemExit, match="^interrupted: resume with --resume$"):
            run_main(interrupted, None, "interrupted: resume with --resume")
        assert gc.get_freeze_count() > 0  # it froze the heap for a quick exit
    finally:
        gc.unfreeze()
        sys.unraisablehook = sys.__unraisablehook__  # run_main silenced it for the way out
        signal.signal(signal.SIGTERM, terminate)  # and made SIGTERM a Ctrl-C


def test_ctrl_c_leaves_no_complaints_from_what_it_left_half_made():
    # as dm_control's MjrContext, stopped inside MuJoCo's rendering setup, complains when collected
    result = run_python("from training.cli import run_main",
                        "class HalfMade:",
                        "    def __del__(self):",
                        "        raise AttributeError('no _ptr')",
                        "def main(args):",
                        "    held = HalfMade()",
                        "    raise KeyboardInterrupt",
                        "run_main(main, None)")
    assert result.returncode == 1 and result.stderr == "interrupted\n"


def run_python(*lines: str) -> subprocess.CompletedProcess:
    """These lines run by a new Python process in the repository root."""
    return subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_push_refuses_bad_repo_ids_and_folders_it_did_not_write(tmp_path, monkeypatch):
    import pytest

    from training.push import Args, main

    checkpoint = ROOT / "assets" / "checkpoints" / "tmaze" / "rate"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "push" / "other").mkdir(parents=True)
    for repo_id in ("USER/", "USER/..", "USER", "a/b/c"):
        with pytest.raises(SystemExit, match="--repo-id must be USER/NAME"):
            main(Args(checkpoint=checkpoint, repo_id=repo_id, dry_run=True, video=False))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="--out mine exists and is not a Hub upload folder"):
        main(Args(checkpoint=checkpoint, repo_id="user/x", out=Path("mine"), dry_run=True, video=False))
    assert (tmp_path / "mine" / "notes.txt").exists() and (tmp_path / "outputs" / "push" / "other").is_dir()
    main(Args(checkpoint=checkpoint, repo_id="user/x", dry_run=True, video=False))
    main(Args(checkpoint=checkpoint, repo_id="user/x", dry_run=True, video=False))  # its own folder: replaced
    assert (tmp_path / "outputs" / "push" / "x" / "config.json").exists()


def test_a_corrupt_hub_checkpoint_and_a_checkpoint_folder_to_compare_end_in_one_line(tmp_path):
    import os

    from tests.test_hub import SHIPPED, fake_hub_cache

    config = (SHIPPED / "config.json").read_text()
    snapshot = fake_hub_cache(tmp_path, "someone/broken", SHIPPED, config[:25])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "training.evaluate", "--checkpoint", "hf://someone/broken",
                             "--json", str(tmp_path / "x.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: {snapshot / 'config.json'}: not valid JSON \(.*\); the file is truncated or "
                        r"corrupt", result.stderr.strip()), result.stderr
    out = run("-m", "training.compare", "assets/checkpoints/tmaze/rate/eval.json", "assets/checkpoints/tmaze/dt")
    assert "B: assets/checkpoints/tmaze/dt (dt)" in out


def test_app_refuses_a_port_out_of_range_in_one_line():
    result = subprocess.run([sys.executable, "app.py", "--port", "99999"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == "error: --port must be from 1 to 65535, got 99999"
    result = subprocess.run([sys.executable, "app.py", "--keep-envs", "-1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == ("error: --keep-envs must be from 0 to 16 (each kept "
                                                                "env holds about 0.55 GB), got -1")


def test_app_start_problems_end_in_one_line(tmp_path):
    import os
    import socket

    env = {**os.environ, "GRADIO_SERVER_PORT": "abc"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: GRADIO_SERVER_PORT must be a port number, got 'abc'"
    env = {**os.environ, "RATE_APP_KEEP_ENVS": "two"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: RATE_APP_KEEP_ENVS must be a whole number of envs, got 'two'"
    with socket.socket() as taken:  # something else listens on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "RATE_APP_OUTPUTS": str(tmp_path / "out")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: cannot serve on 127.0.0.1:{port}: the port is in use; choose another "
                                     f"--port, or stop what is listening there")
    result = subprocess.run([sys.executable, "app.py", "--host", "10.255.255.1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "is 10.255.255.1 an address of this machine?" in result.stderr


def test_app_outputs_go_to_a_temporary_folder_where_they_cannot_be_written(tmp_path, monkeypatch, capsys):
    import importlib.util
    import os
    import tempfile

    spec = importlib.util.spec_from_file_location("app_main", ROOT / "app.py")
    app_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_main)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("RATE_APP_OUTPUTS", str(tmp_path / "a_file" / "outputs"))  # cannot be made: as read-only
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    folder = app_main.outputs_folder()
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("rate_app_outputs-")
    assert os.environ["RATE_APP_OUTPUTS"] == str(folder) and "cannot be written" in capsys.readouterr().out
    folder.rmdir()
    monkeypatch.setenv("RATE_APP_OUTPUTS", str(tmp_path / "mine"))
    assert app_main.outputs_folder() == tmp_path / "mine" and (tmp_path / "mine").is_dir()


def test_app_keep_envs_sets_the_env_pool_before_the_demo_is_built(tmp_path, monkeypatch):
    import importlib.util
    import socket

    import pytest

    import app.ui
    from app.episodes import ENV_POOL

    monkeypatch.setenv("RATE_APP_KEEP_ENVS", "1")  # read when app.py is loaded, as the default of --keep-envs
    spec = importlib.util.spec_from_file_location("app_main", ROOT / "app.py")
    app_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_main)
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen = []

    def build_demo():
        seen.append(ENV_POOL.limit)
        raise SystemExit("built")

    monkeypatch.setattr(app.ui, "build_demo", build_demo)
    monkeypatch.setattr(ENV_POOL, "limit", ENV_POOL.limit)  # restored after the test
    monkeypatch.setenv("RATE_APP_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # main sets it where unset: undone after
    for argv, limit in ((["--port", str(port), "--keep-envs", "0"], 0), (["--port", str(port)], 1)):
        monkeypatch.setattr(sys, "argv", ["app.py", *argv])
        with pytest.raises(SystemExit, match="built"):
            app_main.main()
        assert seen.pop() == limit


def test_sigterm_ends_a_tool_as_ctrl_c_does():
    # a scheduler's or kill's SIGTERM: the same way out, so that envs close (a ViZDoom game's engine
    # process would otherwise outlive the tool)
    result = run_python("import os, signal, time",
                        "from training.cli import run_main",
                        "def main(args):",
                        "    try:",
                        "        os.kill(os.getpid(), signal.SIGTERM)",
                        "        time.sleep(30)",
                        "    finally:",
                        "        print('envs closed')",
                        "run_main(main, None, 'interrupted: nothing written')")
    assert result.returncode == 1 and result.stdout == "envs closed\n"
    assert result.stderr == "interrupted: nothing written\n"


def test_ctrl_c_while_the_app_starts_ends_it_in_one_line():
    import signal
    import time

    from tests.test_app import free_port

    app = subprocess.Popen([sys.executable, "app.py", "--port", str(free_port())], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # importing torch and gradio: seconds
    app.send_signal(signal.SIGINT)
    try:
        _, err = app.communicate(timeout=60)
    finally:
        app.kill()  # an app that ignored Ctrl-C is not left serving after the test
    assert app.returncode == 1 and err == "interrupted\n", err


def test_the_modules_without_a_command_say_which_tool_to_run():
    for module, tool in (("figures", "training.scores"), ("dataset", "training.collect"), ("step", "training.train")):
        result = subprocess.run([sys.executable, "-m", f"training.{module}", "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1 and f"python -m {tool} --help" in result.stderr, (module, result.stderr)


def test_an_output_file_is_checked_by_making_one_where_permissions_say_yes_but_the_write_fails(tmp_path, monkeypatch):
    import os

    from training.cli import writable_file_or_exit

    writable_file_or_exit("--json", tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind
    # /proc (and folders like it) pass os.access for root, and refuse the file only when it is written
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    with pytest.raises(SystemExit, match=r"^error: --json /proc/x.json: cannot write a file there"):
        writable_file_or_exit("--json", "/proc/x.json")


def test_tools_that_write_a_folder_refuse_a_place_they_cannot_write_before_any_work():
    from training import average, collect, merge

    with pytest.raises(SystemExit, match=r"^error: --out /proc/d: cannot write in its folder /proc"):
        collect.main(cli(collect.Args, ["--task", "tmaze", "--episodes", "2", "--out", "/proc/d"]))
    with pytest.raises(SystemExit, match=r"^error: --out /proc/x/d: cannot make its folder /proc/x"):
        collect.main(cli(collect.Args, ["--task", "tmaze", "--episodes", "2", "--out", "/proc/x/d"]))
    shipped = "assets/checkpoints/tmaze/rate"
    with pytest.raises(SystemExit, match=r"^error: --out /proc/avg: cannot write in its folder /proc"):
        average.main(cli(average.Args, [shipped, shipped, "--out", "/proc/avg"]))
    with pytest.raises(SystemExit, match=r"^error: --out /proc/m: cannot write in its folder /proc"):
        merge.main(cli(merge.Args, ["a", "b", "--out", "/proc/m"]))


def test_evaluate_says_to_give_json_where_the_checkpoint_folder_cannot_take_eval_json(tmp_path, monkeypatch):
    from training import cli as cli_module
    from training import evaluate

    monkeypatch.setattr(cli_module, "_can_make_file_in", lambda folder: False)
    with pytest.raises(SystemExit, match=r"cannot write eval.json in the checkpoint's folder .*; give --json OUT"):
        evaluate.main(cli(evaluate.Args, ["--checkpoint", "assets/checkpoints/tmaze/rate"]))


def test_ctrl_c_ends_the_process_even_where_a_pool_thread_stop_pool_could_not_end_still_waits():
    # the pool's thread blocked on half a result (seen after Ctrl-C in frame_probe): the interpreter's exit
    # would wait for it for ever; run_main's way out ends the process at once
    script = ("import threading\n"
              "from training import cli\n"
              "def main(args):\n"
              "    stuck = threading.Thread(target=threading.Event().wait)\n"
              "    stuck.start()\n"
              "    cli._STUCK_POOL_THREADS.append(stuck)\n"
              "    raise KeyboardInterrupt\n"
              "cli.run_main(main, None, 'interrupted: test')\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == "interrupted: test"
    assert time.monotonic() - started < 30


def test_probe_tools_refuse_bad_input_in_one_line_naming_the_option_given(tmp_path, monkeypatch):
    from training import colour_probe, frame_probe, label_probe, render_check

    with pytest.raises(SystemExit, match=r"^error: unknown task 'nope'"):
        label_probe.main(cli(label_probe.Args, ["--task", "nope"]))
    with pytest.raises(SystemExit, match=r"^error: --a: noise is a probability"):
        label_probe.main(cli(label_probe.Args, ["--task", "memory_maze", "--a", "noise=2"]))
    with pytest.raises(SystemExit, match=r"^error: --save /proc/x.npz: cannot write a file there"):
        render_check.main(cli(render_check.Args, ["--task", "tmaze", "--save", "/proc/x.npz", "--steps", "5"]))
    (tmp_path / "x.npz").mkdir()
    with pytest.raises(SystemExit, match=r"cannot write a file there \(a folder\)"):
        render_check.main(cli(render_check.Args, ["--task", "tmaze", "--save", str(tmp_path / "x.npz")]))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]  # nothing recorded, nothing left
    for argv, message in [(["--play-episodes", "-1"], "--play-episodes is 0"),
                          (["--aux-weight", "nan", "--first-frame"], "--aux-weight are 0 .off. or positive")]:
        with pytest.raises(SystemExit, match=message):
            frame_probe.main(cli(frame_probe.Args, argv))
    # the memory probe plays the cue the model was given, as the other probes do
    import training.collect as collect

    played = []
    monkeypatch.setattr(collect, "run_episode", lambda task, settings, *a, **k: played.append(settings)
                        or {"actions": []})
    from rate_core.checkpoint import load_checkpoint

    model = load_checkpoint("assets/checkpoints/vizdoom_two_colors/rate")
    with contextlib.suppress(Exception), warnings.catch_warnings():  # no episode was long enough: nothing to
        warnings.simplefilter("ignore")  # decode (a mean of nothing), which is not what this checks
        colour_probe.memory_probe(model, 2, 10_000, cue=1)
    assert played and all(settings["cue"] == 1 for settings in played)

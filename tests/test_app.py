"""The demo app: starts, plays episode pairs through its API and in a browser, and answers bad input
with a message while it keeps serving."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from app.episodes import AppError, demo_tasks, load_model, make_request, task_description
from app.ui import build_demo, default_inputs, describe, shipped_checkpoints, task_changed, task_defaults
from rate_core.checkpoint import save_checkpoint
from rate_core.tasks import TASKS
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


def test_every_task_says_what_its_agent_must_remember():
    for task in TASKS.values():
        assert len(task.about) > 100 and ("remember" in task.about or "memory" in task.about), task.name


def test_task_description_shows_each_shipped_checkpoints_evaluation():
    root = ROOT / "assets" / "checkpoints"
    for name in demo_tasks():
        text = task_description(name)
        assert TASKS[name].title in text and TASKS[name].about in text
        for eval_path in sorted(root.glob(f"{name}/*/eval.json")):
            evaluation = json.loads(eval_path.read_text())
            last = evaluation["results"][-1]
            score = (f"{last['success_rate']:.2f}" if evaluation["protocol"]["metric"] == "success"
                     else f"{last['mean_return']:.2f} ± {last['return_sem']:.2f}")
            cells = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")]
                     for line in text.splitlines() if line.startswith("|")}
            header, row = cells["checkpoint"], cells[eval_path.parent.name]
            column = header.index(str(last[evaluation["protocol"]["setting"]]))
            assert row[column] == score, (row, score)
    # the page's task switch brings the description with it, and the checkpoint choices and the setting box's
    # range, but no values: an example that switches the task brings its own (task_defaults: the dropdown)
    text, left, right, setting, _, *cleared = task_changed("minigrid_memory")
    assert text == task_description("minigrid_memory")
    assert left["choices"] == right["choices"] and "shipped: rate" in left["choices"]
    # the range is in the label, and the app checks it with its own message (make_request): a minimum or maximum
    # on the box would have gradio refuse a value first, with its own words, after a task round trip only
    assert setting["label"] == "grid size (odd) (7 to 201)" and "minimum" not in setting and "maximum" not in setting
    assert all("value" not in update for update in (left, right, setting))
    assert task_changed("memory_maze")[3]["visible"] is False
    assert task_defaults("minigrid_memory") == ["shipped: rate", "shipped: dt", 41, 0.96, 0, True]


def test_task_description_survives_a_missing_or_broken_evaluation(tmp_path):
    shipped = ROOT / "assets" / "checkpoints" / "tmaze"
    for folder in ("rate", "dt"):
        (tmp_path / "tmaze" / folder).mkdir(parents=True)
        (tmp_path / "tmaze" / folder / "config.json").write_text((shipped / folder / "config.json").read_text())
    assert task_description("tmaze", tmp_path).endswith(TASKS["tmaze"].about)  # nothing evaluated: no table
    (tmp_path / "tmaze" / "rate" / "eval.json").write_text((shipped / "rate" / "eval.json").read_text())
    (tmp_path / "tmaze" / "dt" / "eval.json").write_text('{"protocol": {}')
    lines = task_description("tmaze", tmp_path).splitlines()
    assert "| dt | not evaluated |" in "\n".join(lines)
    assert any(line.startswith("| rate | 1.00 |") for line in lines)


@pytest.fixture(scope="module")
def served_app():
    demo = build_demo(warm=False)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_page_serves(served_app):
    with urllib.request.urlopen(served_app + "config", timeout=10) as response:
        config = json.loads(response.read())
    assert "Recurrent Action Transformer with Memory" in json.dumps(config)


def test_settings_out_of_range_are_refused_with_the_allowed_range():
    with pytest.raises(AppError, match="from 10 to 1200"):
        make_request("tmaze", 0, 5, 1.0, 0, False)
    with pytest.raises(AppError, match="from 10 to 1200"):
        make_request("tmaze", 0, 100000, 1.0, 0, False)
    with pytest.raises(AppError, match="seed"):
        make_request("tmaze", -1, 150, 1.0, 0, False)
    with pytest.raises(AppError, match="step cap"):
        make_request("tmaze", 0, 150, 1.0, 2.5, False)
    with pytest.raises(AppError, match="unknown task"):
        make_request("chess", 0, 150, 1.0, 0, False)
    with pytest.raises(AppError, match="memory horizon must be a whole number of segments"):
        make_request("tmaze", 0, 150, 1.0, 0, False, 1.5)
    with pytest.raises(AppError, match="memory horizon"):
        make_request("tmaze", 0, 150, 1.0, 0, False, -2)
    for target in (1e20, 1e308, -1e39, float("nan")):  # the model's probabilities would be NaN
        with pytest.raises(AppError, match="target return must be a number from -10000 to 10000"):
            make_request("tmaze", 0, 150, target, 0, False)
    assert make_request("vizdoom_two_colors", 0, None, -10_000, 0, False).target_return == -10_000
    for arguments, message in [(("tmaze", 0, 150, "x", 0, False), "target return must be a number, got 'x'"),
                               (("tmaze", "0", 150, 1.0, 0, False), "seed must be a number"),
                               (("tmaze", 0, 150, 1.0, 0, "false"), "sample actions must be true or false")]:
        with pytest.raises(AppError, match=message):  # what the API may send
            make_request(*arguments)
    for size in (40, 5, 203):  # an even grid gets the box's own words, as one out of range does
        message = f"grid size \\(odd\\) must be an odd whole number from 7 to 201, got {size}$"
        with pytest.raises(AppError, match=message):
            make_request("minigrid_memory", 0, size, 0.96, 0, False)
    request = make_request("tmaze", 3, 200, None, 0, False)
    assert request.settings == {"episode_length": 200} and request.target_return == 1.0 and request.step_cap is None
    # an empty box is its default, the seed's as every other's (the page then shows it in the box: run_started)
    empty = make_request("tmaze", None, None, None, None, False, None)
    assert (empty.seed, empty.settings, empty.target_return, empty.step_cap, empty.memory_horizon) == (
        0, {"episode_length": 300}, 1.0, None, None)
    for task_name, cap in (("vizdoom_two_colors", 500), ("memory_maze", 300)):  # the step caps the page fills in
        assert make_request(task_name, None, None, None, None, True).step_cap == cap == default_inputs(task_name)[6]
    assert request.memory_horizon is None and make_request("tmaze", 3, 200, None, 0, False, 2).memory_horizon == 2


def test_bad_checkpoints_are_refused_with_a_message(tmp_path, monkeypatch):
    with pytest.raises(AppError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), "tmaze")
    for choice in ("shipped: ../minigrid_memory/rate", f"shipped: {tmp_path}"):  # shipped means the task's own
        with pytest.raises(AppError, match=r"is not a shipped checkpoint of tmaze; the shipped ones: shipped: dt, "):
            load_model(choice, "tmaze")
    with pytest.raises(AppError, match="a checkpoint choice is text"):
        load_model(5, "tmaze")
    with monkeypatch.context() as public:  # a public server
        public.setenv("RATE_APP_LOCAL_PATHS", "0")
        with pytest.raises(AppError, match="shipped checkpoints and hf://USER/NAME references only"):
            load_model("/etc", "tmaze")
        for choice in ("shipped: nope", ""):  # no advice to give a folder's path
            with pytest.raises(AppError) as refused:
                load_model(choice, "tmaze")
            assert "path" not in str(refused.value)
        assert load_model("shipped: rate", "tmaze").task == "tmaze"
    other = tmp_path / "other_task"
    save_checkpoint(tiny_model("rate"), other)  # a unit_test checkpoint, not a T-Maze one
    with pytest.raises(AppError, match="unit_test"):
        load_model(str(other), "tmaze")
    corrupt = tmp_path / "corrupt"
    save_checkpoint(tiny_model("rate"), corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AppError, match="model.safetensors"):
        load_model(str(corrupt), "unit_test")
    with pytest.raises(AppError, match="cannot read checkpoint folder .*too long"):
        load_model("/tmp/" + "a" * 5000, "tmaze")
    misfit = tmp_path / "misfit"  # its config says T-Maze; its model has 3 actions where T-Maze has 4
    save_checkpoint(tiny_model("rate", act_dim=3), misfit)
    config = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**config, "task": "tmaze"}))
    with pytest.raises(AppError, match=r"says it is for tmaze, but its model takes observations \(4,\) and 3 actions"):
        load_model(str(misfit), "tmaze")


def video_file(video) -> str:
    """The file of a video output as the client returns it (a path, or a dict holding one)."""
    return video["video"] if isinstance(video, dict) else video


def frame_at(path, index: int):
    """One decoded frame of a video file."""
    with imageio.get_reader(path, "ffmpeg") as reader:
        return reader.get_data(index)


def frame_count(path) -> int:
    """Frames that decode from a video file."""
    with imageio.get_reader(path, "ffmpeg") as reader:
        return sum(1 for _ in reader)


def test_api_plays_both_agents_and_keeps_serving_after_bad_input(served_app, tmp_path):
    from gradio_client import Client

    client = Client(served_app, verbose=False)
    started = time.perf_counter()
    left, right, summary = client.predict("tmaze", "shipped: rate", "shipped: dt", 0, 150, 1.0, 0, False,
                                          api_name="/run_episodes")
    seconds = time.perf_counter() - started
    assert summary["left"]["mode"] == "rate" and summary["right"]["mode"] == "dt"
    assert summary["left"]["success"] and summary["left"]["steps"] == 149 and summary["left"]["segments"] == 3
    assert summary["settings"] == {"episode_length": 150} and summary["info"]["cue"] in (-1, 1)
    frames = max(summary["left"]["steps"], summary["right"]["steps"]) + 1
    for video in (left, right):
        assert frame_count(video_file(video)) == frames
    print(f"T-Maze pair at T = 150 through the API: {seconds:.2f} s")
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    for inputs, message in [(("tmaze", str(tmp_path / "missing"), "shipped: dt", 0, 150, 1.0, 0, False),
                             "does not exist"),
                            (("tmaze", str(bad), "shipped: dt", 0, 150, 1.0, 0, False), "config.json"),
                            (("tmaze", "shipped: rate", "shipped: dt", 0, 5000, 1.0, 0, False), "from 10 to 1200"),
                            (("tmaze", "shipped: rate", "shipped: dt", 0, 150, 1e308, 0, False), "target return")]:
        with pytest.raises(Exception, match=message):
            client.predict(*inputs, api_name="/run_episodes")
    again = client.predict("tmaze", "shipped: rate", "shipped: dt", 1, 60, 1.0, 0, False, api_name="/run_episodes")
    assert again[2]["left"]["steps"] == 59 and again[2]["memory_horizon"] is None
    with pytest.raises(Exception, match="memory horizon"):
        client.predict("tmaze", "shipped: rate", "shipped: dt", 1, 60, 1.0, 0, False, -1, api_name="/run_episodes")
    cut = client.predict("tmaze", "shipped: rate", "shipped: dt", 1, 60, 1.0, 0, False, 1, api_name="/run_episodes")
    assert cut[2]["memory_horizon"] == cut[2]["left"]["memory_horizon"] == 1
    assert cut[2]["right"]["memory_horizon"] is None


def test_api_plays_minigrid_with_its_shipped_checkpoints(served_app):
    """A second task through the same UI, with no app code of its own: grid size as the setting."""
    from gradio_client import Client

    client = Client(served_app, verbose=False)
    left, right, summary = client.predict("minigrid_memory", "shipped: rate", "shipped: dt", 0, 21, 0.96, 0, True,
                                          api_name="/run_episodes")
    assert summary["settings"] == {"size": 21, "step_cap": 500} and summary["info"]["cue"] in (0, 1)
    assert summary["left"]["mode"] == "rate" and summary["right"]["mode"] == "dt"
    frames = max(summary["left"]["steps"], summary["right"]["steps"]) + 1
    for video in (left, right):
        assert frame_count(video_file(video)) == frames
    with pytest.raises(Exception, match="odd"):
        client.predict("minigrid_memory", "shipped: rate", "shipped: dt", 0, 20, 0.96, 0, True,
                       api_name="/run_episodes")
    # what a caller leaves out is the chosen task's default (as the page fills in), not the first task's
    _, _, summary = client.predict("minigrid_memory", api_name="/run_episodes")
    assert summary["settings"] == {"size": 41, "step_cap": 500} and summary["target_return"] == 0.96
    assert summary["sampled_actions"] is True and summary["left"]["checkpoint"] == "shipped: rate"
    with pytest.raises(Exception, match="sample must be true or false"):
        client.predict("minigrid_memory", sample="yes", api_name="/run_episodes")


def test_api_plays_memory_maze_with_a_step_cap(served_app):
    """A 3D task with no app code of its own: no setting to change, a short step cap (the episode
    is 1000 steps), MuJoCo frames in the video."""
    from gradio_client import Client

    client = Client(served_app, verbose=False)
    left, right, summary = client.predict("memory_maze", "shipped: rate", "shipped: dt", 3, None, 18.1, 40, True,
                                          api_name="/run_episodes")
    assert summary["settings"] == {"step_cap": 1000} and summary["app_step_cap"] == 40
    assert summary["left"]["mode"] == "rate" and summary["right"]["mode"] == "dt"
    assert summary["left"]["steps"] == summary["right"]["steps"] == 40
    for video in (left, right):
        path = video_file(video)
        assert frame_count(path) == 41
        assert frame_at(path, 10).std() > 10  # a rendered maze, not a blank image


def test_api_plays_vizdoom_two_colors(served_app):
    """A task with no app code of its own and no setting to change; the demo's step cap cuts the
    2,100-step episode short; the video shows the Doom room."""
    from gradio_client import Client

    client = Client(served_app, verbose=False)
    left, right, summary = client.predict("vizdoom_two_colors", "shipped: rate", "shipped: dt", 4, None, 56.5, 60, True,
                                          api_name="/run_episodes")
    assert summary["settings"] == {"step_cap": 2100}
    assert summary["left"]["mode"] == "rate" and summary["right"]["mode"] == "dt"
    assert 1 <= summary["left"]["steps"] <= 60 and 1 <= summary["right"]["steps"] <= 60
    for video in (left, right):
        path = video_file(video)
        assert frame_count(path) >= 2
        assert frame_at(path, 1).std() > 10


def test_app_py_starts_from_the_command_line_and_serves_videos_from_its_outputs_folder(tmp_path):
    from gradio_client import Client

    port = free_port()
    (tmp_path / "tmp").mkdir()  # outputs neither in the working folder nor in the temporary one: Gradio must be told
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(tmp_path / "tmp"),
               RATE_APP_OUTPUTS=str(tmp_path / "outputs"))
    env.pop("GRADIO_TEMP_DIR", None)
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()
                time.sleep(0.5)
        else:
            raise AssertionError("app.py did not serve within 15 s")
        left, _, summary = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "tmaze", "shipped: rate", "shipped: dt", 2, 20, 1.0, 0, False, api_name="/run_episodes")
        assert frame_count(video_file(left)) == summary["left"]["steps"] + 1
        assert list((tmp_path / "outputs" / "videos").glob("episode_*/left.mp4"))
    finally:
        process.terminate()
        process.wait(timeout=10)


def _vizdoom_engines(parent: int) -> set[int]:
    """The ViZDoom engine processes whose parent is `parent` (ViZDoom runs its game in a process of its own)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue  # it ended meanwhile
        if fields.get("Name", "").strip() == "vizdoom" and fields.get("PPid", "").strip() == str(parent):
            found.add(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads processes from /proc")
def test_sigterm_stops_the_app_with_its_runs_envs_closed():
    # as a host stops a server: the warm-up's ViZDoom engine must not outlive the app
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(free_port())], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, engines = time.time() + 120, set()
        while not engines and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
            engines = _vizdoom_engines(process.pid)  # the warm-up plays ViZDoom-Two-Colors' default run
        assert engines, "the warm-up did not start a ViZDoom game within 120 s"
        process.terminate()
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in out, out
    alive = {pid for pid in engines if Path(f"/proc/{pid}").exists()}
    assert not alive, f"ViZDoom engines left running: {alive}"


def test_readme_is_a_space_card_matching_the_pins():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    front = dict(line.split(": ", 1) for line in text.split("---\n")[1].strip().splitlines())
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split() if "==" in line)
    assert front["sdk"] == "gradio" and front["sdk_version"] == pins["gradio"]
    assert front["app_file"] == "app.py" and (ROOT / front["app_file"]).exists()
    assert front["python_version"].strip('"') == "3.11"


def test_both_agents_play_at_once_and_the_episodes_are_those_played_one_by_one():
    from dataclasses import replace

    import torch

    from app.episodes import play, play_pair

    request = make_request("minigrid_memory", 3, 11, 0.96, 60, True)  # sampled actions: per-episode streams
    models = [load_model("shipped: rate", "minigrid_memory"), load_model("shipped: dt", "minigrid_memory")]
    reports, threads, before = [], [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pair = play_pair(models, request, poll_seconds=0.01,
                         progress=lambda steps: reports.append(steps) or threads.append(torch.get_num_threads()))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads and set(threads) == {1} and after == 2  # torch's 2 threads shared out while playing, then given back
    for together, model in zip(pair, models, strict=True):
        alone = play(model, request)
        assert together.length == alone.length and np.array_equal(together.actions, alone.actions)
        assert np.allclose(together.probs, alone.probs, atol=1e-5)
    assert reports and all(len(r) == 2 and 0 <= min(r) for r in reports)  # progress came to this thread
    with pytest.raises(AppError, match="Minigrid"):  # an even size the environment refuses, past make_request
        play_pair(models, replace(request, settings={**request.settings, "size": 12}))


class FakeEnv:
    def __init__(self, refuse: bool = False):
        if refuse:
            raise ValueError("size must be odd")
        self.closed, self.alive = False, True

    def workers_alive(self):
        return self.alive

    def close(self):
        self.closed = True


class FakeTask:
    name, title = "fake", "Fake task"

    def make_vector_env(self, num_envs, render_mode, refuse=False):
        assert num_envs == 1 and render_mode == "rgb_array"
        return FakeEnv(refuse)


def test_the_env_pool_keeps_slow_envs_for_the_next_run_and_closes_broken_ones():
    from app.episodes import EnvPool, EpisodeCancelled

    task, pool = FakeTask(), EnvPool(limit=2, slow_seconds=0.0)
    with pool.env(task, {}) as first:
        pass
    with pool.env(task, {}) as again:  # kept
        assert again is first and not first.closed
    with pytest.raises(EpisodeCancelled), pool.env(task, {}) as cancelled:  # stopped between steps: kept
        raise EpisodeCancelled("stopped at step 3")
    with pytest.raises(RuntimeError), pool.env(task, {}) as broken:  # any other error: closed, not kept
        assert broken is cancelled is first
        raise RuntimeError("worker died")
    assert broken.closed
    with pool.env(task, {}) as a, pool.env(task, {}) as b, pool.env(task, {}) as c:
        assert len({id(a), id(b), id(c), id(first)}) == 4
    assert c.closed and not a.closed and not b.closed  # at most 2 idle: the first given back (c) is closed
    a.alive = False  # the newest idle one, its worker killed while idle: replaced by a new env
    with pool.env(task, {}) as d:
        assert a.closed and d not in (a, b, c)
    with pool.env(task, {"refuse": False}) as other:  # other settings: another env
        assert other not in (b, d)
    assert b.closed and not d.closed  # b was the oldest of the three idle
    with pytest.raises(AppError, match="Fake task: size must be odd"), pool.env(task, {"refuse": True}):
        pass
    pool.close()
    assert other.closed and d.closed
    fast = EnvPool(slow_seconds=60.0)  # envs quick to make are not kept
    with fast.env(task, {}) as quick:
        pass
    assert quick.closed
    none = EnvPool(limit=0, slow_seconds=0.0)  # app.py --keep-envs 0
    with none.env(task, {}) as slow:
        pass
    assert slow.closed and none._idle == []


def test_the_app_says_when_no_run_plays():
    # app.py waits for this before it exits, so that no run's env (a ViZDoom engine) or encoder outlives the app
    from app.ui import _playing, wait_for_runs

    assert wait_for_runs(0.0)
    playing, stop = threading.Event(), threading.Event()

    def run(visitor: bool, fail: bool = False):
        with contextlib.suppress(RuntimeError), _playing(visitor):
            playing.set()
            stop.wait(10)
            if fail:
                raise RuntimeError("the run failed")

    for visitor, fail in ((False, False), (True, True)):  # the warm-up's run; a visitor's, failing
        playing.clear()
        stop.clear()
        thread = threading.Thread(target=run, args=(visitor, fail))
        thread.start()
        assert playing.wait(10)
        assert not wait_for_runs(0.2)
        stop.set()
        assert wait_for_runs(10)
        thread.join()


def test_a_memory_maze_env_kept_between_runs_plays_what_a_new_one_would():
    from app.episodes import ENV_POOL, play

    model = load_model("shipped: rate", "memory_maze")
    ENV_POOL.close()
    first = play(model, make_request("memory_maze", 7, None, 18.1, 12, True))
    other = play(model, make_request("memory_maze", 8, None, 18.1, 12, True))  # the kept env, another maze
    assert len(ENV_POOL._idle) == 1
    again = play(model, make_request("memory_maze", 7, None, 18.1, 12, True))
    assert not np.array_equal(first.frames[0], other.frames[0])
    assert np.array_equal(first.actions, again.actions) and np.array_equal(first.rewards, again.rewards)
    assert all(np.array_equal(f, g) for f, g in zip(first.frames, again.frames, strict=True))


def test_an_exception_from_progress_stops_both_episodes(monkeypatch):
    import app.episodes as episodes

    last_step, run_episodes_before = {}, episodes.run_episodes

    def recording_run_episodes(model, *args, progress, **kwargs):
        def report(step):
            last_step[model.config.mode] = step
            progress(step)
        return run_episodes_before(model, *args, progress=report, **kwargs)

    monkeypatch.setattr(episodes, "run_episodes", recording_run_episodes)
    request = make_request("tmaze", 0, 1200, 1.0, 0, False)
    models = [load_model("shipped: rate", "tmaze"), load_model("shipped: dt", "tmaze")]

    def give_up(steps):
        if min(steps) >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        episodes.play_pair(models, request, progress=give_up, poll_seconds=0.01)
    # both played on a little, then stopped at their next step, far from the 1,200 steps of the episode
    assert set(last_step) == {"rate", "dt"} and 5 <= min(last_step.values()) and max(last_step.values()) < 600


def test_a_run_already_playing_is_waited_for_not_played_twice(monkeypatch):
    import app.ui as ui

    calls, release = [], threading.Event()

    def slow_play(request, left, right, progress):
        calls.append(request)
        release.wait(10)
        if len(calls) == 1 and request.seed == 1:  # seed 1's first run fails
            raise RuntimeError("the first run broke")
        return f"result {len(calls)}"

    monkeypatch.setattr(ui, "_play_and_render", slow_play)
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    quiet = lambda *args, **kwargs: None  # noqa: E731
    for seed, expected in ((0, ["result 1", "result 1"]), (1, ["the first run broke", "result 2"])):
        calls.clear()
        release.clear()
        results = [None, None]

        def visit(index, seed=seed):
            try:
                # the second visit has Memory Maze's setting box as another task left it: not part of the run
                setting = 150 if index == 0 else 999
                results[index] = ui.run_episodes("memory_maze", "shipped: rate", "shipped: dt", seed, setting, 18.1,
                                                 300, True, progress=quiet)
            except RuntimeError as error:
                results[index] = str(error)

        first = threading.Thread(target=visit, args=(0,))
        first.start()
        while not calls:  # the first visit is playing
            time.sleep(0.01)
        second = threading.Thread(target=visit, args=(1,))
        second.start()
        time.sleep(0.2)
        assert len(calls) == 1  # the second visit waits for the first instead of playing too
        release.set()
        first.join(10)
        second.join(10)
        assert results == expected  # the same result, or after a failure a run of its own
        assert not ui._IN_FLIGHT


def test_the_warm_up_waits_while_a_visitor_plays(monkeypatch):
    import app.ui as ui

    played = []
    monkeypatch.setattr(ui, "_cached_run", lambda *example, progress: played.append(example))
    monkeypatch.setattr(ui, "_visits", 1)  # a visitor's run is playing
    examples = [["tmaze", "shipped: rate", "shipped: dt", seed, 150, 1.0, 0, False, 0] for seed in (0, 1)]
    warm = threading.Thread(target=ui.warm_cache, args=(examples, 0.01))
    warm.start()
    time.sleep(0.2)
    assert played == []
    monkeypatch.setattr(ui, "_visits", 0)
    warm.join(5)
    assert played == [tuple(example) for example in examples]


def test_the_warm_up_plays_every_tasks_default_run_before_the_other_examples():
    from app.ui import default_inputs, demo_examples

    tasks = ["tmaze", "minigrid_memory", "memory_maze"]
    examples, warm_order = demo_examples(tasks)
    defaults = [default_inputs(name) for name in tasks]
    assert warm_order[:3] == defaults
    assert sorted(map(str, warm_order)) == sorted(map(str, examples))  # the same examples, played once each
    assert examples[0] == defaults[0] and examples[1][:4] == ["tmaze", "shipped: rate", "shipped: dt", 1]
    assert examples[2] == defaults[1]  # on the page each task's examples stay together
    assert len(examples) == 5  # Memory Maze has no setting to vary


def test_example_labels_name_each_tasks_own_setting():
    from app.ui import default_inputs, example_label

    assert example_label(default_inputs("tmaze")) == "T-Maze (passive): seed 0, corridor length T = 300"
    assert example_label(["minigrid_memory", "shipped: rate", "shipped: dt", 1, 91, 0.96, 0, True, 0]) == (
        "Minigrid-Memory: seed 1, grid size = 91")
    assert example_label(default_inputs("memory_maze")) == "Memory Maze 9x9: seed 0, first 300 steps"


def test_the_warm_up_gives_way_to_a_visitor_and_plays_its_example_again_later(monkeypatch):
    import app.ui as ui

    played, visitor_done = [], threading.Event()

    def play_example(*example, progress):
        played.append(example[3])
        if len(played) == 1:  # a visitor's run starts while the first example plays
            monkeypatch.setattr(ui, "_visits", 1)
            threading.Timer(0.1, visitor_done.set).start()
        progress((1, 300), desc="step 1")  # the warm-up's next report of its progress

    monkeypatch.setattr(ui, "_cached_run", play_example)
    examples = [["tmaze", "shipped: rate", "shipped: dt", seed, 150, 1.0, 0, False, 0] for seed in (0, 1)]
    warm = threading.Thread(target=ui.warm_cache, args=(examples, 0.01))
    warm.start()
    visitor_done.wait(5)
    time.sleep(0.1)
    assert played == [0]  # it stopped at its report and waits while the visitor plays
    monkeypatch.setattr(ui, "_visits", 0)
    warm.join(5)
    assert played == [0, 0, 1]
    monkeypatch.setattr(ui, "_visits", 1)
    with pytest.raises(ui.WarmUpYields):
        ui._warm_up_progress(None, desc="writing videos")


def test_the_warm_up_stops_when_the_app_shuts_down(monkeypatch):
    import app.ui as ui

    played = []
    monkeypatch.setattr(ui, "CLOSING", threading.Event())

    def play_example(*example, progress):
        played.append(example[3])
        ui.CLOSING.set()  # as app.py does once the server has stopped (Ctrl-C)
        progress((1, 300), desc="step 1")

    monkeypatch.setattr(ui, "_cached_run", play_example)
    examples = [["tmaze", "shipped: rate", "shipped: dt", seed, 150, 1.0, 0, False, 0] for seed in (0, 1)]
    ui.warm_cache(examples, 0.01)  # returns: the exit need not wait for the examples
    assert played == [0]


def test_a_visitors_run_stops_when_the_app_shuts_down(monkeypatch):
    from types import SimpleNamespace

    import gradio as gr

    import app.ui as ui

    closing = threading.Event()
    closing.set()  # the server has stopped (Ctrl-C, SIGTERM)
    monkeypatch.setattr(ui, "CLOSING", closing)
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    inputs = ["tmaze", "shipped: rate", "shipped: dt", 77, 150, 1.0, 0, False, 0]
    page = SimpleNamespace(session_hash="a closing page")
    press = ui.run_started(*inputs, request=page)[-1]
    result = ui.run_episodes(*inputs, press, request=page, progress=lambda *args, **kwargs: None)
    assert all(isinstance(output, type(gr.skip())) for output in result) and not ui._visits
    ui.forget_page(page)
    # an API call has no page to leave as it is: it gets an error, not an answer without videos or summary
    with pytest.raises(gr.Error, match="the app is shutting down and stopped this run"):
        ui.run_episodes(*inputs, progress=lambda *args, **kwargs: None)
    assert not ui._visits


def test_videos_being_written_stop_when_the_app_shuts_down(monkeypatch, tmp_path):
    # the exit waits for the runs under way: one writing its videos (seconds for long episodes) stops too
    import app.episodes as episodes
    import app.ui as ui

    closing = threading.Event()
    monkeypatch.setattr(ui, "CLOSING", closing)
    monkeypatch.setattr(episodes, "VIDEO_ROOT", tmp_path)
    request = make_request("tmaze", 3, 150, 1.0, 0, False)
    checks, stop_if_closing = [], ui._stop_if_closing

    def counting_check():
        checks.append(1)
        if len(checks) >= 200:  # the server stops while the frames are being drawn and encoded
            closing.set()
        stop_if_closing()

    monkeypatch.setattr(ui, "_stop_if_closing", counting_check)
    with pytest.raises(ui.AppClosing):
        ui._play_and_render(request, "shipped: rate", "shipped: dt", lambda *args, **kwargs: None)
    assert 200 <= len(checks) < 210, len(checks)  # of 2 x 2 x 151 (each frame drawn, then encoded): stopped there
    assert not list(tmp_path.iterdir()), list(tmp_path.rglob("*"))  # no video, whole or partial, nor its folder
    closing.clear()
    monkeypatch.setattr(ui, "_stop_if_closing", stop_if_closing)
    left, right, *_ = ui._play_and_render(request, "shipped: rate", "shipped: dt", lambda *args, **kwargs: None)
    assert Path(left).stat().st_size > 0 and Path(right).stat().st_size > 0  # the same run, not closing: written


def test_a_failed_warm_up_example_is_reported_unless_the_app_is_closing(monkeypatch, capsys):
    import app.ui as ui

    def failing(*example, progress):
        if example[3] == 1:
            threading.Timer(0.05, ui.CLOSING.set).start()  # Ctrl-C: the server stops a little after ViZDoom's engine
        raise RuntimeError("the ViZDoom game of this Two-Colors env stopped")

    monkeypatch.setattr(ui, "CLOSING", threading.Event())
    monkeypatch.setattr(ui, "ERROR_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(ui, "_cached_run", failing)
    examples = [["vizdoom_two_colors", "shipped: rate", "shipped: dt", seed, None, 56.5, 500, True, 0]
                for seed in (0, 1, 2)]
    ui.warm_cache(examples, 0.01)
    assert capsys.readouterr().out.splitlines() == [  # seed 0's failure is reported, seed 1's is the app closing
        f"could not precompute example {examples[0]}: the ViZDoom game of this Two-Colors env stopped"]


def test_a_visitor_waiting_for_the_example_the_warm_up_plays_does_not_stop_it(monkeypatch):
    import app.ui as ui

    started, release, outcomes = threading.Event(), threading.Event(), []

    def slow_play(request, left, right, progress):
        started.set()
        release.wait(10)
        progress(None, desc="writing videos")  # the warm-up's check: it must not yield to a waiting visitor
        return "played"

    monkeypatch.setattr(ui, "_play_and_render", slow_play)
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    example = ["tmaze", "shipped: rate", "shipped: dt", 0, 150, 1.0, 0, False, 0]
    warm = threading.Thread(target=lambda: outcomes.append(ui._cached_run(*example, progress=ui._warm_up_progress)))
    warm.start()
    started.wait(5)
    visitor = threading.Thread(target=lambda: outcomes.append(ui.run_episodes(*example, progress=lambda *a, **k: None)))
    visitor.start()
    time.sleep(0.2)
    assert ui._visits == 0  # waiting, not playing
    release.set()
    warm.join(5)
    visitor.join(5)
    assert outcomes == ["played", "played"]


def test_when_the_run_others_wait_for_fails_one_of_them_plays_it_for_all(monkeypatch):
    import app.ui as ui

    plays, release, outcomes = [], threading.Event(), []

    def play(request, left, right, progress):
        plays.append(request.seed)
        if len(plays) == 1:
            release.wait(10)
            raise RuntimeError("the first player's env stopped")
        time.sleep(0.2)
        return "played"

    def call():
        try:
            outcomes.append(ui._cached_run(*example, progress=lambda *args, **kwargs: None))
        except RuntimeError as error:
            outcomes.append(str(error))

    monkeypatch.setattr(ui, "_play_and_render", play)
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    example = ["tmaze", "shipped: rate", "shipped: dt", 5, 150, 1.0, 0, False, 0]
    callers = [threading.Thread(target=call) for _ in range(3)]
    callers[0].start()
    while not plays:
        time.sleep(0.01)
    for caller in callers[1:]:
        caller.start()
    time.sleep(0.3)
    release.set()
    for caller in callers:
        caller.join(10)
    assert sorted(outcomes) == ["played", "played", "the first player's env stopped"]
    assert len(plays) == 2 and len(ui.RESULT_CACHE) == 1 and not ui._IN_FLIGHT  # played again once, and cached


def test_memory_heatmaps_take_the_scale_of_the_written_memories():
    from app import plots
    from app.episodes import play

    request = make_request("tmaze", 0, 150, 1.0, 0, False)
    trace = play(load_model("shipped: rate", "tmaze"), request)
    figure, caption = plots.memory_heatmaps(trace, "RATE")
    limits = {image.get_clim() for axis in figure.axes for image in axis.get_images()}
    written = float(np.abs(trace.memory[1:]).max())
    assert limits == {(-written, written)}
    if np.abs(trace.memory[0]).max() > written:
        assert "clipped" in caption
    plots.close([figure])


def test_what_if_replay_shows_rate_remembers_and_dt_forgets():
    from app.episodes import play, what_if
    from rate_core.tasks import get_task

    request = make_request("tmaze", 0, 300, 1.0, 0, False)
    models = [load_model("shipped: rate", "tmaze"), load_model("shipped: dt", "tmaze")]
    traces = [play(model, request) for model in models]
    rate, dt = what_if(traces, models, get_task("tmaze"))
    assert abs(rate["played"] - traces[0].probs[-1]).max() < 1e-4  # the replay reproduces the played step
    assert rate["played"].argmax() != rate["flipped"].argmax()  # the other cue, the other turn
    assert dt["played"].argmax() == dt["flipped"].argmax()  # the cue left DT's window long ago


def test_a_memory_horizon_makes_rate_forget_the_cue_and_leaves_dt_alone():
    from app.episodes import play, what_if
    from rate_core.tasks import get_task

    request = make_request("tmaze", 0, 300, 1.0, 0, False, memory_horizon=2)  # K = 50: the cue is 5 segments back
    models = [load_model("shipped: rate", "tmaze"), load_model("shipped: dt", "tmaze")]
    traces = [play(model, request) for model in models]
    assert traces[0].memory_horizon == 2 and traces[1].memory_horizon is None
    rate, _ = what_if(traces, models, get_task("tmaze"))
    assert abs(rate["played"] - traces[0].probs[-1]).max() < 1e-4  # the replay keeps to the horizon
    assert np.allclose(rate["played"], rate["flipped"], atol=1e-5)  # the other cue is out of reach: no change


def test_memory_plot_shows_what_an_auxiliary_head_reads():
    from app import plots
    from app.ui import aux_class_names
    from rate_core.rollout import run_episodes
    from rate_core.tasks import get_task
    from tests.test_rollout import RaggedVectorEnv

    assert aux_class_names(get_task("vizdoom_two_colors")) == ("green", "red")
    assert aux_class_names(get_task("tmaze")) == ("down", "up")
    trace = run_episodes(tiny_model("rate", aux_classes=2), RaggedVectorEnv([9]), seeds=[0], target_return=1.0,
                         trace=True).traces[0]
    figure, caption = plots.memory_attention(trace, "RATE", ("down", "up"), "cue: up")
    attention, reads = figure.axes
    assert [line.get_label() for line in reads.get_lines() if not line.get_label().startswith("_")] == ["down", "up"]
    assert list(reads.get_lines()[1].get_ydata()) == list(trace.aux_probs[:, 1])
    assert "cue: up" in reads.get_title() and "what it must remember" in caption
    # many classes (Memory Maze's 8 bearings): a heatmap, the true class at each step drawn over it
    from types import SimpleNamespace

    from app.ui import aux_truth

    maze = get_task("memory_maze")
    assert aux_class_names(maze) == maze.aux_values and len(maze.aux_values) == 8
    many = run_episodes(tiny_model("rate", aux_classes=8), RaggedVectorEnv([9]), seeds=[0], target_return=1.0,
                        trace=True).traces[0]
    played = SimpleNamespace(reset_info={"target_bearing": "left"},
                             info={"target_bearing": np.array(["ahead"] * 8 + ["odd"])})
    truth = aux_truth(maze, played)
    assert truth.tolist() == [2] + [0] * 8  # what the model saw before each step: the reset's, then each step's
    assert aux_truth(maze, SimpleNamespace(reset_info={}, info={})) is None
    figure_many, caption_many = plots.memory_attention(many, "RATE", maze.aux_values, "", truth)
    heat = figure_many.axes[1]
    assert heat.get_images()[0].get_array().shape == (8, 9) and len(heat.collections) == 1
    assert [t.get_text() for t in heat.get_yticklabels()] == list(maze.aux_values) and "cyan dots" in caption_many
    plots.close([figure_many])
    plain = run_episodes(tiny_model("rate"), RaggedVectorEnv([9]), seeds=[0], target_return=1.0, trace=True).traces[0]
    figure_plain, caption_plain = plots.memory_attention(plain, "RATE")
    assert len(figure_plain.axes) == 1 and "remember" not in caption_plain
    plots.close([figure, figure_plain])


def test_outcome_text_names_the_run_and_says_when_the_app_cut_the_episode_short():
    import matplotlib.pyplot as plt

    from app.episodes import frame_text, outcome, play, what_if
    from app.ui import memory_panel, run_title
    from rate_core.tasks import get_task

    task = get_task("tmaze")
    models = [load_model("shipped: rate", "tmaze"), load_model("shipped: dt", "tmaze")]
    for cap, expected in ((50, True), (0, False)):  # 50: one whole segment
        request = make_request("tmaze", 0, 300, 1.0, cap, False)
        traces = [play(model, request) for model in models]
        summary = {"seed": 0, "settings": request.settings, "app_step_cap": request.step_cap,
                   **{side: outcome(trace, model, task)
                      for side, trace, model in zip(("left", "right"), traces, models, strict=True)}}
        text, *figures = memory_panel({"traces": traces, "names": ["RATE", "DT"], "task": "tmaze", "summary": summary,
                                       "title": run_title(request), "what_if": None})
        first = "the first 50 steps, " if cap else ""
        assert text.startswith(f"**T-Maze (passive)**: seed 0, corridor length T = 300, {first}target return 1, "
                               "the most likely actions.  \n**RATE**: "), text
        assert ("return 0 in 50 steps (stopped there by the step cap)" in text) == expected, text
        # cut off before the junction, an episode has no verdict yet: not finished, not failed
        assert ("**RATE**: **not finished**, " in text) == expected and ("**RATE**: **success**, " in text) != expected
        assert summary["left"]["stopped_by_step_cap"] is expected
        last, note, begins = frame_text(traces[0], traces[0].length, task, "RATE (left)", memory=True)
        verdict = "stopped by the step cap after 50 steps" if cap else "success after 299 steps"
        assert last == f"RATE (left)   {verdict}   return {traces[0].total_return:g}" and not begins
        # the frame after the last step shows the last segment played (50 steps: the first), not a next one
        assert note == f"segment {1 if cap else 6} (K = 50 steps)"
        assert "1 segment," in text if cap else "6 segments, 5 memory updates" in text
        assert figures[0]["visible"] is False  # no replay: the counterfactual panel is hidden, not an empty box
        assert all(figure["visible"] for figure in figures[1:5])
        plt.close("all")
    _, shown, *others = memory_panel({"traces": traces, "names": ["RATE", "DT"], "task": "tmaze", "summary": summary,
                                      "title": run_title(request), "what_if": what_if(traces, models, task)})
    assert shown["visible"] is True and shown["value"] is not None
    plt.close("all")
    assert run_title(make_request("memory_maze", 41, None, 18.1, 300, True, 2)) == (
        "**Memory Maze 9x9**: seed 41, the first 300 steps of at most 1000, target return 18.1, sampled actions, "
        "memory horizon 2 segments")
    assert run_title(make_request("minigrid_memory", 1, 91, 0.96, 0, True)) == (
        "**Minigrid-Memory**: seed 1, grid size = 91, at most 500 steps, target return 0.96, sampled actions")
    # minigrid ends a grid of 9 after 5 * 9^2 = 405 steps, before the 500-step cap
    assert run_title(make_request("minigrid_memory", 1, 9, 0.96, 0, True)) == (
        "**Minigrid-Memory**: seed 1, grid size = 9, at most 405 steps, target return 0.96, sampled actions")
    assert run_title(make_request("minigrid_memory", 1, 7, 0.96, 300, True)) == (  # a cap above the limit: no cap
        "**Minigrid-Memory**: seed 1, grid size = 7, at most 245 steps, target return 0.96, sampled actions")
    assert run_title(make_request("minigrid_memory", 1, 7, 0.96, 100, True)) == (
        "**Minigrid-Memory**: seed 1, grid size = 7, the first 100 steps of at most 245, target return 0.96, "
        "sampled actions")
    assert memory_panel(None) == [{"__type__": "update"}] * 11  # a superseded run changes nothing


def test_memory_heatmaps_say_which_memories_they_show_and_fit_their_title():
    import matplotlib.pyplot as plt

    from app import plots
    from app.episodes import play

    model = load_model("shipped: rate", "tmaze")  # segments of K = 50 steps
    cases = {10: ("at the start (no update in this episode)", None),  # 9 steps: one segment
             51: ("at the start and after its one update", "after step 50 (final)"),  # a full last segment
             120: ("at the start and after each of its 2 updates", "after step 100"),  # the last one is partial
             1200: ("at the start and after 7 of its 23 updates", "after step 1150")}
    for length, (title, last) in cases.items():
        trace = play(model, make_request("tmaze", 0, length, 1.0, 0, False))
        figure, caption = plots.memory_heatmaps(trace, "RATE (left)")
        figure.canvas.draw()
        assert figure._suptitle.get_text() == f"RATE (left): memory tokens {title}"
        inside = figure._suptitle.get_window_extent()
        assert 0 <= inside.x0 and inside.x1 <= figure.bbox.x1  # the title is not cut at either side
        panels = [axis.get_title() for axis in figure.axes if axis.get_images()]
        assert panels[0] == "start" and (last is None or panels[-1] == last)
        assert ("no segment reads it" in caption) == (last is not None and "final" in last)
        assert ("8 of the 24 memories are shown" in caption) == (length == 1200)
        plt.close(figure)


def test_the_legends_hide_no_data():
    """The memory change's and the what-if's legends sit outside their axes (in a corner they covered points, bars)."""
    import matplotlib.pyplot as plt

    from app import plots
    from app.episodes import play

    trace = play(load_model("shipped: rate", "tmaze"), make_request("tmaze", 0, 300, 1.0, 0, False))
    sure = {"played": np.array([0, 0, 0, 1.0]), "flipped": np.array([0, 0, 0, 1.0])}  # the highest bars, at the right
    for figure, _ in (plots.memory_change(trace, "RATE"),
                      plots.what_if([sure, sure], ["RATE", "DT"], ("right", "up", "left", "down"), "cue")):
        figure.canvas.draw()
        legend = figure.legends[0].get_window_extent()
        for axis in figure.axes:
            assert not legend.overlaps(axis.get_window_extent())
        plt.close(figure)


def test_a_new_run_or_another_task_stops_the_run_the_page_plays(monkeypatch):
    """Run pressed again, or another task chosen, while a run plays: the older run stops at its next report and
    changes nothing on the page (gr.skip()); only the latest run is shown. The API has no page: none stops."""
    from types import SimpleNamespace

    import gradio as gr

    import app.ui as ui
    from rate_core.tasks import get_task

    reports = []

    def slow_play(request, left, right, progress):
        for step in range(200):  # 2 s unless stopped, reporting like play_pair
            reports.append(request.seed)
            progress((step, 300), desc=f"step {step}")
            time.sleep(0.01)
        return [None, None, None, {"seed": request.seed}]  # videos, summary, panel input

    monkeypatch.setattr(ui, "_play_and_render", slow_play)
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    quiet = lambda *args, **kwargs: None  # noqa: E731
    page = SimpleNamespace(session_hash="a page")

    def press(task, seed, results):
        inputs = [task, "shipped: rate", "shipped: dt", seed, 150 if task == "tmaze" else None, 1.0, 0, False, 0]
        outcome, *cleared, number = ui.run_started(*inputs, request=page)
        assert outcome.startswith(f"Playing **{get_task(task).title}**: seed {seed},")
        assert cleared[:4] == [None] * 4 and all(not plot["visible"] for plot in cleared[4:4 + ui.PANELS])
        thread = threading.Thread(target=lambda: results.append(ui.run_episodes(*inputs, number, request=page,
                                                                                progress=quiet)))
        thread.start()
        return thread, outcome

    results = []
    first, _ = press("tmaze", 12, results)
    while 12 not in reports:
        time.sleep(0.01)
    started = time.perf_counter()
    second, _ = press("tmaze", 13, results)  # within 0.3 s: the second press is not dropped, it supersedes
    first.join(5)
    assert time.perf_counter() - started < 1 and results == [[gr.skip()] * 4]  # stopped at once, nothing shown
    second.join(5)
    assert results[1][3] == {"seed": 13, "task": "tmaze", "press": ui._page(page).generation}  # the panel's run
    # another task chosen while Memory Maze plays: that run stops and the outcome line says so
    results.clear()
    third, playing = press("memory_maze", 41, results)
    while 41 not in reports:
        time.sleep(0.01)
    _, _, _, _, stopped, *cleared = ui.task_changed("tmaze", playing, request=page)
    third.join(5)
    assert results == [[gr.skip()] * 4] and stopped.startswith("**Stopped**, as another task was chosen: **Memory Maze")
    assert cleared[:4] == [None] * 4  # what the page showed of the other task's runs goes
    # the outcome line of a run of the other task that had ended goes too, with its videos and panels
    _, _, _, _, outcome, *cleared = ui.task_changed("tmaze", "**T-Maze (passive)**: seed 1 ...", request=page)
    assert outcome == "" and cleared[:4] == [None] * 4 and all(not plot["visible"] for plot in cleared[4:4 + ui.PANELS])
    assert cleared[4 + ui.PANELS:] == [""] * ui.PANELS
    # without a page (the API), runs never stop each other
    results.clear()
    api_runs = [threading.Thread(target=lambda seed=seed: results.append(ui.run_episodes(
        "tmaze", "shipped: rate", "shipped: dt", seed, 150, 1.0, 0, False, progress=quiet))) for seed in (1, 2)]
    for run in api_runs:
        run.start()
    for run in api_runs:
        run.join(10)
    assert sorted(result[3]["seed"] for result in results) == [1, 2]
    assert all("press" not in result[3] for result in results)  # no page: the panels are always drawn
    ui.forget_page(page)
    assert "a page" not in ui._pages


def test_a_run_queued_behind_a_newer_press_of_its_page_does_not_start(monkeypatch):
    """Both run slots busy with other visitors' runs, a page presses Run twice: the queue starts the older
    run first, which must give way to the newer press at once, not play and show itself first."""
    from types import SimpleNamespace

    import gradio as gr

    import app.ui as ui

    played = []
    monkeypatch.setattr(ui, "_play_and_render",
                        lambda request, *rest: played.append(request.seed) or [None] * 3 + [{"seed": request.seed}])
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    page = SimpleNamespace(session_hash="a page in the queue")
    inputs = {seed: ["tmaze", "shipped: rate", "shipped: dt", seed, 150, 1.0, 0, False, 0] for seed in (15, 16)}
    presses = {seed: ui.run_started(*inputs[seed], request=page)[-1] for seed in (15, 16)}
    quiet = lambda *args, **kwargs: None  # noqa: E731
    assert ui.run_episodes(*inputs[15], presses[15], request=page, progress=quiet) == [gr.skip()] * 4
    assert ui.run_episodes(*inputs[16], presses[16], request=page, progress=quiet)[3]["seed"] == 16
    assert played == [16]
    ui.forget_page(page)


def test_a_cached_result_is_played_again_once_its_checkpoint_is_written_again(monkeypatch, tmp_path):
    import os
    import shutil

    import app.ui as ui
    from app.episodes import checkpoint_path

    for mode in ("rate", "dt"):  # copies of the shipped checkpoints, to write one again in place
        shutil.copytree(checkpoint_path(f"shipped: {mode}", "tmaze"), tmp_path / mode)
    monkeypatch.setattr(ui, "checkpoint_path", lambda choice, task: tmp_path / choice.split(": ")[1])
    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    played = []
    monkeypatch.setattr(ui, "_play_and_render", lambda request, *rest: played.append(request.seed) or len(played))
    inputs = ["tmaze", "shipped: rate", "shipped: dt", 5, 150, 1.0, 0, False, 0]
    quiet = lambda *args, **kwargs: None  # noqa: E731
    assert [ui._cached_run(*inputs, quiet) for _ in range(2)] == [1, 1]  # the second from the cache
    weights = tmp_path / "dt" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # training wrote it
    assert [ui._cached_run(*inputs, quiet) for _ in range(2)] == [2, 2] and played == [5, 5]


def test_a_refused_run_is_one_line_in_the_log_and_its_message_is_the_outcome(capsys):
    from types import SimpleNamespace

    import gradio as gr

    import app.ui as ui

    page = SimpleNamespace(session_hash="another page")
    inputs = ["tmaze", "shipped: rate", "shipped: dt", 0, 3, 1.0, 0, False, 0]
    message = "corridor length T (steps) must be a whole number from 10 to 1200, got 3"
    assert ui.run_started(*inputs, request=page)[0] == ""  # the run says what is wrong
    # a page: no error (Gradio would badge the emptied boxes "Error" and stack a toast per press), no
    # videos, and the message as the outcome line
    left, right, summary, panel_input = ui.run_episodes(*inputs, request=page, progress=lambda *a, **k: None)
    assert left is None and right is None and summary is None
    outcome, *panels = ui.memory_panel(panel_input)
    assert outcome == f"**Not played**: {message}" and len(panels) == 2 * ui.PANELS
    assert capsys.readouterr().out.strip() == f"run refused: {message}"  # one line in the server's log
    with pytest.raises(gr.Error) as refused:  # an API call: its client gets the error
        ui.run_episodes(*inputs, request=None, progress=lambda *a, **k: None)
    assert refused.value.message == message
    assert refused.value.print_exception is False  # no traceback in the server's log: one line
    assert capsys.readouterr().out.strip().count("\n") == 0
    assert ui.run_failed() == "**Not played**: the run stopped with an error."
    ui.forget_page(page)


def test_old_videos_are_pruned_but_those_still_served_are_kept(tmp_path):
    import os

    from app.episodes import prune_videos

    folders = []
    for age in range(6):  # episode_0 the newest
        folder = tmp_path / f"episode_{age}"
        folder.mkdir()
        os.utime(folder, (1_000_000 - age, 1_000_000 - age))
        folders.append(folder)
    (tmp_path / "other").mkdir()  # not an episode folder: never touched
    assert prune_videos(keep=[folders[5]], root=tmp_path, limit=2) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode_0", "episode_1", "episode_5", "other"]


def test_a_run_that_ended_as_its_page_moved_on_draws_no_panels_there(monkeypatch):
    # the run ends, then (before its outcome and panels are drawn) the page chooses another task or
    # presses Run again: the page shows nothing of that run beside the other task or the newer run
    from types import SimpleNamespace

    import gradio as gr

    import app.ui as ui

    monkeypatch.setattr(ui, "RESULT_CACHE", ui.OrderedDict())
    skip = gr.skip()
    inputs = ["tmaze", "shipped: rate", "shipped: dt", 5, 150, 1.0, 0, False, 0]
    page = SimpleNamespace(session_hash="a page that moves on")
    press = ui.run_started(*inputs, request=page)[-1]
    *_, panel_input = ui.run_episodes(*inputs, press, request=page, progress=lambda *args, **kwargs: None)
    assert panel_input["press"] == press and panel_input["task"] == "tmaze"
    text = ui.outcome_line(panel_input, page)  # the page still shows the run: drawn
    assert text.startswith("**T-Maze (passive)**: seed 5")
    assert skip not in ui.panel_figures(panel_input, page)
    ui.task_changed("memory_maze", text, request=page)  # another task chosen
    assert ui.outcome_line(panel_input, page) == skip
    assert ui.panel_figures(panel_input, page) == [skip] * (2 * ui.PANELS)
    ui.task_changed("tmaze", "", request=page)
    ui.run_started(*inputs[:3], 6, *inputs[4:], request=page)  # Run pressed again
    assert ui.memory_panel(panel_input, page) == [skip] * (1 + 2 * ui.PANELS)
    assert ui.outcome_line(panel_input).startswith("**T-Maze")  # the API and tests have no page: drawn
    ui.forget_page(page)
    import matplotlib.pyplot as plt
    plt.close("all")


def test_checkpoints_that_cannot_play_are_named_by_side_both_at_once():
    import app.ui as ui
    from app.episodes import AppError

    request = make_request("tmaze", 0, 150, 1.0, 0, False)
    with pytest.raises(AppError) as both:
        ui._play_and_render(request, "/nowhere/L", "assets/checkpoints/minigrid_memory/rate", lambda *a, **k: None)
    left, right = str(both.value).split("  \n")  # one line each, in the outcome's markdown
    assert left.startswith("left agent: checkpoint folder /nowhere/L does not exist")
    assert right.startswith("right agent: ") and right.endswith("use a checkpoint trained on tmaze"), right
    with pytest.raises(AppError, match=r"^right agent: checkpoint folder /nowhere/R does not exist"):
        ui._play_and_render(request, "shipped: rate", "/nowhere/R", lambda *a, **k: None)


def test_a_space_keeps_visitors_off_its_disk_unless_told_and_a_slow_load_holds_up_no_other(monkeypatch):
    import app.episodes as episodes

    monkeypatch.delenv("RATE_APP_LOCAL_PATHS", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert episodes.local_paths_allowed()
    monkeypatch.setenv("SPACE_ID", "someone/rate-demo")  # set by Hugging Face on a Space
    assert not episodes.local_paths_allowed()
    monkeypatch.setenv("RATE_APP_LOCAL_PATHS", "1")
    assert episodes.local_paths_allowed()
    # a slow load (an hf:// download) of one model: another model loads meanwhile; the same model loads once
    monkeypatch.setattr(episodes, "_models", episodes.OrderedDict())
    release, loads, order = threading.Event(), [], []

    def slow():
        loads.append("slow")
        release.wait(10)
        return "slow model"

    threads = [threading.Thread(target=lambda: order.append(episodes._remember("slow", slow))) for _ in range(2)]
    for thread in threads:
        thread.start()
    while not loads:
        time.sleep(0.01)
    order.append(episodes._remember("fast", lambda: "fast model"))  # does not wait for the download
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["fast model", "slow model", "slow model"] and loads == ["slow"]


def test_panels_draw_no_segments_for_dt_start_the_change_axis_at_zero_and_colour_named_classes_so():
    import matplotlib.pyplot as plt

    from app import plots
    from app.episodes import play

    request = make_request("tmaze", 0, 300, 1.0, 0, False)
    rate, dt = (play(load_model(f"shipped: {mode}", "tmaze"), request) for mode in ("rate", "dt"))
    assert dt.sliding_window and not rate.sliding_window
    figure, _ = plots.action_probabilities([rate, dt], ["RATE", "DT"], ("0", "1", "2", "3"))
    dotted = [[line for line in axis.get_lines() if line.get_linestyle() == ":"] for axis in figure.axes[0:4:2]]
    assert len(dotted[0]) == 5 and dotted[1] == []  # RATE's 6 segments begin at 50, ..., 250; DT slides
    figure, _ = plots.memory_change(rate, "RATE")
    assert figure.axes[0].get_ylim()[0] == 0  # from 0, as the cosine axis beside it
    plt.close("all")
    rate.aux_probs = np.tile([0.2, 0.8], (rate.length, 1)).astype(np.float32)
    figure, _ = plots.memory_attention(rate, "RATE", ("green", "red"), "", None)
    colours = {line.get_label(): line.get_color() for axis in figure.axes for line in axis.get_lines()}
    assert colours["green"] == "tab:green" and colours["red"] == "tab:red"
    plt.close("all")

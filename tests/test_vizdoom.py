"""ViZDoom-Two-Colors: the scenario's mechanics in the running game, and the gymnasium envs around it.

The mechanics tests drive one ViZDoom game tic by tic and read the things in the room from its
objects info. The pickup tests teleport the player onto an item with the `warp` console command
(a cheat, enabled for this game only), so the real pickup scripts run.
Frames of the room with and without the pillar are saved to outputs/vizdoom_frames/.
"""

import gc
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import vizdoom as vzd
from gymnasium.utils.env_checker import check_env

from rate_core.envs.vizdoom_two_colors import (ACTIONS, OBS_SHAPE, SCREEN_SHAPE, GameCrashedError, TwoColorsEnv,
                                               TwoColorsExpert, TwoColorsTeacher, make_vector_env)
from rate_core.scenario import two_colors

FRAMES_DIR = Path(__file__).resolve().parents[1] / "outputs" / "vizdoom_frames"
HEALTH, SHAPING, IS_RED = 0, 1, 2  # the game variables' order in the config
STAND = [0, 0, 0, 0]
FORWARD = [0, 0, 1, 0]


@pytest.fixture(scope="module")
def game():
    game = vzd.DoomGame()
    config = two_colors.scenario_config()
    game.load_config(str(config))
    game.set_doom_config_path(str(config.parent / "_vizdoom.ini"))
    game.set_objects_info_enabled(True)
    game.add_game_args("+sv_cheats 1")  # for warp
    game.init()
    yield game
    game.close()


def start(game, seed: int):
    game.set_seed(seed)
    game.new_episode()
    return game.get_state()


def advance_to(game, tic: int, buttons=STAND):
    while game.get_state().tic < tic:
        game.make_action(buttons, 1)
    return game.get_state()


def things(state) -> Counter:
    return Counter(thing.name for thing in state.objects)


@pytest.fixture(scope="module")
def seeds(game) -> dict[int, list[int]]:
    """Seeds by pillar colour (1: red), the first few of each."""
    found = {0: [], 1: []}
    seed = 0
    while min(len(v) for v in found.values()) < 3:
        found[int(start(game, seed).game_variables[IS_RED])].append(seed)
        seed += 1
    return found


# ------------------------------------------------------------------------------- the scenario
@pytest.mark.parametrize("is_red", [0, 1])
def test_pillar_shows_the_drawn_colour_for_90_tics(game, seeds, is_red):
    pillar = two_colors.RED_PILLAR if is_red else two_colors.GREEN_PILLAR
    other = two_colors.GREEN_PILLAR if is_red else two_colors.RED_PILLAR
    for seed in seeds[is_red]:
        state = start(game, seed)
        assert state.tic == 1 and state.game_variables[IS_RED] == is_red
        assert things(state)[pillar] == 1 and things(state)[other] == 0
        column = next(t for t in state.objects if t.name == pillar)
        assert (column.position_x, column.position_y) == (0, 0)
        assert things(advance_to(game, 90))[pillar] == 1
        assert things(advance_to(game, 91))[pillar] == 0
        assert things(advance_to(game, 380))[pillar] == 0 and game.get_state().game_variables[IS_RED] == is_red


def test_items_ten_of_each_then_one_every_30_tics(game):
    expected = {1: (10, 10), 90: (10, 10), 91: (11, 10), 120: (11, 10), 121: (11, 11), 151: (12, 11), 181: (12, 12),
                211: (13, 12)}
    positions = []
    for seed in (3, 4):
        start(game, seed)
        for tic, (green, red) in expected.items():
            state = advance_to(game, tic)
            counts = things(state)
            assert (counts[two_colors.GREEN_ITEM], counts[two_colors.RED_ITEM]) == (green, red), tic
        positions += [(t.position_x, t.position_y, t.position_z) for t in state.objects if t.name.endswith("Armor")]
    positions = np.array(positions)
    assert np.abs(positions[:, :2]).max() <= 620 and ((0 <= positions[:, 2]) & (positions[:, 2] <= 20)).all()
    assert np.abs(positions[:, :2]).max() > 400  # spread over the room


def test_red_and_green_about_equally_likely(game):
    reds = [start(game, seed).game_variables[IS_RED] for seed in range(400)]
    assert set(reds) == {0, 1}
    assert 0.40 <= np.mean(reds) <= 0.60


def test_same_seed_same_episode(game):
    def layout(seed):
        state = start(game, seed)
        return [(t.name, t.position_x, t.position_y) for t in state.objects]

    assert layout(11) == layout(11)
    assert layout(11) != layout(12)


def test_floor_costs_8_health_every_32_tics_until_death(game):
    start(game, 5)
    health = {}
    while not game.is_episode_finished():
        state = game.get_state()
        health[state.tic] = state.game_variables[HEALTH]
        game.make_action(STAND, 1)
    assert health[1] == 92
    assert all(h == 100 - 8 * (1 + (tic - 1) // 32) for tic, h in health.items())
    assert game.is_player_dead() and max(health) == 384  # the 13th hit (tic 384) kills


@pytest.mark.parametrize("is_red, item, tic, change", [
    (1, two_colors.RED_ITEM, 101, +25),  # right items heal
    (0, two_colors.GREEN_ITEM, 101, +25),
    (0, two_colors.GREEN_ITEM, 5, +8),  # ... up to 100
    (1, two_colors.GREEN_ITEM, 101, -17),  # wrong items hurt, less the armour's share
    (0, two_colors.RED_ITEM, 101, -13),
])
def test_pickup_scripts(game, seeds, is_red, item, tic, change):
    start(game, seeds[is_red][0])
    state = advance_to(game, tic)  # five tics past a floor hit: the next one is 27 tics away
    before, counts = state.game_variables, things(state)
    items = [(t.position_x, t.position_y) for t in state.objects if t.name.endswith("Armor")]

    def room(x, y):  # distance to the nearest other item
        return sorted(np.hypot(*(np.array(items) - (x, y)).T))[1]

    target = max((t for t in state.objects if t.name == item), key=lambda t: room(t.position_x, t.position_y))
    assert room(target.position_x, target.position_y) > 80  # walking onto it touches nothing else
    game.send_game_command(f"warp {target.position_x} {target.position_y}")
    rewards = [game.make_action(FORWARD, 1) for _ in range(4)]
    state = game.get_state()
    after = state.game_variables
    assert after[HEALTH] - before[HEALTH] == change
    assert things(state)[item] == counts[item] - 1 and sum(things(state).values()) == sum(counts.values()) - 1
    right = (item == two_colors.RED_ITEM) == bool(is_red)
    assert after[SHAPING] - before[SHAPING] == (65536 if right else -65536)  # USER1: 16.16 fixed point
    assert game.get_game_variable(vzd.GameVariable.ARMOR) == 0  # inventory cleared
    assert rewards == pytest.approx([0.01] * 4)  # the scenario's own reward stays 0


def test_frames_show_the_pillar_then_the_empty_room(game, seeds):
    """Saves the screen at a few tics (standing still) and checks that pillar-coloured pixels fill
    the pillar's top, seen against the far wall just above the horizon (where no item reaches),
    only while it stands. Tic 1 is tinted red by the floor's first hit, so the check starts later."""
    import cv2

    FRAMES_DIR.mkdir(parents=True, exist_ok=True)
    for is_red in (0, 1):
        start(game, seeds[is_red][0])
        shares = {}
        for tic in (1, 16, 45, 90, 91, 150):
            screen = advance_to(game, tic).screen_buffer
            cv2.imwrite(str(FRAMES_DIR / f"{'red' if is_red else 'green'}_tic{tic:03d}.png"), screen[:, :, ::-1])
            top = screen[82:92, 145:175].astype(int)
            main, other = (top[..., 0], top[..., 1]) if is_red else (top[..., 1], top[..., 0])
            shares[tic] = float(np.mean((main > 40) & (main > 1.5 * other) & (main > 1.5 * top[..., 2])))
        assert min(shares[16], shares[45], shares[90]) > 0.03, shares
        assert max(shares[91], shares[150]) == 0, shares


# ------------------------------------------------------------------------------- the envs
def test_env_observation_reward_and_death():
    env = TwoColorsEnv()
    obs, info = env.reset(seed=0)
    assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8 and obs.std() > 10
    assert info == {"is_red": info["is_red"], "health": 92} and info["is_red"] in (0, 1)
    rewards = []
    terminated = truncated = False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, info = env.step(0)  # turning in place picks up nothing
        rewards.append(reward)
    assert terminated and not truncated and len(rewards) == 192 and info["health"] <= 0
    assert rewards == pytest.approx([0.02] * 192)
    with pytest.raises(RuntimeError, match="over"):
        env.step(0)
    env.close()


def test_env_is_deterministic_per_seed_and_truncates_at_the_step_cap():
    env = TwoColorsEnv(step_cap=60)
    actions = np.random.default_rng(0).integers(len(ACTIONS), size=60)

    def play(seed):
        obs, info = env.reset(seed=seed)
        frames, rewards = [obs], []
        for action in actions:
            obs, reward, terminated, truncated, info = env.step(action)
            frames.append(obs)
            rewards.append(reward)
        assert truncated and not terminated
        return np.stack(frames), rewards

    first, again, other = play(7), play(7), play(8)
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert not np.array_equal(first[0], other[0])
    env.close()


def test_env_passes_gymnasium_env_checker():
    env = TwoColorsEnv(step_cap=20)
    check_env(env, skip_render_check=True)
    env.close()


def test_expert_collects_right_items_for_a_bonus():
    env = TwoColorsEnv(step_cap=300)
    expert = TwoColorsExpert()
    obs, info = env.reset(seed=1)
    expert.reset(env, info)
    health, bonuses = info["health"], 0
    for _ in range(300):
        obs, reward, terminated, truncated, info = env.step(expert.act(env, obs, info))
        rose = info["health"] > health
        assert reward == pytest.approx(1.02 if rose else 0.02)
        bonuses += rose
        health = info["health"]
        if terminated or truncated:
            break
    assert truncated and not terminated and bonuses >= 5  # it outlives the 192 steps of an idle player
    env.close()


class _PlacedItems:
    """Stands in for the env in TwoColorsExpert.act: a fixed player pose and items."""

    def __init__(self, pose, items):
        self.pose, self.items = np.array(pose, dtype=float), np.array(items, dtype=float).reshape(-1, 3)
        self.np_random = np.random.default_rng(0)

    def objects(self):
        return self.pose, self.items


def _expert_action(items, is_red=1):
    expert = TwoColorsExpert(noise=0.0)
    env = _PlacedItems([0.0, 0.0, 0.0], items)  # at the origin, facing +x
    expert.reset(env, {"is_red": is_red})
    return expert.act(env, None, None)


def test_expert_goes_only_for_items_on_screen():
    assert _expert_action([[300, 0, 1]]) == 2  # straight ahead: forward
    assert _expert_action([[300, 0, 0]], is_red=0) == 2
    assert _expert_action([[-300, 0, 1], [0, -300, 0]]) == 0  # right item behind, nothing on screen: search turn
    assert _expert_action([[300, 300, 1]]) == 0  # 45 degrees to the left, on screen: turns left to it
    assert _expert_action([[300, -300, 1]]) == 1


def test_expert_steers_around_a_wrong_item_in_its_way():
    assert _expert_action([[400, 0, 1]]) == 2
    assert _expert_action([[400, 0, 1], [100, -10, 0]]) != 2  # a wrong item just ahead: it does not walk on


def test_teacher_detours_to_the_other_colour_and_labels_with_the_expert():
    env = TwoColorsEnv(step_cap=150)
    teacher = TwoColorsTeacher(noise=0.0, detour=0.05)
    expert, other = TwoColorsExpert(noise=0.0), TwoColorsExpert(noise=0.0)
    obs, info = env.reset(seed=3)
    teacher.reset(env, info)
    expert.reset(env, info)
    other.reset(env, {"is_red": 1 - info["is_red"]})
    kinds = Counter()
    for _ in range(150):
        action, label = teacher.act_and_label(env, obs, info)
        right, wrong = expert.act(env, obs, info), other.act(env, obs, info)
        assert label == right  # the label is the noise-free expert's action in the state reached
        kinds["detour" if action != label else "expert"] += 1
        assert action in (right, wrong)  # without noise: the expert's or the other colour's action
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    assert kinds["detour"] >= 5 and kinds["expert"] >= 50
    # a detour lasts detour_min..detour_max steps: with detour=1 one starts at the first step
    fixed = TwoColorsTeacher(noise=0.0, detour=1.0, detour_min=7, detour_max=7)
    obs, info = env.reset(seed=3)
    fixed.reset(env, info)
    fixed.act_and_label(env, obs, info)
    assert fixed.left == 6
    with pytest.raises(ValueError, match="detour_min <= detour_max"):
        TwoColorsTeacher(detour_min=5, detour_max=3)
    env.close()


def test_collector_stores_the_teachers_labels_on_request(tmp_path, capsys):
    from rate_core.tasks import get_task
    from training.collect import collect, run_episode
    from training.dataset import load_dataset

    task = get_task("vizdoom_two_colors")
    episode = run_episode(task, {"step_cap": 60}, seed=5, teacher=True)
    assert episode["labels"].shape == episode["actions"].shape == (60,)
    assert (episode["labels"] != episode["actions"]).any()
    assert np.array_equal(episode["aux_labels"], np.full(60, episode["reset_info"]["is_red"]))  # the colour
    assert "labels" not in run_episode(task, {"step_cap": 10}, seed=5)  # the expert, as the report runs it
    taught = load_dataset(collect(task, tmp_path / "taught", 1, seed=5, teacher=True))  # collect --teacher
    assert taught.labels is not None and taught.meta["settings"]["teacher"] == "TwoColorsTeacher"
    plain = load_dataset(collect(task, tmp_path / "plain", 1, seed=5))
    assert plain.labels is None and plain.meta["settings"]["teacher"] is None
    report = capsys.readouterr().out.splitlines()[-1]
    assert "wrote 1 episodes" in report and "succeeded" not in report  # a return task: no success to report


def test_collect_teacher_options_set_the_teachers_behaviour(tmp_path):
    from rate_core.tasks import get_task
    from training.collect import Args, main
    from training.dataset import load_dataset

    task = get_task("vizdoom_two_colors")
    # only random actions, no detours: every step's label is still the expert's action
    main(Args(task=task.name, out=tmp_path / "noisy", episodes=1, teacher=True, settings=("step_cap=40",),
              teacher_options=("noise=1", "detour=0")))
    noisy = load_dataset(tmp_path / "noisy")
    assert noisy.meta["settings"]["teacher_settings"]["noise"] == 1.0
    assert noisy.meta["settings"]["teacher_settings"]["detour"] == 0.0
    default = task.make_teacher()
    assert (default.noise, default.detour) == (0.1, 1 / 12)  # the registry's defaults where none is given
    differing = noisy.meta["settings"]["labelled_steps_differing"]
    assert 0.5 < differing < 1.0  # random actions out of five agree with the label about a fifth of the time
    with pytest.raises(SystemExit, match="no setting 'noize'; it has noise, detour, detour_min, detour_max"):
        main(Args(task=task.name, out=tmp_path / "x", episodes=1, teacher=True, teacher_options=("noize=1",)))
    with pytest.raises(SystemExit, match="NAME=NUMBER"):
        main(Args(task=task.name, out=tmp_path / "x", episodes=1, teacher=True, teacher_options=("noise=lots",)))
    with pytest.raises(SystemExit, match="--teacher-options: a detour lasts"):
        main(Args(task=task.name, out=tmp_path / "x", episodes=1, teacher=True, teacher_options=("detour_min=0",)))
    with pytest.raises(SystemExit, match="add --teacher"):
        main(Args(task=task.name, out=tmp_path / "x", episodes=1, teacher_options=("noise=1",)))


def test_pillar_cue_paints_the_colour_only_while_the_pillar_stands():
    from rate_core.envs.vizdoom_two_colors import CUE_GREEN, CUE_RED, CUE_SIZE

    plain, cued = TwoColorsEnv(step_cap=60), TwoColorsEnv(step_cap=60, cue=2)
    try:
        for seed in (0, 2):
            a, info = plain.reset(seed=seed)
            b, _ = cued.reset(seed=seed)
            painted = []
            for step in range(55):
                patch = (CUE_RED if info["is_red"] else CUE_GREEN)[:, None, None]
                corner = b[:, :CUE_SIZE[0], :CUE_SIZE[1]]
                painted.append(bool((corner == patch).all()))
                if not painted[-1]:  # no patch: the frame is the plain one
                    np.testing.assert_array_equal(a, b)
                a, _, _, _, info = plain.step(step % 5)
                b, _, _, _, _ = cued.step(step % 5)
            # the pillar stands for 90 tics: observations 0-44 (frame skip 2), then it is gone
            assert painted == [True] * 45 + [False] * 10
    finally:
        plain.close()
        cued.close()


def test_oracle_cue_paints_the_pillars_colour_into_every_frame_and_nothing_else(tmp_path):
    from rate_core.envs.vizdoom_two_colors import CUE_GREEN, CUE_RED, CUE_SIZE
    from rate_core.tasks import get_task
    from training.collect import Args, main, parse_settings
    from training.dataset import load_dataset

    plain, cued = TwoColorsEnv(step_cap=60), TwoColorsEnv(step_cap=60, cue=1)
    try:
        for seed in (0, 2):
            a, info = plain.reset(seed=seed)
            b, _ = cued.reset(seed=seed)
            for step in range(50):  # the cue stays after the pillar has gone (step 45)
                patch = (CUE_RED if info["is_red"] else CUE_GREEN)[:, None, None]
                assert (b[:, :CUE_SIZE[0], :CUE_SIZE[1]] == patch).all()
                outside = np.ones(OBS_SHAPE[1:], dtype=bool)
                outside[:CUE_SIZE[0], :CUE_SIZE[1]] = False
                np.testing.assert_array_equal(a[:, outside], b[:, outside])
                a, _, _, _, info = plain.step(step % 5)
                b, _, _, _, _ = cued.step(step % 5)
    finally:
        plain.close()
        cued.close()
    with pytest.raises(ValueError, match="cue must be 0 .none., 1 .every frame. or 2"):
        TwoColorsEnv(cue=3)
    task = get_task("vizdoom_two_colors")
    assert parse_settings(task, ("cue=1", "step_cap=30")) == {"cue": 1, "step_cap": 30}
    with pytest.raises(SystemExit, match="no environment setting 'colour'.*step_cap, cue"):
        parse_settings(task, ("colour=1",))
    with pytest.raises(SystemExit, match="NAME=INT"):
        parse_settings(task, ("cue=yes",))
    # collect --settings cue=1
    main(Args(task="vizdoom_two_colors", out=tmp_path / "cued", episodes=1, settings=("cue=1",)))
    data = load_dataset(tmp_path / "cued")
    assert data.meta["settings"]["settings"] == [{"step_cap": 150, "cue": 1}]
    assert len(set(map(tuple, data.observations[:, :, 0, 0].tolist()))) == 1  # one colour, in every frame


def test_colour_probe_reports_acting_and_memory(tmp_path, capsys):
    from rate_core.checkpoint import save_checkpoint
    from tests.tiny import tiny_model
    from training.colour_probe import Args, held_out_accuracy, main

    model = tiny_model("rate", obs_kind="image", obs_shape=OBS_SHAPE, act_dim=len(ACTIONS), context_length=50)
    model.task = "vizdoom_two_colors"
    save_checkpoint(model, tmp_path / "ck")
    main(Args(checkpoint=str(tmp_path / "ck"), episodes=1, forced_episodes=2, memory_episodes=6, cue=1))
    out = capsys.readouterr().out
    assert "steps    0-45:" in out and "memory after segment 1" in out and "actions padded" in out
    from training.colour_probe import teacher_forced_probe

    # a model without action inputs gives the same answers with the actions padded
    blind = tiny_model("rate", obs_kind="image", obs_shape=OBS_SHAPE, act_dim=len(ACTIONS), context_length=50,
                       action_inputs=False)
    found = teacher_forced_probe(blind, episodes=1, seed=3, steps=60)
    assert found["actions"] == found["no_actions"] and found["actions"]["decisive"] > 0
    # the decoder finds a colour that is in the features and not one that is not
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    assert held_out_accuracy(np.c_[labels + 0.1 * rng.normal(size=200), rng.normal(size=(200, 5))], labels) > 0.95
    assert held_out_accuracy(rng.normal(size=(200, 5)), labels) < 0.7
    model.task = "tmaze"
    save_checkpoint(model, tmp_path / "other")
    with pytest.raises(SystemExit, match="checkpoint is for task 'tmaze', expected 'vizdoom_two_colors'"):
        main(Args(checkpoint=str(tmp_path / "other"), episodes=1, memory_episodes=0))


def test_vector_env_matches_single_envs_and_ignores_finished_ones():
    vector = make_vector_env(3, step_cap=4, render_mode="rgb_array")
    obs, info = vector.reset(seed=[5, 6, 7])
    assert obs.shape == (3, *OBS_SHAPE) and info["is_red"].shape == (3,) and info["health"].tolist() == [92] * 3
    single = TwoColorsEnv(step_cap=4)
    for i, seed in enumerate([5, 6, 7]):
        single_obs, single_info = single.reset(seed=seed)
        assert np.array_equal(obs[i], single_obs) and info["is_red"][i] == single_info["is_red"]
    single.close()
    frames = vector.render()
    assert len(frames) == 3 and all(f.shape == SCREEN_SHAPE and f.dtype == np.uint8 for f in frames)
    for step in range(4):
        obs, reward, terminated, truncated, info = vector.step([2, 3, 4])
    assert truncated.all() and not terminated.any()
    last = obs.copy()
    obs, reward, terminated, truncated, info = vector.step([2, 2, 2])  # finished envs: harmless
    assert np.array_equal(obs, last) and not reward.any() and not (terminated | truncated).any()
    vector.close()


def _engine_pids(instance_id: str) -> list[int]:
    """Live ViZDoom processes with this instance id on their command line."""
    tag = b"+viz_instance_id\0" + instance_id.encode() + b"\0"
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and tag in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # a process that ended meanwhile
            pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the processes through /proc")
def test_close_and_garbage_collection_end_the_game():
    env = TwoColorsEnv()
    instance = env.game.get_instance_id()
    assert len(_engine_pids(instance)) == 1
    env.close()
    assert _engine_pids(instance) == []
    env = TwoColorsEnv()
    instance = env.game.get_instance_id()
    del env
    gc.collect()
    assert _engine_pids(instance) == []


_UNSEEN_ENV = None  # a pool worker's env that no on_stop closes (as one the SIGTERM finds still being made)


def _make_an_env_no_tool_holds() -> str:
    global _UNSEEN_ENV
    _UNSEEN_ENV = TwoColorsEnv(step_cap=10)
    return _UNSEEN_ENV.game.get_instance_id()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the processes through /proc")
def test_a_stopped_tool_worker_leaves_no_engine_running():
    # A worker stopped while it made an env (collect's, frame_probe's) had no hold on it yet: its engine ran on,
    # and it kept the pipe by which the pool sees the worker end, so that the tool hung at exit (1 in 3 tries).
    from training.cli import stop_pool, worker_pool

    pool = worker_pool(1)
    instance = pool.submit(_make_an_env_no_tool_holds).result()
    assert len(_engine_pids(instance)) == 1
    stop_pool(pool)
    assert _engine_pids(instance) == []


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the process through /proc")
def test_crashed_game_raises_a_clear_error():
    env = TwoColorsEnv()
    env.reset(seed=0)
    (pid,) = _engine_pids(env.game.get_instance_id())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(GameCrashedError, match=r"stopped during step\(\)"):
        env.step(2)
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(seed=0)
    env.close()  # again: harmless


def test_registry_entry_plays_in_the_rollout_engine():
    """The task's vector env under run_episodes: per-env info arrays, frames, early finishers."""
    import torch

    from rate_core.model import MemoryTransformer
    from rate_core.rollout import run_episodes
    from rate_core.tasks import get_task

    task = get_task("vizdoom_two_colors")
    torch.manual_seed(0)
    model = MemoryTransformer(task.model_config("rate"), task=task.name)
    env = task.make_vector_env(2, step_cap=12, render_mode="rgb_array")
    batch = run_episodes(model, env, seeds=[0, 3], target_return=task.evaluation.target_return, sample=True,
                         trace=True, frames=True)
    env.close()
    assert batch.lengths.tolist() == [12, 12]
    bonuses = batch.returns - 0.02 * 12  # 1.0 per right item
    assert np.allclose(bonuses, np.round(bonuses)) and (np.round(bonuses) >= 0).all()
    trace = batch.traces[0]
    assert trace.frames.shape == (13, 180, 320, 3) and trace.info["health"].shape == (12,)
    assert task.explain(trace.reset_info) in ("pillar: red", "pillar: green")


def test_frame_probe_clones_and_plays_a_memoryless_policy():
    from training.frame_probe import Args, _behaviour, main

    result = main(Args(behaviour="neutral", cue=1, episodes=2, test_episodes=1, epochs=1, play_episodes=1, play_cap=20,
                       workers=1, threads=1))
    assert result["training_frames"] == 300 and result["behaviour"] == "neutral" and result["cue"] == 1
    assert 0 < result["differing_steps"] <= 150  # the two colours' experts disagree at some of the test steps
    assert 0.0 <= result["prefers"] <= 1.0 and np.isfinite(result["loss"])
    parts = [result["prefers_while_pillar"], result["prefers_after_pillar"]]
    if np.isfinite(parts).all():  # the two parts of the test steps; their weighted mean is the whole
        assert min(parts) - 1e-9 <= result["prefers"] <= max(parts) + 1e-9
    assert 0.02 * 20 - 1e-6 <= result["play_return"]  # alive for the 20 steps: the living reward at least
    neutral, expert = _behaviour("neutral", 25), _behaviour("expert", 25)
    assert (neutral.detour, neutral.detour_min, neutral.detour_max) == (1 / 25, 25, 25) and expert.detour == 0.0
    with pytest.raises(SystemExit, match="--test-episodes must be at least 1"):
        main(Args(test_episodes=0))
    with pytest.raises(SystemExit, match="--cue is 0"):
        main(Args(cue=4))
    with pytest.raises(SystemExit, match="--frames must be at least 1"):
        main(Args(frames=0))
    stacked = main(Args(behaviour="neutral", cue=1, episodes=2, test_episodes=1, epochs=1, play_episodes=1,
                        play_cap=5, workers=1, threads=1, frames=2))
    assert stacked["frames"] == 2 and stacked["training_frames"] == 300 and np.isfinite(stacked["loss"])
    kept = main(Args(behaviour="neutral", cue=0, episodes=2, test_episodes=1, epochs=1, play_episodes=1, play_cap=5,
                     workers=1, threads=1, first_frame=True, head_hidden=16, aux_weight=1.0))
    assert kept["first_frame"] and 0.0 <= kept["colour_accuracy"] <= 1.0 and np.isfinite(kept["loss"])
    with pytest.raises(SystemExit, match="add --first-frame"):
        main(Args(aux_weight=1.0))


def test_frame_history_index_repeats_the_first_frame_before_an_episode_starts():
    from training.frame_probe import FramePolicy, history_index

    steps = np.array([0, 1, 2, 0, 1])  # two episodes laid end to end
    assert history_index(steps, 1).tolist() == [[0], [1], [2], [3], [4]]
    assert history_index(steps, 3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4]]
    assert history_index(steps, 2, first_frame=True).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3],
                                                                   [3, 3, 4]]
    policy = FramePolicy(frames=3)
    stacks = np.random.default_rng(0).integers(0, 256, (4, 3, *OBS_SHAPE), dtype=np.uint8)
    assert policy(torch.from_numpy(stacks)).shape == (4, len(ACTIONS))


def test_collector_lets_a_checkpoint_act_while_the_teacher_labels(tmp_path):
    """collect --teacher --policy (a DAgger round): the checkpoint's sampled actions, the teacher's labels."""
    from rate_core.checkpoint import save_checkpoint
    from rate_core.model import MemoryTransformer
    from rate_core.tasks import get_task
    from tests.test_rollout import recomputed_logits
    from tests.tiny import K, N, tiny_config
    from training.collect import Args, collect, main
    from training.dataset import load_dataset

    task = get_task("vizdoom_two_colors")
    torch.manual_seed(0)
    model = MemoryTransformer(tiny_config("rate", obs_kind="image", obs_shape=OBS_SHAPE, act_dim=len(ACTIONS)),
                              task=task.name).eval()
    save_checkpoint(model, tmp_path / "policy")
    steps = 2 * K * N + 3  # more than two samples' worth of segments
    data = load_dataset(collect(task, tmp_path / "dagger", 1, seed=5, teacher=True, overrides={"step_cap": steps},
                                policy=tmp_path / "policy"))
    assert data.meta["settings"]["policy"] == str(tmp_path / "policy") and len(data.actions) == steps
    # the episode counts are the acting policy's, not the expert's
    assert data.meta["settings"]["policy_episodes_run"] == 1 and "expert_success_rate" not in data.meta["settings"]
    # every action is the one the agent's random stream draws from the model's softmax, the model
    # fed the return-to-go from the task's target return minus the rewards so far
    rewards = np.asarray(data.rewards, dtype=np.float64)
    rtg = torch.tensor(task.evaluation.target_return - np.concatenate([[0.0], np.cumsum(rewards)[:-1]]))[None].float()
    obs = torch.from_numpy(np.array(data.observations))[None]
    actions = torch.from_numpy(np.array(data.actions))[None]
    rng = np.random.default_rng([1, 5])
    with torch.no_grad():
        for t in range(steps):
            probs = recomputed_logits(model, rtg, obs, actions, t)[0].softmax(-1).numpy()
            assert data.actions[t] == min(int((np.cumsum(probs) < rng.random()).sum()), len(probs) - 1), t
    # the labels are the teacher's expert, not the untrained model
    assert (data.labels != data.actions).mean() > 0.3
    with pytest.raises(SystemExit, match="add --teacher"):
        main(Args(task=task.name, out=tmp_path / "x", episodes=1, policy=tmp_path / "policy"))
    with pytest.raises(SystemExit, match="--policy: .*does not exist"):
        main(Args(task=task.name, out=tmp_path / "x", episodes=1, teacher=True, policy=tmp_path / "nothing"))

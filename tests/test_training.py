"""Collector, dataset format, trainer (resume) and evaluator on tiny T-Maze settings."""

import functools
import json
import multiprocessing
import os
import shutil
import struct
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rate_core.checkpoint import CheckpointError, load_checkpoint
from rate_core.model import ACTION_PAD, MemoryTransformer
from rate_core.paper import paper_config
from rate_core.tasks import get_task
from tests.tiny import weights_differ
from training.cli import stop_pool, worker_pool
from training.collect import collect, run_episode
from training.curves import read_log
from training.dataset import DatasetError, load_dataset, write_dataset
from training.evaluate import balanced_seeds, evaluate, values_and_overrides
from training.step import SegmentLosses, segment_slices, train_step
from training.train import (TrainConfig, WeightAverage, bf16_warning, cpu_has_bf16, drop_actions, epoch_windows,
                            held_out_loss, keyframe_weights, lr_multiplier, make_batch, model_overrides, shift_frames,
                            shift_offsets, train, windows)

TASK = get_task("tmaze")


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    return collect(TASK, tmp_path_factory.mktemp("data") / "tmaze", episodes_per_setting=4, seed=0)


def test_expert_episode_is_the_oracle():
    episode = run_episode(TASK, {"episode_length": 20}, seed=1)
    assert len(episode["actions"]) == 19 and episode["return"] == 1.0
    assert set(episode["actions"][:-1]) == {0} and episode["actions"][-1] in (1, 3)
    assert episode["observations"].shape == (19, 4)


def test_dataset_round_trip_and_padding(dataset_path):
    data = load_dataset(dataset_path, task="tmaze")
    assert data.num_episodes == 12 and list(np.unique(data.episode_lengths())) == [49, 99, 149]
    assert data.meta["settings"]["mean_return"] == 1.0
    rtg, obs, actions = data.window(0, 0, 150)  # a 49-step episode padded to 150
    assert rtg.shape == (150,) and obs.shape == (150, 4) and actions.shape == (150,)
    assert (rtg[:49] == 1.0).all() and (rtg[49:] == 0).all()
    assert (actions[49:] == ACTION_PAD).all() and (actions[:49] != ACTION_PAD).all()
    assert (obs[49:] == obs[48]).all()
    assert obs[0, 1] in (-1.0, 1.0) and (obs[1:49, 1] == 0).all()  # the cue, then nothing


def test_dataset_errors_name_the_problem(dataset_path, tmp_path):
    with pytest.raises(DatasetError, match="no dataset folder"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="dataset is for task 'tmaze', expected 'minigrid_memory'"):
        load_dataset(dataset_path, task="minigrid_memory")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in dataset_path.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    data = (broken / "observations.npy").read_bytes()
    (broken / "observations.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"observations\.npy: cannot be read.*truncated or corrupt"):
        load_dataset(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(DatasetError, match=r"meta\.json: missing, so the dataset is incomplete"):
        load_dataset(broken)
    with pytest.raises(ValueError, match="no episodes to write"):
        write_dataset(tmp_path / "empty", "tmaze", [], {})
    assert not any(tmp_path.glob("*empty*"))  # nor a staging folder


def test_dataset_writer_streams_episodes_to_disk_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    from training.dataset import DatasetWriter

    rng = np.random.default_rng(0)
    episodes = [{"observations": rng.integers(0, 255, size=(n, 3, 5, 5), dtype=np.uint8),
                 "actions": rng.integers(0, 4, n), "rewards": rng.normal(size=n), "labels": rng.integers(0, 4, n)}
                for n in (7, 12, 3)]
    # copied in blocks of 2 rows (frames of 75 bytes), so a chunk is never held twice in memory
    monkeypatch.setattr(DatasetWriter, "BLOCK_BYTES", 150)
    with DatasetWriter(tmp_path / "d", "minigrid_memory") as writer:
        for episode in episodes:
            writer.add_episode(episode)
            assert not (tmp_path / "d").exists()  # nothing looks like a dataset before close()
        writer.close({"seed": 3})
    data = load_dataset(tmp_path / "d", task="minigrid_memory")
    assert np.array_equal(data.observations, np.concatenate([e["observations"] for e in episodes]))
    assert np.array_equal(data.episode_starts, [0, 7, 19, 22]) and data.meta["settings"] == {"seed": 3}
    assert data.rewards.dtype == np.float32
    assert np.allclose(data.rewards, np.concatenate([e["rewards"] for e in episodes]))
    assert np.array_equal(data.labels, np.concatenate([e["labels"] for e in episodes]))
    assert [f.name for f in tmp_path.iterdir()] == ["d"]  # the staging folder became it

    # an error inside the block (here: an episode without the labels the first had) removes the staging folder
    with pytest.raises(ValueError, match="all episodes or none must have labels"):
        with DatasetWriter(tmp_path / "e", "minigrid_memory") as writer:
            writer.add_episode(episodes[0])
            writer.add_episode({k: v for k, v in episodes[1].items() if k != "labels"})
    with pytest.raises(ValueError, match="rows of shape"):
        with DatasetWriter(tmp_path / "e", "minigrid_memory") as writer:
            writer.add_episode(episodes[0])
            writer.add_episode({**episodes[1], "observations": np.zeros((12, 3, 6, 6), np.uint8)})
    with pytest.raises(ValueError, match="no episodes to write"):
        DatasetWriter(tmp_path / "e", "minigrid_memory").close({})
    assert [f.name for f in tmp_path.iterdir()] == ["d"]


def test_dataset_writer_headers_hold_large_shapes(tmp_path):
    from training.dataset import _npy_header

    header = _npy_header(np.dtype(np.uint8), (10**12, 3, 64, 64), 256)
    assert len(header) == 256
    (tmp_path / "a.npy").write_bytes(_npy_header(np.dtype("<f4"), (2, 3), 256) + np.arange(6, dtype="<f4").tobytes())
    assert np.array_equal(np.load(tmp_path / "a.npy", mmap_mode="r"), np.arange(6).reshape(2, 3))


def test_labels_are_the_training_targets_where_the_dataset_has_them(tmp_path):

    rng = np.random.default_rng(0)
    episodes = [{"observations": rng.normal(size=(n, 4)).astype(np.float32), "actions": rng.integers(0, 4, n),
                 "rewards": np.zeros(n, np.float32), "labels": rng.integers(0, 4, n)} for n in (7, 12)]
    data = load_dataset(write_dataset(tmp_path / "d", "tmaze", episodes, {}))
    assert np.array_equal(data.labels, np.concatenate([e["labels"] for e in episodes]))
    rtg, obs, actions = data.window(0, 0, 10)  # the model's inputs are the actions taken
    _, _, _, targets = data.training_window(0, 0, 10)
    assert np.array_equal(actions[:7], episodes[0]["actions"]) and np.array_equal(targets[:7], episodes[0]["labels"])
    assert (targets[7:] == ACTION_PAD).all() and (actions[7:] == ACTION_PAD).all()
    with pytest.raises(ValueError, match="all or none"):
        unlabelled = {k: v for k, v in episodes[1].items() if k != "labels"}
        write_dataset(tmp_path / "e", "tmaze", [episodes[0], unlabelled], {})

    # the step's loss is the cross-entropy against the labels, the actions being the input
    model = MemoryTransformer(replace(TASK.model_config("rate"), dropout=0.0, dropatt=0.0))
    rtg, obs, actions, targets = make_batch(data, np.array([[0, 0], [1, 0]]), 150, "cpu")
    times = segment_slices(model, 150)
    with torch.no_grad():
        on_labels, _, _ = SegmentLosses(model)(rtg, obs, actions, times, [19.0, 0.0, 0.0], targets=targets)
        on_actions, _, _ = SegmentLosses(model)(rtg, obs, actions, times, [19.0, 0.0, 0.0])
    assert not torch.isclose(on_labels, on_actions)
    losses = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), rtg, obs, actions, targets=targets)
    assert losses == pytest.approx([float(on_labels)], rel=1e-5)


@pytest.mark.parametrize("task_name", ["vizdoom_two_colors", "memory_maze"])
def test_teacher_probabilities_outside_0_to_1_are_refused(task_name):
    from training.collect import parse_teacher_options

    task = get_task(task_name)
    for item in ("noise=2", "noise=-0.1") + (("detour=5",) if task_name == "vizdoom_two_colors" else ()):
        with pytest.raises(SystemExit, match=r"is a probability from 0 to 1, got"):
            parse_teacher_options(task, (item,))
    assert parse_teacher_options(task, ("noise=0.3",)) == {"noise": 0.3}
    if task_name == "vizdoom_two_colors":  # a number of steps: whole, not cut to one
        with pytest.raises(SystemExit, match="--teacher-options detour_min is a whole number, got 2.5"):
            parse_teacher_options(task, ("detour_min=2.5",))
        assert parse_teacher_options(task, ("detour_min=3",)) == {"detour_min": 3}


def test_collect_teacher_option_on_a_task_without_one_says_so(tmp_path):
    from training.collect import Args, main

    with pytest.raises(SystemExit, match="has no teacher"):
        main(Args(task="tmaze", out=tmp_path / "d", episodes=1, teacher=True))


def test_learning_rate_schedule():
    assert lr_multiplier(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(100, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(55, 10, 101, "linear") == pytest.approx(0.55)  # half way from step 10 to the last, 100
    for decay in ("linear", "cosine"):  # the last step's rate is the documented 10% of the peak
        assert lr_multiplier(99, 10, 100, decay) == pytest.approx(0.1)
        assert lr_multiplier(98, 10, 100, decay) > 0.1


def _tiny_config(dataset_path, out=None, **overrides):
    fields = dict(task="tmaze", model="rate", data=dataset_path, out=out, epochs=3, batch_size=4, warmup_steps=2,
                  eval_every=0, seed=3, curves=False)  # the curves test turns them on
    fields.update(overrides)
    return TrainConfig(**fields)


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_run_ends_with_the_same_weights(dataset_path, tmp_path):
    straight = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "straight")))

    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_tiny_config(dataset_path, tmp_path / "resumed"), on_epoch_end=kill_after_first_epoch)
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "resumed", resume=True)))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "epoch_seconds" in r] == [1, 2, 3]


def test_resume_finds_the_last_epoch_a_kill_left_half_swapped_in(dataset_path, tmp_path):
    """A kill between the renames that put a new `last` in place leaves it beside the run's folder
    (see test_checkpoint); --resume finishes the swap instead of starting over."""
    straight = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "straight")))

    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise Interrupted

    run = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(_tiny_config(dataset_path, run), on_epoch_end=kill_after_first_epoch)
    shutil.copytree(run / "last", run / ".last.retired-999999999")  # no process has this id
    (run / "last").rename(run / ".last.ready-999999999")
    resumed = load_checkpoint(train(_tiny_config(dataset_path, run, resume=True)))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "epoch_seconds" in r] == [1, 2, 3]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_weight_average_is_the_finished_model_and_survives_a_resume(dataset_path, tmp_path):
    plain = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "plain")))
    straight = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "straight", ema=0.9)))
    assert straight.training_info["ema"] == 0.9
    # `last` holds the trained weights, which are the plain run's; the finished model is their average
    trained = load_checkpoint(tmp_path / "straight" / "last")
    for (name, a), b in zip(plain.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # averaging does not touch training
    assert weights_differ(straight, trained)

    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_tiny_config(dataset_path, tmp_path / "resumed", ema=0.9), on_epoch_end=kill_after_first_epoch)
    with pytest.raises(SystemExit, match="ema"):
        train(_tiny_config(dataset_path, tmp_path / "resumed", resume=True))
    with pytest.raises(SystemExit, match="ema"):  # and a run without an average is not resumed with one
        train(_tiny_config(dataset_path, tmp_path / "plain", ema=0.9, resume=True))
    resumed = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "resumed", ema=0.9, resume=True)))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="--ema must be 0"):
        train(_tiny_config(dataset_path, tmp_path / "bad", ema=1.0))


def test_weight_average_follows_its_definition():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()  # n = 1: d = min(0.5, 2 / 11)
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(average.average["weight"], expected)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update()  # n = 2: d = min(0.5, 3 / 12)
    expected = expected + (1 - 3 / 12) * (start + 2.0 - expected)
    assert torch.allclose(average.average["weight"], expected)
    with average.applied():
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, start + 2.0)


def test_random_offsets_cover_every_step_and_differ_between_epochs(dataset_path):
    dataset = load_dataset(dataset_path)
    length = 7
    fixed = epoch_windows(dataset, length, seed=0, epoch=0, random_offsets=False)
    assert all(start % length == 0 for _, start in fixed)
    drawn = [epoch_windows(dataset, length, seed=0, epoch=e, random_offsets=True) for e in range(3)]
    assert not np.array_equal(drawn[0], drawn[1]) or not np.array_equal(drawn[1], drawn[2])
    assert np.array_equal(drawn[1], epoch_windows(dataset, length, seed=0, epoch=1, random_offsets=True))
    for samples in drawn:
        for episode, steps in enumerate(dataset.episode_lengths()):
            covered = np.zeros(steps, dtype=bool)
            for _, start in samples[samples[:, 0] == episode]:
                assert 0 <= start < steps
                covered[start:start + length] = True
            assert covered.all(), episode


def test_a_resumed_run_with_random_offsets_matches_a_straight_one(dataset_path, tmp_path):
    straight = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "straight", random_offsets=True)))
    fixed = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "fixed")))

    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_tiny_config(dataset_path, tmp_path / "resumed", random_offsets=True),
              on_epoch_end=kill_after_first_epoch)
    with pytest.raises(SystemExit, match="random_offsets"):
        train(_tiny_config(dataset_path, tmp_path / "resumed", resume=True))
    resumed = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "resumed", resume=True, random_offsets=True)))
    assert resumed.training_info["random_offsets"] is True
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert weights_differ(straight, fixed)


def test_held_out_loss_is_logged_every_epoch_and_leaves_training_unchanged(dataset_path, tmp_path):
    held_out = collect(TASK, tmp_path / "held_out", episodes_per_setting=1, seed=100)
    plain = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "plain")))
    checked = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "checked", val_data=held_out,
                                                 curves=True)))
    for (name, a), b in zip(plain.state_dict().items(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # evaluation mode, no gradients, no draws from the random stream
    # the curves (train's default, off in these tests for speed) leave training alone too and show the held-out loss
    assert not (tmp_path / "plain" / "curves.png").exists()
    assert Image.open(tmp_path / "checked" / "curves.png").format == "PNG"
    assert read_log(tmp_path / "checked").val_losses.shape == (3,)
    log = [json.loads(line) for line in (tmp_path / "checked" / "log.jsonl").read_text().splitlines()]
    values = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(values) == 3 and all(np.isfinite(values)) and all(v > 0 for v in values)
    data = load_dataset(held_out)
    length = checked.config.context_length * checked.config.sections
    assert values[-1] == pytest.approx(held_out_loss(checked, data, windows(data, length), length, "cpu"))
    # by hand: the mean over every step of every window, dropout off, padding not counted
    total, count = 0.0, 0
    with torch.no_grad():
        for e in range(data.num_episodes):
            for s in range(0, int(data.episode_lengths()[e]), length):
                rtg, obs, actions, targets = (torch.from_numpy(a)[None] for a in data.training_window(e, s, length))
                state = None
                for seg in segment_slices(checked, length):
                    logits, state = checked(rtg[:, seg], obs[:, seg], actions[:, seg], state)
                    keep = targets[:, seg] != ACTION_PAD
                    total += float(torch.nn.functional.cross_entropy(logits[keep], targets[:, seg][keep],
                                                                     reduction="sum"))
                    count += int(keep.sum())
    assert values[-1] == pytest.approx(total / count, rel=1e-5)


def test_held_out_data_of_another_task_is_refused(dataset_path, tmp_path):
    other = tmp_path / "other"
    write_dataset(other, "minigrid_memory", [{"observations": np.zeros((3, 3, 84, 84), np.uint8),
                                              "actions": np.zeros(3), "rewards": np.zeros(3)}], {})
    with pytest.raises(DatasetError, match="held-out.*minigrid_memory"):
        train(_tiny_config(dataset_path, tmp_path / "run", val_data=other))
    with pytest.raises(ValueError, match="--val-windows must be at least 1"):
        train(_tiny_config(dataset_path, tmp_path / "run", val_data=dataset_path, val_windows=0))


def test_resume_refuses_different_settings(dataset_path, tmp_path):
    train(_tiny_config(dataset_path, tmp_path / "run", epochs=1))
    with pytest.raises(SystemExit, match="batch_size"):
        train(_tiny_config(dataset_path, tmp_path / "run", epochs=1, batch_size=2, resume=True))
    for change in ({"dropout": 0.3}, {"learning_rate": 1e-2}, {"weight_decay": 0.5}, {"warmup_steps": 7},
                   {"decay": "linear"}, {"grad_clip": 0.0}, {"action_dropout": 0.5},
                   {"keyframe_weight": 2.0}):
        with pytest.raises(SystemExit, match=f"--resume with {next(iter(change))}="):
            train(_tiny_config(dataset_path, tmp_path / "run", epochs=1, resume=True, **change))



def test_resume_checks_the_data_and_the_state_but_not_the_order_of_model_set(dataset_path, tmp_path):
    from safetensors.torch import load_file, save_file

    from rate_core.checkpoint import CheckpointError

    data = tmp_path / "data"
    shutil.copytree(dataset_path, data)
    run = tmp_path / "run"
    train(_tiny_config(data, run, epochs=1, model_set=("n_layer=1", "d_model=32")))
    # the same fields in another order are the same model: resumed (after its one epoch, nothing is left to do)
    train(_tiny_config(data, run, epochs=1, model_set=("d_model=32", "n_layer=1"), resume=True))
    state_json, state_tensors = run / "last" / "train_state.json", run / "last" / "train_state.safetensors"
    saved_json, saved_tensors = state_json.read_text(), load_file(state_tensors)
    # a damaged state (the writes are atomic: only a hand-edited or corrupted file) says so, not "error: rng.cpu"
    save_file({k: v for k, v in saved_tensors.items() if k != "rng.cpu"}, state_tensors)
    with pytest.raises(CheckpointError, match=r"training state incomplete or damaged \(1 of its tensors \(rng.cpu\) "
                                              r"missing\).*delete"):
        train(_tiny_config(data, run, epochs=1, model_set=("n_layer=1", "d_model=32"), resume=True))
    save_file(saved_tensors, state_tensors)
    state_json.write_text(saved_json.replace('"epoch": 1', '"epoch": "1"'))
    with pytest.raises(CheckpointError, match="epoch and step must be whole numbers"):
        train(_tiny_config(data, run, epochs=1, model_set=("n_layer=1", "d_model=32"), resume=True))
    state_json.write_text(saved_json)
    # the same data elsewhere (moved, or named from another folder) is the same data: resumed
    shutil.copytree(data, tmp_path / "moved")
    train(_tiny_config(tmp_path / "moved", run, epochs=1, model_set=("n_layer=1", "d_model=32"), resume=True))
    with pytest.raises(SystemExit, match=r"--resume with --data .*other, but the run in .* was trained on"):
        other = collect(TASK, tmp_path / "other", episodes_per_setting=3, seed=700)
        train(_tiny_config(other, run, epochs=1, model_set=("n_layer=1", "d_model=32"), resume=True))
    # the data collected again at the same path (other episodes): refused, where it trained on it unsaid
    shutil.rmtree(data)
    collect(TASK, data, episodes_per_setting=3, seed=500)
    with pytest.raises(SystemExit, match=r"--resume: the dataset at .* is not the one the run in .* was trained on"):
        train(_tiny_config(data, run, epochs=1, model_set=("n_layer=1", "d_model=32"), resume=True))

def test_training_without_action_inputs_is_recorded_and_kept_on_resume(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "blind", epochs=1, action_inputs=False)))
    assert model.config.action_inputs is False and model.training_info["action_inputs"] is False
    with pytest.raises(SystemExit, match="action_inputs"):
        train(_tiny_config(dataset_path, tmp_path / "blind", epochs=1, resume=True))


def test_action_dropout_hides_actions_but_never_padding_and_draws_the_same_again():
    actions = torch.randint(0, 4, (64, 90))
    actions[:, 70:] = ACTION_PAD  # an episode's end
    hidden = drop_actions(actions, 0.3, seed=1, epoch=2, batch=5)
    assert torch.equal(hidden[:, 70:], actions[:, 70:])
    changed = hidden[:, :70] != actions[:, :70]
    assert (hidden[:, :70][changed] == ACTION_PAD).all()
    assert 0.25 < changed.float().mean() < 0.35
    assert torch.equal(drop_actions(actions, 0.3, seed=1, epoch=2, batch=5), hidden)  # a resumed run hides the same
    assert not torch.equal(drop_actions(actions, 0.3, seed=1, epoch=2, batch=6), hidden)
    assert torch.equal(drop_actions(actions, 0.0, seed=1, epoch=2, batch=5), actions)
    # a torchrun process's rows of the global batch hide what one process training on it would
    shard = drop_actions(actions[1::2], 0.3, seed=1, epoch=2, batch=5, samples=64, rows=slice(1, None, 2))
    assert torch.equal(shard, hidden[1::2])


def test_keyframes_are_the_steps_where_the_last_action_is_not_the_target(dataset_path, tmp_path):
    actions = torch.tensor([[1, 1, 2, 2, 0, ACTION_PAD, ACTION_PAD]])
    targets = torch.tensor([[1, 2, 2, 2, 1, ACTION_PAD, ACTION_PAD]])  # the labels (step 1 took a random action)
    assert keyframe_weights(actions, targets, 1.0) is None
    assert keyframe_weights(actions, targets, 3.0).tolist() == [[1, 3, 3, 1, 3, 1, 1]]  # padding: no target
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "run", epochs=1, keyframe_weight=3.0)))
    assert model.training_info["keyframe_weight"] == 3.0
    with pytest.raises(ValueError, match="--keyframe-weight must be positive"):
        train(_tiny_config(dataset_path, tmp_path / "bad", keyframe_weight=0.0))


def test_action_dropout_trains_and_is_recorded(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "run", epochs=1, action_dropout=0.5)))
    assert model.training_info["action_dropout"] == 0.5
    with pytest.raises(ValueError, match="--action-dropout must be a probability"):
        train(_tiny_config(dataset_path, tmp_path / "bad", action_dropout=1.0))
    with pytest.raises(ValueError, match="--no-action-inputs has none"):
        train(_tiny_config(dataset_path, tmp_path / "bad", action_dropout=0.2, action_inputs=False))


def test_resume_takes_the_same_init_checkpoint_however_its_path_is_written(dataset_path, tmp_path, monkeypatch):
    base = train(_tiny_config(dataset_path, tmp_path / "base", epochs=1))
    monkeypatch.chdir(tmp_path)

    def kill_after_first_epoch(epoch):
        raise Interrupted

    with pytest.raises(Interrupted):
        train(_tiny_config(dataset_path, tmp_path / "tuned", epochs=2, init=Path("base") / "model"),
              on_epoch_end=kill_after_first_epoch)
    train(_tiny_config(dataset_path, tmp_path / "tuned", epochs=2, init=base.resolve(), resume=True))
    assert load_checkpoint(tmp_path / "tuned" / "last").training_info["epochs_done"] == 2
    for init in (None, tmp_path / "tuned" / "model"):
        with pytest.raises(SystemExit, match="--resume with --init"):
            train(_tiny_config(dataset_path, tmp_path / "tuned", epochs=2, init=init, resume=True))


def test_init_starts_from_a_checkpoint_and_refuses_another_architecture(dataset_path, tmp_path):
    first = train(_tiny_config(dataset_path, tmp_path / "first", epochs=1))
    # at learning rate 0 (and no weight decay) fine-tuning leaves the weights as they were loaded
    tuned = train(_tiny_config(dataset_path, tmp_path / "tuned", epochs=1, init=first, learning_rate=0.0,
                               weight_decay=0.0, dropout=0.2))
    start, end = load_checkpoint(first), load_checkpoint(tuned)
    for (name, a), b in zip(start.state_dict().items(), end.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert end.training_info["init"] == str(first)
    fresh = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "fresh", epochs=1, learning_rate=0.0,
                                               weight_decay=0.0, seed=4)))
    assert weights_differ(fresh, end)
    with pytest.raises(CheckpointError, match="architecture differs.*n_layer"):
        train(_tiny_config(dataset_path, tmp_path / "wider", epochs=1, init=first, model_set=("n_layer=1",)))
    with pytest.raises(CheckpointError, match="expected 'dt'"):
        train(_tiny_config(dataset_path, tmp_path / "dt", model="dt", epochs=1, init=first))


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(dataset_path, tmp_path):
    train(_tiny_config(dataset_path, tmp_path / "run", epochs=1))
    with pytest.raises(SystemExit, match="already holds a run; continue it with --resume"):
        train(_tiny_config(dataset_path, tmp_path / "run", epochs=1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))])
def test_bf16_autocast_trains(dataset_path, tmp_path, device):
    before = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "fp32", epochs=1, device=device)))
    after = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "bf16", epochs=1, bf16=True, device=device)))
    log = [json.loads(line) for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and np.isfinite(losses).all()
    for (name, a), b in zip(after.state_dict().items(), before.state_dict().values(), strict=True):
        assert a.dtype == b.dtype, name  # the weights stay float32
    assert weights_differ(after, before)


def test_compiled_training_ends_with_the_weights_of_plain_training(dataset_path, tmp_path, monkeypatch):
    # --compile wraps the losses in torch.compile; dynamo's eager backend keeps this test quick (no code generation)
    # while running the same wrapper, whose module train_step once asked for a truth value and crashed.
    plain = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "plain", epochs=1)))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "compiled", epochs=1, compile=True)))
    for (name, a), b in zip(compiled.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_auxiliary_loss_trains_on_cuda_in_bf16(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "aux", epochs=1, bf16=True, aux_weight=1.0,
                                               device="cuda", val_data=dataset_path)))
    assert model.config.aux_classes == 2
    log = [json.loads(line) for line in (tmp_path / "aux" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in log if "loss" in r]).all()
    assert all(0.0 <= x <= 1.0 for r in log if "val_aux_accuracy" in r for x in r["val_aux_accuracy"])


def test_detached_training_runs_and_records_metadata(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "det", epochs=1, memory_grad="detached")))
    assert model.training_info["memory_grad"] == "detached" and model.task == "tmaze"


def test_time_limit_stops_the_run_and_writes_the_model(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "run", max_minutes=1e-9)))
    assert model.training_info["stopped"].startswith("max_minutes")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1] == {"epoch": 1, "step": 0, "stopped": "max_minutes"}
    assert not (tmp_path / "run" / "last").exists()  # no partial epoch saved as a whole one for --resume


def test_time_limit_counts_the_time_of_earlier_sittings_on_resume(dataset_path, tmp_path):
    def kill_after_first_epoch(epoch):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_tiny_config(dataset_path, tmp_path / "run"), on_epoch_end=kill_after_first_epoch)
    trained = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())["training_seconds"]
    assert trained > 0
    # a budget the first sitting already spent: the resumed run stops at once, before any update
    train(_tiny_config(dataset_path, tmp_path / "run", resume=True, max_minutes=trained / 60 / 2))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first_epoch_steps = log[-2]["step"]
    assert log[-1] == {"epoch": 2, "step": first_epoch_steps, "stopped": "max_minutes"}


def test_paper_architecture_option_trains_the_papers_config(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "paper", epochs=1, batch_size=8, arch="paper")))
    assert model.config == paper_config("tmaze", "rate")
    assert model.config.n_layer == 8 and model.config != TASK.model_config("rate")
    assert model.training_info["arch"] == "paper"
    with pytest.raises(ValueError, match="--arch must be one of"):
        train(_tiny_config(dataset_path, tmp_path / "bad", arch="big"))


def test_model_set_overrides_the_architecture_and_is_kept_on_resume(dataset_path, tmp_path):
    pairs = ("n_head=2", "d_head=8", "use_ffn=true", "d_inner=32", "dropatt=0.05")
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "set", epochs=1, model_set=pairs)))
    expected = replace(TASK.model_config("rate"), n_head=2, d_head=8, use_ffn=True, d_inner=32, dropatt=0.05)
    assert model.config == expected
    assert model.training_info["model_set"] == list(pairs)
    train(_tiny_config(dataset_path, tmp_path / "set", epochs=1, model_set=pairs, resume=True))
    with pytest.raises(SystemExit, match="model_set"):
        train(_tiny_config(dataset_path, tmp_path / "set", epochs=1, resume=True))


def test_model_overrides_parse_each_kind_and_name_bad_pairs():
    assert model_overrides(("conv_channels=8,16,16", "use-ffn=0", "dropout=0.3", "d_model=32", "sections=6")) == {
        "conv_channels": (8, 16, 16), "use_ffn": False, "dropout": 0.3, "d_model": 32, "sections": 6}
    for bad, message in (("n_head", "expected FIELD=VALUE"), ("mode=dt", "expected FIELD=VALUE"),
                         ("n_head=two", "n_head needs a whole number"), ("dropout=high", "a number"),
                         ("use_ffn=yes", "true or false"), ("conv_channels=8,16", "three channel counts")):
        with pytest.raises(ValueError, match=message):
            model_overrides((bad,))


def test_bf16_on_a_cpu_without_bfloat16_instructions_warns(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert cpu_has_bf16(cpuinfo) is False
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16(cpuinfo) is True
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_has_bf16(cpuinfo) is None and cpu_has_bf16(tmp_path / "absent") is None
    cpu, bf16 = torch.device("cpu"), TrainConfig(bf16=True)
    assert "leave out --bf16" in bf16_warning(bf16, cpu, False)
    assert bf16_warning(bf16, cpu, True) is None and bf16_warning(bf16, cpu, None) is None
    assert bf16_warning(TrainConfig(), cpu, False) is None
    assert bf16_warning(bf16, torch.device("cuda"), False) is None


def test_balanced_seeds_split_the_cue_sides():
    seeds = balanced_seeds(TASK, {"episode_length": 10}, 10, first=5)
    assert len(seeds) == 10 and min(seeds) >= 5
    _, info = TASK.make_vector_env(10, episode_length=10).reset(seed=seeds)
    assert sorted(info["cue"].tolist()) == [-1] * 5 + [1] * 5


def test_evaluate_reports_per_length(dataset_path, tmp_path):
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "ev", epochs=1)))
    results = evaluate(model, TASK, values=(10, 20), episodes=6, seed=0, show_progress=False)
    assert [r["episode_length"] for r in results] == [10, 20]
    for r in results:
        assert r["episodes"] == 6 and 0.0 <= r["success_rate"] <= 1.0 and 1 <= r["mean_length"] <= r["episode_length"]
        assert list(r["groups"]) == ["up", "down"] and [g["episodes"] for g in r["groups"].values()] == [3, 3]
        up, down = r["groups"].values()
        assert r["mean_return"] == pytest.approx((up["mean_return"] + down["mean_return"]) / 2)
        assert r["imbalance"] == pytest.approx(abs(up["mean_return"] - down["mean_return"]))


def test_evaluate_table_shows_success_and_groups_only_where_the_task_has_them(capsys):
    from training.evaluate import print_table

    row = {"episodes": 4, "success_rate": 0.0, "mean_return": 7.5, "return_sem": 0.5, "mean_length": 1000.0,
           "seconds": 3.0}
    print_table(get_task("memory_maze"), [{"step_cap": 1000, **row}])  # no success in its envs, no groups
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["step_cap", "episodes", "return", "length", "seconds"]
    assert line.split() == ["1000", "4", "7.500", "+-", "0.500", "1000.0", "3.0"]
    groups = {"red": {**row, "mean_return": 8.0}, "green": {**row, "mean_return": 7.0}}
    print_table(get_task("vizdoom_two_colors"), [{"step_cap": 2100, **row, "groups": groups, "imbalance": 1.0}])
    header, line = capsys.readouterr().out.splitlines()
    assert "success" not in header and header.endswith("per is_red")
    assert line.endswith("red: 8.00 +- 0.50  green: 7.00 +- 0.50  imbalance 1.00"), line
    groups = {"up": {**row, "success_rate": 1.0}, "down": {**row, "success_rate": 0.5}}
    print_table(TASK, [{"episode_length": 30, **row, "success_rate": 0.75, "groups": groups, "imbalance": 0.0}])
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["episode_length", "episodes", "success", "return", "length", "seconds", "per", "cue"]
    assert line.split()[:3] == ["30", "4", "0.75"] and "up: 1.00 / 7.50 +- 0.50  down: 0.50 / 7.50" in line


def test_evaluation_in_batches_gives_the_same_results(dataset_path, tmp_path):
    from dataclasses import replace

    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "chunks", epochs=1)))
    whole = evaluate(model, TASK, values=(12,), episodes=6, seed=0, show_progress=False)[0]
    chunked_task = replace(TASK, evaluation=replace(TASK.evaluation, max_envs=4))
    chunked = evaluate(model, chunked_task, values=(12,), episodes=6, seed=0, show_progress=False)[0]
    for key in ("success_rate", "mean_return", "mean_length", "groups"):
        assert whole[key] == chunked[key], key


def test_evaluation_runs_fewer_envs_at_once_where_memory_is_short(dataset_path, tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    import training.evaluate as evaluate_module

    hungry = replace(TASK, env_memory_gb=2.0)  # 0.8 * 6 GB holds 2 of them
    assert hungry.envs_that_fit(6, available_gb=6.0) == 2 and hungry.envs_that_fit(6, available_gb=0.5) == 1
    assert hungry.envs_that_fit(6, available_gb=100.0) == 6 and TASK.envs_that_fit(6, available_gb=0.1) == 6
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    workers = replace(TASK, env_memory_gb=0.5, worker_memory_gb=1.0)  # 1 env: 1.5 GB, 2: 3, 3: 3.5, 4: 4
    assert [workers.env_memory_need_gb(n) for n in (1, 2, 3, 4)] == [1.5, 3.0, 3.5, 4.0]
    assert workers.envs_that_fit(10, available_gb=4.4) == 3 and workers.envs_that_fit(10, available_gb=5.0) == 4
    made = []
    real_make = TASK.make_vector_env
    hungry = replace(hungry, make_vector_env=lambda n, **settings: made.append(n) or real_make(n, **settings))
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "short", epochs=1)))
    whole = evaluate(model, TASK, values=(12,), episodes=6, seed=0, show_progress=False)[0]
    monkeypatch.setattr(evaluate_module, "available_memory_gb", lambda: 6.0)
    capsys.readouterr()
    short = evaluate(model, hungry, values=(12,), episodes=6, seed=0, show_progress=False)[0]
    assert made == [2]  # its 2 envs play the 3 chunks of seeds
    assert short["returns"] == whole["returns"] and short["seeds"] == whole["seeds"]
    assert "6 T-Maze (passive) envs at once would hold about 12 GB and 6 GB is available: running 2 at a time" in \
        capsys.readouterr().err


def children_left(others: set, seconds: float = 5.0) -> set:
    """This process's child processes other than `others`, once they have had `seconds` to be seen gone:
    the pool's manager thread reaps its workers too, and a process it reaped before it recorded the exit
    code looks alive to a join in another thread for a moment."""
    deadline = time.time() + seconds
    while (left := set(multiprocessing.active_children()) - others) and time.time() < deadline:
        time.sleep(0.05)
    return left


def test_parallel_collection_writes_the_same_dataset(tmp_path, capsys):
    one = load_dataset(collect(TASK, tmp_path / "one", episodes_per_setting=2, seed=5), task="tmaze")
    assert "the expert succeeded in 6 of 6 episodes" in capsys.readouterr().out  # a success task says how often
    others = set(multiprocessing.active_children())  # e.g. envs an earlier test keeps
    two = load_dataset(collect(TASK, tmp_path / "two", episodes_per_setting=2, seed=5, workers=2), task="tmaze")
    for name in ("observations", "actions", "rewards"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert not children_left(others)  # the pool's workers ended, episodes run ahead included


def test_the_collectors_pool_ends_without_waiting_for_the_episodes_in_hand(tmp_path):
    others = set(multiprocessing.active_children())
    closed = tmp_path / "closed"
    pool = worker_pool(1, on_stop=functools.partial(Path.touch, closed))  # as the collector closes a worker's env
    pool.submit(Path.touch, tmp_path / "started").result()  # the worker is up
    in_hand = pool.submit(time.sleep, 120)  # as an episode run ahead, or one a Ctrl-C stopped collection in
    while not in_hand.running():
        time.sleep(0.05)
    start = time.perf_counter()
    stop_pool(pool)
    assert time.perf_counter() - start < 60 and not children_left(others)
    assert closed.exists()  # a ViZDoom game left open would keep its engine process running


def test_stop_pool_frees_the_pools_thread_from_half_a_result():
    # as a worker stopped while it wrote a result: a message's length and part of its body in the results pipe
    pool = worker_pool(1)
    pool.submit(int).result()  # the worker is up
    manager = pool._executor_manager_thread
    os.write(pool._result_queue._writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)
    time.sleep(0.5)  # the pool's thread now waits for the rest of it
    stop_pool(pool)
    manager.join(timeout=20)
    assert not manager.is_alive()  # else the interpreter's exit waits for it for ever


@pytest.mark.parametrize("task_name, settings, teacher", [
    ("tmaze", {"episode_length": 20}, False), ("minigrid_memory", {"size": 11}, False),
    ("vizdoom_two_colors", {"step_cap": 60}, True), ("memory_maze", {"step_cap": 30}, True)])
def test_episodes_played_one_after_another_in_one_env_are_those_of_fresh_envs(task_name, settings, teacher):
    # the collector keeps a process's env for its next episode: the reset's seed must fix everything
    task = get_task(task_name)
    env = task.make_env(**settings)
    try:
        kept = [run_episode(task, settings, seed, teacher, env=env) for seed in (3, 4, 3)]
    finally:
        env.close()
    fresh = {seed: run_episode(task, settings, seed, teacher) for seed in (3, 4)}
    for seed, episode in zip((3, 4, 3), kept, strict=True):
        for name in ("observations", "actions", "rewards", *(("labels",) if teacher else ())):
            assert np.array_equal(episode[name], fresh[seed][name]), (seed, name)
    assert not np.array_equal(kept[0]["observations"][:5], kept[1]["observations"][:5])  # two episodes, not one


def test_evaluate_cli_target_return_top_decile_of_the_dataset(dataset_path, tmp_path):
    from training.evaluate import Args, main

    checkpoint = train(_tiny_config(dataset_path, tmp_path / "decile", epochs=1))
    out = tmp_path / "eval.json"
    main(Args(checkpoint=str(checkpoint), values=(10,), episodes=2, target_return="top-decile", data=dataset_path,
              json=out))
    returns = load_dataset(dataset_path).episode_returns()
    assert len(returns) == load_dataset(dataset_path).num_episodes > 1
    written = json.loads(out.read_text())
    assert written["protocol"]["target_return"] == pytest.approx(np.percentile(returns, 90), abs=1e-3)
    with pytest.raises(SystemExit, match="top-decile reads the dataset"):
        main(Args(checkpoint=str(checkpoint), values=(10,), episodes=2, target_return="top-decile",
                  data=tmp_path / "no_data", json=out))


def test_evaluate_cli_actions_option_overrides_the_protocols_choice(dataset_path, tmp_path):
    from training.evaluate import Args, main, protocol_changed

    checkpoint = train(_tiny_config(dataset_path, tmp_path / "actions", epochs=1))
    model = load_checkpoint(checkpoint)
    task = get_task("tmaze")
    assert protocol_changed(Args(checkpoint=str(checkpoint), actions="argmax"), task) == []  # the protocol's own
    assert protocol_changed(Args(checkpoint=str(checkpoint), actions="sampled"), task) == ["--actions"]
    for choice, sample in (("protocol", False), ("argmax", False), ("sampled", True)):  # T-Maze's protocol: argmax
        out = tmp_path / f"{choice}.json"
        main(Args(checkpoint=str(checkpoint), values=(30,), episodes=6, actions=choice, json=out))
        written = json.loads(out.read_text())
        assert written["protocol"]["sample_actions"] is sample
        expected = evaluate(model, TASK, [30], 6, seed=0, sample=sample)[0]["returns"]
        assert written["results"][0]["returns"] == expected


def test_evaluate_cli_refuses_options_that_would_change_nothing(dataset_path, tmp_path):
    from training.evaluate import Args, main

    blind = train(_tiny_config(dataset_path, tmp_path / "blind", epochs=1, action_inputs=False))
    with pytest.raises(SystemExit, match="takes no action inputs .* nothing to hide"):
        main(Args(checkpoint=str(blind), values=(30,), episodes=2, hide_actions=0.5, json=tmp_path / "x.json"))
    with pytest.raises(SystemExit, match="--data is read for --target-return top-decile only"):
        main(Args(checkpoint=str(blind), values=(30,), episodes=2, data=dataset_path, json=tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_evaluate_cli_temperature_is_recorded_and_checked(dataset_path, tmp_path):
    from training.evaluate import Args, main

    checkpoint = train(_tiny_config(dataset_path, tmp_path / "tempered", epochs=1))
    model = load_checkpoint(checkpoint)
    out = tmp_path / "hot.json"
    main(Args(checkpoint=str(checkpoint), values=(30,), episodes=6, actions="sampled", temperature=3.0, json=out))
    written = json.loads(out.read_text())
    assert written["protocol"]["temperature"] == 3.0 and written["protocol"]["sample_actions"] is True
    expected = evaluate(model, TASK, [30], 6, seed=0, sample=True, temperature=3.0)[0]["returns"]
    assert written["results"][0]["returns"] == expected
    with pytest.raises(SystemExit, match="add --actions sampled"):  # T-Maze's protocol takes the argmax
        main(Args(checkpoint=str(checkpoint), values=(30,), episodes=2, temperature=0.5, json=out))
    with pytest.raises(SystemExit, match="--temperature must be a finite number above 0"):
        main(Args(checkpoint=str(checkpoint), values=(30,), episodes=2, actions="sampled", temperature=0.0, json=out))


def test_evaluate_cli_max_envs_batches_the_episodes_without_changing_them(dataset_path, tmp_path, capsys):
    from training.evaluate import Args, main

    checkpoint = str(train(_tiny_config(dataset_path, tmp_path / "batched", epochs=1)))
    runs = {}
    for max_envs in (None, 2):
        out = tmp_path / f"{max_envs}.json"
        main(Args(checkpoint=checkpoint, values=(12,), episodes=6, actions="sampled", max_envs=max_envs, json=out))
        runs[max_envs] = json.loads(out.read_text())
    assert runs[2]["protocol"]["max_envs"] == 2 and runs[None]["protocol"]["max_envs"] is None
    assert runs[2]["results"][0]["returns"] == runs[None]["results"][0]["returns"]
    assert runs[2]["results"][0]["seeds"] == runs[None]["results"][0]["seeds"]
    with pytest.raises(SystemExit, match="--max-envs must be at least 1"):
        main(Args(checkpoint=checkpoint, values=(12,), episodes=2, max_envs=0, json=tmp_path / "e.json"))


def test_evaluate_cli_settings_are_checked_against_the_environment(dataset_path, tmp_path):
    from training.evaluate import Args, main

    checkpoint = str(train(_tiny_config(dataset_path, tmp_path / "settings", epochs=1)))
    with pytest.raises(SystemExit, match="no environment setting 'cue'; it has episode_length"):
        main(Args(checkpoint=checkpoint, values=(10,), episodes=2, settings=("cue=1",), json=tmp_path / "e.json"))
    with pytest.raises(SystemExit, match="episode_length with --values"):  # the protocol's own setting
        main(Args(checkpoint=checkpoint, episodes=2, settings=("episode_length=12",), json=tmp_path / "e.json"))


def test_collector_starts_at_the_tasks_dataset_seed(tmp_path, monkeypatch):
    import dataclasses

    import training.collect as collect_module

    task = dataclasses.replace(TASK, dataset_seed=7)
    monkeypatch.setattr(collect_module, "task_or_exit", lambda name: task)
    collect_module.main(collect_module.Args(task="tmaze", out=tmp_path / "d", episodes=1))
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["settings"]["seed"] == 7
    expected = load_dataset(collect(TASK, tmp_path / "e", episodes_per_setting=1, seed=7), task="tmaze")
    assert np.array_equal(load_dataset(tmp_path / "d", task="tmaze").actions, expected.actions)


@pytest.mark.parametrize("name", ["memory_maze", "vizdoom_two_colors"])
def test_training_episodes_are_not_evaluation_episodes(name):
    # seeds draw the maze / spawn and items there; the evaluator's seeds start at 0 and
    # balanced_seeds looks at most 100 * count + 100 seeds ahead
    task = get_task(name)
    assert task.dataset_seed > 100 * task.evaluation.episodes + 100


def test_step_cap_option_sets_the_cap_whether_or_not_it_is_the_protocols_setting():
    minigrid, vizdoom = get_task("minigrid_memory"), get_task("vizdoom_two_colors")
    assert values_and_overrides(minigrid, None, 300) == (minigrid.evaluation.values, {"step_cap": 300})
    assert values_and_overrides(minigrid, [11], None) == ((11,), {})
    assert values_and_overrides(vizdoom, None, 500) == ((500,), {})  # ViZDoom evaluates over step caps
    assert values_and_overrides(vizdoom, None, None) == ((2100,), {})
    with pytest.raises(ValueError, match="not both"):
        values_and_overrides(vizdoom, [1000], 500)
    with pytest.raises(ValueError, match="no step cap"):
        values_and_overrides(get_task("tmaze"), None, 100)
    with pytest.raises(ValueError, match="--values: 11, 21 given more than once; give each value once"):
        values_and_overrides(minigrid, [21, 11, 21, 11, 41], None)  # each would be evaluated and written twice


def test_evaluation_keeps_per_episode_returns_and_compare_pairs_them(dataset_path, tmp_path, capsys):
    from training.compare import (Args as CompareArgs, compare, load_evaluation, main as compare_main, paired,
                                  plot_pairs)
    from training.evaluate import Args, main

    checkpoint = str(train(_tiny_config(dataset_path, tmp_path / "pair", epochs=1)))
    for name in ("a", "b"):
        main(Args(checkpoint=checkpoint, values=(10, 20), episodes=4, seed=3, json=tmp_path / f"{name}.json"))
    a = load_evaluation(tmp_path / "a.json")
    row = a["results"][0]
    assert len(set(row["seeds"])) == len(row["returns"]) == 4 and min(row["seeds"]) == 3  # balanced by cue
    assert np.mean(row["returns"]) == pytest.approx(row["mean_return"], abs=1e-3)
    # the same checkpoint on the same seeds plays the same episodes: every pair ties
    rows = compare(a, load_evaluation(tmp_path / "b.json"))
    assert [value for value, _ in rows] == [10, 20]
    assert all(r["difference"] == 0 and r["ties"] == 4 for _, r in rows)
    compare_main(CompareArgs(first=tmp_path / "a.json", second=tmp_path / "b.json", plot=tmp_path / "pairs.png"))
    assert "+0.000 +- 0.000  0 / 4 / 0" in capsys.readouterr().out
    assert Image.open(tmp_path / "pairs.png").format == "PNG"
    figure = plot_pairs(a, load_evaluation(tmp_path / "b.json"))  # a panel per setting value, a point per pair
    assert [axis.get_title().split(":")[0] for axis in figure.axes] == ["episode_length = 10", "episode_length = 20"]
    sizes = figure.axes[0].collections[0].get_sizes()  # a point per distinct pair, its area the pairs' share
    assert sum(sizes - 24) == pytest.approx(600)
    with pytest.raises(SystemExit, match="--plot .*must be a .png"):
        compare_main(CompareArgs(first=tmp_path / "a.json", second=tmp_path / "b.json", plot=tmp_path / "p.jpg"))
    with pytest.raises(SystemExit, match=r"^error: --plot .*nowhere/p.png: cannot write a file there"):
        compare_main(CompareArgs(first=tmp_path / "a.json", second=tmp_path / "b.json",
                                 plot=tmp_path / "nowhere" / "p.png"))

    # a memory horizon is recorded, and compare says that the two evaluations differ in it
    main(Args(checkpoint=checkpoint, values=(10,), episodes=4, seed=3, memory_horizon=1, json=tmp_path / "h.json"))
    assert load_evaluation(tmp_path / "h.json")["memory_horizon"] == 1 and a["memory_horizon"] is None
    capsys.readouterr()
    compare_main(CompareArgs(first=tmp_path / "a.json", second=tmp_path / "h.json"))
    out = capsys.readouterr().out
    assert "memory horizon 1 segment\n" in out and "differ in memory horizon" in out
    assert "note: only A evaluated episode_length 20 (left out below)" in out  # h.json has only 10
    with pytest.raises(SystemExit, match="--memory-horizon: .*at least 1"):
        main(Args(checkpoint=checkpoint, episodes=2, memory_horizon=0, json=tmp_path / "zero.json"))

    # so are hidden action inputs (evaluate --hide-actions)
    main(Args(checkpoint=checkpoint, values=(10,), episodes=4, seed=3, hide_actions=1.0, json=tmp_path / "x.json"))
    assert load_evaluation(tmp_path / "x.json")["hide_actions"] == 1.0 and a["hide_actions"] == 0.0
    capsys.readouterr()
    compare_main(CompareArgs(first=tmp_path / "x.json", second=tmp_path / "a.json"))
    out = capsys.readouterr().out
    assert "action inputs hidden with probability 1.0\n" in out and "differ in hidden actions" in out
    with pytest.raises(SystemExit, match="--hide-actions is a probability"):
        main(Args(checkpoint=checkpoint, episodes=2, hide_actions=-0.1, json=tmp_path / "neg.json"))

    # and pixel noise (evaluate --pixel-noise), on image tasks only
    for noise, message in [(0.1, "--pixel-noise needs image observations; tmaze's are vectors"),
                           (1.5, "--pixel-noise is a probability in \\[0, 1\\], got 1.5")]:
        with pytest.raises(SystemExit, match=message):
            main(Args(checkpoint=checkpoint, episodes=2, pixel_noise=noise, json=tmp_path / "noise.json"))
    image = Path(__file__).resolve().parent.parent / "assets/checkpoints/minigrid_memory/rate"
    for name, noise in (("clean", 0.0), ("noisy", 0.2)):
        main(Args(checkpoint=image, values=(11,), step_cap=20, episodes=2, pixel_noise=noise,
                  json=tmp_path / f"{name}.json"))
    assert load_evaluation(tmp_path / "noisy.json")["pixel_noise"] == 0.2 and a["pixel_noise"] == 0.0
    capsys.readouterr()
    compare_main(CompareArgs(first=tmp_path / "noisy.json", second=tmp_path / "clean.json"))
    out = capsys.readouterr().out
    assert "pixels nudged with probability 0.2\n" in out and "differ in pixel noise" in out
    main(Args(checkpoint=image, values=(11,), step_cap=20, episodes=2, seed=1, json=tmp_path / "seeded.json"))
    compare_main(CompareArgs(first=tmp_path / "seeded.json", second=tmp_path / "clean.json"))
    assert "differ in --seed (the sampled actions" in capsys.readouterr().out  # sampled: other action draws

    # pairing uses the seeds both played, whatever their order
    first = {"seeds": [1, 2, 3], "returns": [1.0, 0.0, 1.0]}
    second = {"seeds": [3, 2, 9], "returns": [0.0, 0.0, 5.0]}
    figures = paired(first, second)
    assert figures["episodes"] == 2 and figures["difference"] == pytest.approx(0.5)
    assert (figures["wins"], figures["ties"], figures["losses"]) == (1, 1, 0)

    old = json.loads((tmp_path / "a.json").read_text())
    for result in old["results"]:
        del result["seeds"], result["returns"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="no per-episode returns"):
        load_evaluation(tmp_path / "old.json")
    with pytest.raises(SystemExit, match="does not exist"):
        load_evaluation(tmp_path / "missing.json")


def test_shift_frames_moves_each_sample_by_one_offset_with_edges_repeated():
    obs = torch.randint(0, 256, (3, 4, 3, 10, 12), dtype=torch.uint8)
    offsets = shift_offsets(2, 3, seed=5, epoch=0, batch=1)
    assert offsets.shape == (3, 2) and np.abs(offsets).max() <= 2
    assert np.array_equal(offsets, shift_offsets(2, 3, seed=5, epoch=0, batch=1))
    shifted = shift_frames(obs, offsets)
    assert shifted.shape == obs.shape and shifted.dtype == torch.uint8
    for b, (dy, dx) in enumerate(offsets):
        for y, x in [(0, 0), (9, 11), (4, 6), (1, 10)]:
            source = (min(max(y + dy, 0), 9), min(max(x + dx, 0), 11))
            assert torch.equal(shifted[b, :, :, y, x], obs[b, :, :, source[0], source[1]])  # every frame alike
    assert torch.equal(shift_frames(obs, np.zeros((3, 2), dtype=int)), obs)


def _image_dataset(tmp_path):
    rng = np.random.default_rng(1)
    episodes = [{"observations": rng.integers(0, 256, (n, 3, 84, 84), dtype=np.uint8), "actions": rng.integers(0, 3, n),
                 "rewards": rng.random(n).astype(np.float32)} for n in (40, 25, 33)]
    return write_dataset(tmp_path / "images", "minigrid_memory", episodes, {})


def _image_config(data, out, **overrides):
    fields = dict(task="minigrid_memory", model="rate", data=data, out=out, epochs=2, batch_size=2, warmup_steps=1,
                  eval_every=0, seed=3, curves=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_shift_augment_changes_training_and_a_resumed_run_draws_the_same_shifts(tmp_path):
    data = _image_dataset(tmp_path)

    def config(out, **overrides):
        # on the CPU: cuDNN's convolution gradients are not bit-reproducible from run to run
        return _image_config(data, tmp_path / out, **{"shift_augment": 3, "device": "cpu", **overrides})

    straight = load_checkpoint(train(config("straight")))
    assert straight.training_info["shift_augment"] == 3

    def kill_after_first_epoch(epoch):
        raise Interrupted

    with pytest.raises(Interrupted):
        train(config("resumed"), on_epoch_end=kill_after_first_epoch)
    with pytest.raises(SystemExit, match="shift_augment"):
        train(config("resumed", resume=True, shift_augment=0))
    resumed = load_checkpoint(train(config("resumed", resume=True)))
    plain = load_checkpoint(train(config("plain", shift_augment=0)))
    for (name, a), b, c in zip(straight.state_dict().items(), resumed.state_dict().values(),
                               plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert weights_differ(straight, plain)
    with pytest.raises(ValueError, match="by up to their whole size"):  # every frame would be its edges smeared
        train(config("whole", shift_augment=min(load_dataset(data).observations.shape[-2:])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_fine_tuning_options_train_on_cuda_in_bf16(tmp_path):
    """The options of Memory Maze's shipped fine-tuning (--init, --action-dropout) and their neighbours
    (--keyframe-weight, --shift-augment) on image observations, on CUDA with bf16 autocast."""
    data = _image_dataset(tmp_path)
    first = train(_image_config(data, tmp_path / "first", epochs=1, device="cuda", bf16=True))
    tuned = load_checkpoint(train(_image_config(data, tmp_path / "tuned", epochs=1, device="cuda", bf16=True,
                                                init=first, action_dropout=0.3, keyframe_weight=3.0, shift_augment=2)))
    info = tuned.training_info
    assert (info["init"], info["action_dropout"], info["keyframe_weight"], info["shift_augment"]) == (
        str(first), 0.3, 3.0, 2)
    log = [json.loads(line) for line in (tmp_path / "tuned" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in log if "loss" in r]).all()
    start = load_checkpoint(first)
    assert weights_differ(start, tuned)


def test_shift_augment_is_refused_for_vector_observations_and_negative_values(dataset_path, tmp_path):
    with pytest.raises(ValueError, match="leave it at 0 for this task"):
        train(_tiny_config(dataset_path, tmp_path / "run", shift_augment=2))
    with pytest.raises(ValueError, match="number of pixels"):
        train(_tiny_config(dataset_path, tmp_path / "run2", shift_augment=-1))


def test_merge_joins_datasets_in_order_with_labels_where_one_has_none(tmp_path, capsys):
    from training.merge import Args, main

    task = get_task("tmaze")
    plain = [run_episode(task, {"episode_length": 5}, seed) for seed in (0, 1)]
    taught = {**run_episode(task, {"episode_length": 7}, 2)}
    taught["labels"] = (taught["actions"] + 1) % task.act_dim  # labels that differ from the actions
    write_dataset(tmp_path / "plain", "tmaze", plain, {"seed": 0})
    write_dataset(tmp_path / "taught", "tmaze", [taught], {"seed": 2})
    main(Args(sources=(tmp_path / "plain", tmp_path / "taught"), out=tmp_path / "both"))
    both = load_dataset(tmp_path / "both", task="tmaze")
    lengths = [len(e["actions"]) for e in plain + [taught]]
    assert both.num_episodes == 3 and list(both.episode_lengths()) == lengths
    assert np.array_equal(both.observations, np.concatenate([e["observations"] for e in plain + [taught]]))
    assert np.array_equal(both.actions, np.concatenate([e["actions"] for e in plain + [taught]]))
    # the plain episodes' actions are their labels; the taught one keeps its own
    assert np.array_equal(both.labels, np.concatenate([plain[0]["actions"], plain[1]["actions"], taught["labels"]]))
    assert np.allclose(both.episode_returns(), [e["return"] for e in plain + [taught]])
    assert [source["episodes"] for source in both.meta["settings"]["merged_from"]] == [2, 1]
    assert "wrote 3 episodes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="one of the sources"):
        main(Args(sources=(tmp_path / "plain", tmp_path / "taught"), out=tmp_path / "plain"))
    with pytest.raises(SystemExit, match="at least two"):
        main(Args(sources=(tmp_path / "plain",), out=tmp_path / "x"))
    write_dataset(tmp_path / "other", "minigrid_memory", [{"observations": np.zeros((2, 3, 7, 7), np.uint8),
                                                          "actions": np.zeros(2), "rewards": np.zeros(2)}], {})
    with pytest.raises(SystemExit, match="different tasks"):
        main(Args(sources=(tmp_path / "plain", tmp_path / "other"), out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_collector_stores_what_must_be_remembered_at_every_step(dataset_path):
    episode = run_episode(TASK, {"episode_length": 20}, seed=1)
    cue_class = TASK.aux_values.index(episode["reset_info"]["cue"])
    assert np.array_equal(episode["aux_labels"], np.full(len(episode["actions"]), cue_class))
    data = load_dataset(dataset_path)
    assert data.aux_labels is not None and len(data.aux_labels) == len(data.actions)
    for first, end in pairwise(data.episode_starts):
        assert len(set(data.aux_labels[first:end].tolist())) == 1  # the cue of the episode


def test_auxiliary_labels_are_padded_merged_where_all_have_them_and_required(tmp_path, capsys):
    from training.dataset import merge_datasets
    from training.merge import Args as MergeArgs, main as merge_main

    rng = np.random.default_rng(0)
    episodes = [{"observations": rng.normal(size=(n, 4)).astype(np.float32), "actions": rng.integers(0, 4, n),
                 "rewards": np.zeros(n, np.float32), "aux_labels": np.full(n, n % 2)} for n in (7, 12)]
    data = load_dataset(write_dataset(tmp_path / "d", "tmaze", episodes, {}))
    assert np.array_equal(data.aux_window(0, 3, 6), [1, 1, 1, 1, ACTION_PAD, ACTION_PAD])
    assert np.array_equal(data.aux_window(1, 0, 5), np.zeros(5))
    with pytest.raises(ValueError, match="1 of 2 episodes have aux_labels"):
        write_dataset(tmp_path / "e", "tmaze", [episodes[0], {k: v for k, v in episodes[1].items()
                                                              if k != "aux_labels"}], {})
    plain = load_dataset(write_dataset(tmp_path / "p", "tmaze", [{k: v for k, v in episodes[0].items()
                                                                   if k != "aux_labels"}], {}))
    with pytest.raises(DatasetError, match="no auxiliary labels"):
        plain.aux_window(0, 0, 4)
    both = load_dataset(merge_datasets(tmp_path / "both", [data, data]))
    assert np.array_equal(both.aux_labels, np.concatenate([data.aux_labels] * 2))
    assert load_dataset(merge_datasets(tmp_path / "mixed", [data, plain])).aux_labels is None
    merge_main(MergeArgs(sources=(tmp_path / "d", tmp_path / "p"), out=tmp_path / "said"))  # the tool says so
    assert f"note: auxiliary labels (aux_labels.npy) left out: {tmp_path / 'p'} has none" in capsys.readouterr().out


def test_auxiliary_loss_is_added_to_the_action_loss(dataset_path):
    data = load_dataset(dataset_path)
    model = MemoryTransformer(replace(TASK.model_config("rate"), dropout=0.0, dropatt=0.0, aux_classes=2))
    rtg, obs, actions, targets, aux = make_batch(data, np.array([[0, 0], [1, 0]]), 150, "cpu", aux=True)
    times = segment_slices(model, 150)
    counts = [float((targets[:, seg] != ACTION_PAD).sum()) for seg in times]
    with torch.no_grad():
        plain, _, _ = SegmentLosses(model)(rtg, obs, actions, times, counts, targets=targets)
        weighted, values, _ = SegmentLosses(model)(rtg, obs, actions, times, counts, targets=targets,
                                                   aux_targets=aux, aux_weight=0.5)
        by_hand, state = 0.0, None
        for seg, count in zip(times, counts, strict=True):
            _, aux_logits, state = model.segment(rtg[:, seg], obs[:, seg], actions[:, seg], state)
            keep = aux[:, seg] != ACTION_PAD
            if count:
                by_hand += float(torch.nn.functional.cross_entropy(aux_logits[keep], aux[:, seg][keep],
                                                                   reduction="sum")) / count
    assert float(weighted) == pytest.approx(float(plain) + 0.5 * by_hand, rel=1e-5)
    assert sum(float(v) for v in values if v is not None) == pytest.approx(float(plain), rel=1e-5)  # action losses
    with pytest.raises(ValueError, match="auxiliary head"):
        train_step(MemoryTransformer(TASK.model_config("rate")), torch.optim.SGD(model.parameters(), lr=0.0),
                   rtg, obs, actions, aux_targets=aux, aux_weight=1.0)
    # weights on the action targets (--keyframe-weight) leave the auxiliary loss its mean: a constant weight
    # changes neither loss, so the update is the same as without weights
    def updated(weights):
        torch.manual_seed(0)
        trained = MemoryTransformer(replace(TASK.model_config("rate"), dropout=0.0, dropatt=0.0, aux_classes=2))
        train_step(trained, torch.optim.SGD(trained.parameters(), lr=0.1), rtg, obs, actions, targets=targets,
                   aux_targets=aux, aux_weight=0.5, weights=weights, grad_clip=0.0)
        return torch.cat([p.detach().flatten() for p in trained.parameters()])

    assert torch.allclose(updated(None), updated(torch.full(actions.shape, 3.0)), atol=1e-6)


def test_training_with_the_auxiliary_loss_logs_what_memory_holds_and_is_checked(dataset_path, tmp_path,
                                                                                monkeypatch):
    held_out = collect(TASK, tmp_path / "held_out", episodes_per_setting=1, seed=100)
    model = load_checkpoint(train(_tiny_config(dataset_path, tmp_path / "aux", epochs=2, aux_weight=0.5,
                                               val_data=held_out)))
    assert model.config.aux_classes == 2 and model.training_info["aux_weight"] == 0.5
    log = [json.loads(line) for line in (tmp_path / "aux" / "log.jsonl").read_text().splitlines()]
    accuracies = [r["val_aux_accuracy"] for r in log if "val_aux_accuracy" in r]
    assert len(accuracies) == 2 and all(len(a) == 3 and all(0.0 <= x <= 1.0 for x in a) for a in accuracies)
    with pytest.raises(SystemExit, match="aux_weight"):
        train(_tiny_config(dataset_path, tmp_path / "aux", epochs=2, resume=True))
    from rate_core import tasks

    monkeypatch.setitem(tasks.TASKS, "unlabelled", replace(TASK, name="unlabelled", aux_label=None, aux_values=()))
    with pytest.raises(ValueError, match="no auxiliary label"):
        train(_tiny_config(dataset_path, tmp_path / "none", task="unlabelled", aux_weight=1.0))
    with pytest.raises(ValueError, match="--aux-weight must be 0"):
        train(_tiny_config(dataset_path, tmp_path / "neg", aux_weight=-1.0))
    rng = np.random.default_rng(0)
    bare = write_dataset(tmp_path / "bare", "tmaze", [{"observations": rng.normal(size=(9, 4)).astype(np.float32),
                                                       "actions": rng.integers(0, 4, 9),
                                                       "rewards": np.zeros(9, np.float32)}], {})
    with pytest.raises(DatasetError, match="auxiliary labels"):
        train(_tiny_config(bare, tmp_path / "bare_run", aux_weight=1.0))


def test_writers_refuse_a_folder_that_is_not_theirs_and_lose_nothing(dataset_path, tmp_path, monkeypatch):
    from training import average, collect as collect_tool, merge

    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    checkpoint = train(_tiny_config(dataset_path, tmp_path / "run", epochs=1))
    with pytest.raises(SystemExit, match="is not a dataset .*no meta.json"):
        collect_tool.main(collect_tool.Args(task="tmaze", episodes=1, out=mine))
    with pytest.raises(SystemExit, match="is not a dataset"):
        merge.main(merge.Args(sources=(dataset_path, dataset_path), out=mine))
    with pytest.raises(SystemExit, match="is not a checkpoint"):
        average.main(average.Args(sources=(checkpoint, checkpoint), out=mine))
    with pytest.raises(SystemExit, match="is not a checkpoint"):  # a folder above its sources
        average.main(average.Args(sources=(checkpoint, checkpoint), out=tmp_path / "run"))
    monkeypatch.chdir(mine)
    with pytest.raises(SystemExit, match="working folder"):
        collect_tool.main(collect_tool.Args(task="tmaze", episodes=1, out=Path(".")))
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "src").is_dir()
    assert checkpoint.is_dir() and sorted(p.name for p in mine.iterdir()) == ["notes.txt", "src"]
    # a dataset or checkpoint with a file of the user's beside it (a note; a checkpoint's eval.json) is not replaced
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(dataset_path, data)
    (data / "NOTES.txt").write_text("how it was made")
    with pytest.raises(SystemExit, match=r"holds NOTES.txt beside its dataset"):
        merge.main(merge.Args(sources=(dataset_path, dataset_path), out=data))
    with pytest.raises(SystemExit, match=r"holds NOTES.txt beside its dataset"):
        collect_tool.main(collect_tool.Args(task="tmaze", episodes=1, out=data))
    evaluated = tmp_path / "evaluated"
    shutil.copytree(checkpoint, evaluated)
    (evaluated / "eval.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"holds eval.json beside its checkpoint"):
        average.main(average.Args(sources=(checkpoint, checkpoint), out=evaluated))
    assert (data / "NOTES.txt").exists() and (evaluated / "eval.json").exists()
    # what the tools wrote before is theirs to replace
    twice = tmp_path / "twice"
    assert average.main(average.Args(sources=(checkpoint, checkpoint), out=twice)) == twice
    assert average.main(average.Args(sources=(checkpoint, checkpoint), out=twice)) == twice


def test_collect_checks_its_values_before_any_episode(tmp_path):
    from training.collect import Args, main

    for args, message in [(dict(task="nope"), "unknown task 'nope'; known tasks"),
                          (dict(episodes=0), "--episodes must be at least 1, got 0"),
                          (dict(seed=-5), "--seed must be at least 0"),
                          (dict(workers=0), "--workers must be at least 1"),
                          (dict(settings=("episode_length=2",)), "--settings: episode_length must be at least 3")]:
        with pytest.raises(SystemExit, match=message):
            main(Args(out=tmp_path / "d", **args))
    assert not (tmp_path / "d").exists()


def test_a_killed_writer_leaves_nothing_the_next_one_keeps(tmp_path):
    dead = tmp_path / ".data.partial-999999999"  # no process has this id
    dead.mkdir()
    (dead / "observations.npy").write_bytes(b"\0" * 100)
    write_dataset(tmp_path / "data", "tmaze", [run_episode(TASK, {"episode_length": 20}, seed=1)], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # killed between the renames that swap a new dataset in: the next reader puts the new one in place
    write_dataset(tmp_path / "new", "tmaze", [run_episode(TASK, {"episode_length": 20}, seed=2)] * 2, {})
    (tmp_path / "data").rename(tmp_path / ".data.retired-999999999")
    (tmp_path / "new").rename(tmp_path / ".data.ready-999999999")
    assert load_dataset(tmp_path / "data").num_episodes == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_evaluate_keeps_the_protocols_eval_json_and_checks_its_output_first(dataset_path, tmp_path, monkeypatch):
    import training.evaluate
    from training.evaluate import Args, main

    checkpoint = train(_tiny_config(dataset_path, tmp_path / "ev", epochs=1))
    for existing in (False, True):  # whether or not the checkpoint holds an eval.json: only the protocol's goes there
        with pytest.raises(SystemExit, match=r"not the protocol's \(--values, --episodes\): give --json OUT"):
            main(Args(checkpoint=str(checkpoint), values=(10,), episodes=2))
        assert (checkpoint / "eval.json").exists() is existing
        (checkpoint / "eval.json").write_text('{"protocol": "the shipped one"}')
    assert (checkpoint / "eval.json").read_text() == '{"protocol": "the shipped one"}'
    with pytest.raises(SystemExit, match=r"not the protocol's \(--values, --episodes\)"):  # named as --json too
        main(Args(checkpoint=str(checkpoint), values=(10,), episodes=2, json=checkpoint / "eval.json"))
    main(Args(checkpoint=str(checkpoint), values=(10,), episodes=2, json=tmp_path / "short.json"))
    written = json.loads((tmp_path / "short.json").read_text())  # the protocol block says what ran
    assert written["protocol"]["episodes"] == 2 and written["protocol"]["values"] == [10]
    with pytest.raises(SystemExit, match="--json .*cannot write a file there"):
        main(Args(checkpoint=str(checkpoint), values=(10,), episodes=2, json=tmp_path / "missing" / "e.json"))
    for args, message in [(dict(episodes=-1), "--episodes must be at least 1"), (dict(episodes=0), "at least 1"),
                          (dict(seed=-1), "--seed must be at least 0"), (dict(values=(1,)), "at least 3, got 1"),
                          (dict(device="gpu"), "--device must be cpu, cuda"),
                          (dict(target_return=float("inf")), "--target-return must be a finite number"),
                          (dict(target_return=float("nan")), "--target-return must be a finite number"),
                          (dict(actions="sampled", temperature=float("inf")), "--temperature must be a finite")]:
        with pytest.raises(SystemExit, match=message):
            main(Args(checkpoint=str(checkpoint), json=tmp_path / "e.json", **args))

    def interrupted(*args, on_result, **kwargs):  # Ctrl-C after the first setting
        on_result([{"episode_length": 150, "success_rate": 1.0}])
        raise KeyboardInterrupt

    monkeypatch.setattr(training.evaluate, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(Args(checkpoint=str(checkpoint)))
    assert (checkpoint / "eval.json").read_text() == '{"protocol": "the shipped one"}'  # the complete one stays
    partial = json.loads((checkpoint / "eval.partial.json").read_text())
    assert partial["results"] == [{"episode_length": 150, "success_rate": 1.0}]


def test_training_refuses_bad_values_and_other_data_on_resume(dataset_path, tmp_path):
    (tmp_path / "a_file").write_text("")
    for change, message in [({"epochs": -1}, "--epochs must be at least 1"), ({"epochs": 0}, "--epochs"),
                            ({"eval_every": 1, "eval_episodes": 0}, "--eval-episodes must be at least 2"),
                            ({"micro_batch": -1}, "--micro-batch"), ({"max_minutes": -1.0}, "--max-minutes"),
                            ({"seed": -1}, "--seed must be a whole number from 0"), ({"seed": 2**64}, "--seed"),
                            ({"out": tmp_path / "a_file"}, "--out .*a_file: a file; give a folder"),
                            ({"out": tmp_path / "a_file" / "run"}, "--out .*: cannot be made")]:
        with pytest.raises(ValueError, match=message):
            train(_tiny_config(dataset_path, **{"out": tmp_path / "bad", **change}))
    assert not (tmp_path / "bad").exists()
    other = collect(TASK, tmp_path / "other", episodes_per_setting=2, seed=50)
    train(_tiny_config(dataset_path, tmp_path / "run", epochs=1))
    with pytest.raises(SystemExit, match="--resume with --data .* was trained on"):
        train(replace(_tiny_config(dataset_path, tmp_path / "run", epochs=1, resume=True), data=other))
    (tmp_path / "run" / "last" / "train_state.safetensors").write_bytes(b"\x10\x00")  # truncated
    with pytest.raises(CheckpointError, match="training state unreadable"):
        train(_tiny_config(dataset_path, tmp_path / "run", epochs=1, resume=True))


def test_the_log_gives_each_batch_the_rate_it_used_and_the_average_follows_every_update(dataset_path, tmp_path,
                                                                                       monkeypatch):
    import training.step as step_module
    import training.train as train_module

    used, updates, averaged = [], [], []
    real_train_step, real_optimizer_step = train_module.train_step, step_module._optimizer_step

    def spy_train_step(model, optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])  # the rate of the batch's first update
        return real_train_step(model, optimizer, *args, **kwargs)

    def spy_optimizer_step(*args, **kwargs):
        updates.append(1)
        return real_optimizer_step(*args, **kwargs)

    real_update = train_module.WeightAverage.update
    monkeypatch.setattr(train_module, "train_step", spy_train_step)
    monkeypatch.setattr(step_module, "_optimizer_step", spy_optimizer_step)
    monkeypatch.setattr(train_module.WeightAverage, "update", lambda self: averaged.append(1) or real_update(self))
    run = tmp_path / "detached"
    train(_tiny_config(dataset_path, run, ema=0.9, memory_grad="detached"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    logged = [record["lr"] for record in log if "lr" in record]
    assert logged == pytest.approx(used) and len(used) > 1
    # detached: N updates a batch, each followed by the average (not once a batch)
    assert len(averaged) == len(updates) > len(used)

"""Offline datasets: a folder of numpy arrays, written by the collectors, read by the trainer.

Format (version 1), a folder such as data/tmaze/oracle/:

    meta.json            {"format_version", "task", "episodes", "steps", "settings", "arrays": {name: {shape, dtype}}}
    observations.npy     (steps, *obs_shape)   every episode's observations, concatenated
    actions.npy          (steps,) int64        the action taken after each observation
    rewards.npy          (steps,) float32      the reward that action received
    episode_starts.npy   (episodes + 1,) int64 offsets: episode i is steps [starts[i], starts[i+1])
    labels.npy           (steps,) int64        optional: the expert's action at each step where the
                                               action taken was another policy's (the training target
                                               then; actions stay the model's input)

Arrays are plain .npy files (memory-mapped on load, never unpickled). The folder is written under
a temporary name and renamed when complete, and meta.json is written last, so an interrupted
collector never leaves something that looks like a dataset. Loading checks every file against
meta.json and raises DatasetError naming the file and the problem.
"""

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rate_core.model import ACTION_PAD

FORMAT_VERSION = 1
ARRAYS = ("observations", "actions", "rewards", "episode_starts")
OPTIONAL_ARRAYS = ("labels", "aux_labels")


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file and what to do."""


def write_dataset(path: str | os.PathLike, task: str, episodes: list[dict], settings: dict) -> Path:
    """Write episodes (dicts of observations (T, ...), actions (T,), rewards (T,), optionally
    labels (T,) and aux_labels (T,)) atomically."""
    if not episodes:
        raise ValueError("no episodes to write")
    for name in OPTIONAL_ARRAYS:
        having = sum(name in e for e in episodes)
        if having not in (0, len(episodes)):
            raise ValueError(f"{having} of {len(episodes)} episodes have {name}: all or none must")
    with_labels = "labels" in episodes[0]
    lengths = [len(e["actions"]) for e in episodes]
    parts = {
        "observations": [np.asarray(e["observations"]) for e in episodes],
        "actions": [np.asarray(e["actions"], dtype=np.int64) for e in episodes],
        "rewards": [np.asarray(e["rewards"], dtype=np.float32) for e in episodes],
        "episode_starts": [np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)],
    }
    if with_labels:
        parts["labels"] = [np.asarray(e["labels"], dtype=np.int64) for e in episodes]
    if "aux_labels" in episodes[0]:
        parts["aux_labels"] = [np.asarray(e["aux_labels"], dtype=np.int64) for e in episodes]
    return _write_folder(path, task, parts, settings)


def merge_datasets(path: str | os.PathLike, sources: list["Dataset"]) -> Path:
    """Write the episodes of `sources` (datasets of one task), in order, as one dataset at `path`,
    atomically. Where some sources have labels, the others' actions serve as theirs (their actions
    were the expert's own). Auxiliary labels are kept where every source has them."""
    if not sources:
        raise ValueError("no datasets to merge")
    tasks = {source.task for source in sources}
    if len(tasks) > 1:
        raise ValueError(f"the datasets are of different tasks ({', '.join(sorted(tasks))}); merge one task's")
    shapes = {source.observations.shape[1:] for source in sources}
    if len(shapes) > 1:
        raise ValueError(f"the datasets' observations differ in shape ({', '.join(map(str, shapes))})")
    offsets = np.cumsum([0] + [len(source.actions) for source in sources[:-1]])
    parts = {
        "observations": [source.observations for source in sources],
        "actions": [source.actions for source in sources],
        "rewards": [source.rewards for source in sources],
        "episode_starts": [np.concatenate([[0]] + [source.episode_starts[1:] + offset
                                                   for source, offset in zip(sources, offsets)])],
    }
    if any(source.labels is not None for source in sources):
        parts["labels"] = [source.actions if source.labels is None else source.labels for source in sources]
    if all(source.aux_labels is not None for source in sources):
        parts["aux_labels"] = [source.aux_labels for source in sources]
    settings = {"merged_from": [{"path": str(source.path), "episodes": source.num_episodes,
                                 "settings": source.meta.get("settings")} for source in sources]}
    return _write_folder(path, tasks.pop(), parts, settings)


def _write_folder(path: str | os.PathLike, task: str, parts: dict[str, list[np.ndarray]], settings: dict) -> Path:
    """Write each array of `parts` (its chunks concatenated) under a staging name, then meta.json,
    then rename the folder to `path` (replacing one there)."""
    path = Path(path)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    declared = {name: _write_concatenated(staging / f"{name}.npy", chunks) for name, chunks in parts.items()}
    meta = {
        "format_version": FORMAT_VERSION, "task": task, "episodes": len(parts["episode_starts"][0]) - 1,
        "steps": declared["actions"]["shape"][0], "settings": settings,
        "arrays": declared,
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, path)
    return path


def _write_concatenated(file: Path, chunks: list[np.ndarray]) -> dict:
    """Write the chunks' concatenation to the .npy `file` chunk by chunk (no second copy in memory,
    which 15 GB of frames would not leave room for); returns its shape and dtype for meta.json."""
    dtype = functools.reduce(np.promote_types, (c.dtype for c in chunks))
    shape = (sum(len(c) for c in chunks), *chunks[0].shape[1:])
    out = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
    position = 0
    for chunk in chunks:
        out[position:position + len(chunk)] = chunk
        position += len(chunk)
    out.flush()
    del out
    return {"shape": list(shape), "dtype": str(dtype)}


@dataclass
class Dataset:
    """A loaded dataset: arrays (memory-mapped) and per-step returns-to-go."""

    path: Path
    meta: dict
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode_starts: np.ndarray
    returns_to_go: np.ndarray
    labels: np.ndarray | None = None
    """the training targets where they differ from the actions taken (None: the actions are)"""
    aux_labels: np.ndarray | None = None
    """per step, the class the task's auxiliary loss predicts (Task.aux_label; None: not collected)"""

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_starts)

    def episode_returns(self) -> np.ndarray:
        return np.asarray(self.returns_to_go[self.episode_starts[:-1]], dtype=np.float64)

    def window(self, episode: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rtg (L,), observations (L, ...), actions (L,)) of `length` steps from `start` in `episode`,
        padded past the episode's end: action ACTION_PAD, return-to-go 0, last observation repeated."""
        first, end = self.episode_starts[episode], self.episode_starts[episode + 1]
        lo = first + start
        hi = min(lo + length, end)
        valid = hi - lo
        obs = np.asarray(self.observations[lo:hi])
        rtg = np.zeros(length, dtype=np.float32)
        actions = np.full(length, ACTION_PAD, dtype=np.int64)
        rtg[:valid] = self.returns_to_go[lo:hi]
        actions[:valid] = self.actions[lo:hi]
        if valid < length:
            obs = np.concatenate([obs, np.repeat(obs[-1:], length - valid, axis=0)])
        return rtg, obs, actions

    def training_window(self, episode: int, start: int, length: int) -> tuple[np.ndarray, ...]:
        """window() and the targets (L,): the labels where the dataset has them, else the actions."""
        rtg, obs, actions = self.window(episode, start, length)
        if self.labels is None:
            return rtg, obs, actions, actions
        return rtg, obs, actions, self._padded(self.labels, episode, start, length)

    def aux_window(self, episode: int, start: int, length: int) -> np.ndarray:
        """The auxiliary labels (L,) of the steps training_window() gives, ACTION_PAD past the episode's end."""
        if self.aux_labels is None:
            raise DatasetError(f"{self.path}: the dataset has no auxiliary labels (aux_labels.npy); collect it "
                               "again with this version of training.collect, for a task that has an aux_label")
        return self._padded(self.aux_labels, episode, start, length)

    def _padded(self, per_step: np.ndarray, episode: int, start: int, length: int) -> np.ndarray:
        """`length` values of a per-step integer array from `start` in `episode`, ACTION_PAD past its end."""
        lo = self.episode_starts[episode] + start
        valid = max(0, min(length, int(self.episode_starts[episode + 1]) - lo))
        values = np.full(length, ACTION_PAD, dtype=np.int64)
        values[:valid] = per_step[lo:lo + valid]
        return values


def load_dataset(path: str | os.PathLike, task: str | None = None) -> Dataset:
    """Open a dataset folder written by write_dataset. task: when given, the dataset must be for it."""
    path = Path(path)
    collect_hint = "run the collector again (python -m training.collect --help)"
    if not path.is_dir():
        raise DatasetError(f"{path}: no dataset folder here; {collect_hint}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: missing, so the dataset is incomplete; {collect_hint}")
    try:
        meta = json.loads(meta_path.read_text())
        declared = meta["arrays"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(f"{meta_path}: corrupt ({error}); {collect_hint}") from error
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format_version {meta['format_version']} is newer than this code")
    if task is not None and meta.get("task") != task:
        raise DatasetError(f"{meta_path}: dataset is for task {meta.get('task')!r}, expected {task!r}")
    arrays = {}
    for name in ARRAYS + tuple(n for n in OPTIONAL_ARRAYS if n in declared):
        file = path / f"{name}.npy"
        if not file.is_file():
            raise DatasetError(f"{file}: missing; {collect_hint}")
        try:
            arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DatasetError(f"{file}: cannot be read ({error}); the file is truncated or corrupt; "
                               f"{collect_hint}") from error
        expected = declared.get(name, {})
        if list(arrays[name].shape) != expected.get("shape") or str(arrays[name].dtype) != expected.get("dtype"):
            raise DatasetError(f"{file}: shape {arrays[name].shape} / {arrays[name].dtype} does not match meta.json "
                               f"({expected}); the dataset is damaged; {collect_hint}")
    starts = np.asarray(arrays["episode_starts"])
    steps = len(arrays["actions"])
    if starts[0] != 0 or starts[-1] != steps or (np.diff(starts) <= 0).any():
        raise DatasetError(f"{path / 'episode_starts.npy'}: offsets do not cover the {steps} steps; {collect_hint}")
    rewards = np.asarray(arrays["rewards"], dtype=np.float32)
    # Return-to-go: the sum of this and all later rewards of the same episode (undiscounted).
    returns_to_go = np.empty_like(rewards)
    for first, end in zip(starts[:-1], starts[1:]):
        returns_to_go[first:end] = np.cumsum(rewards[first:end][::-1])[::-1]
    for name in ("observations", "rewards") + OPTIONAL_ARRAYS:
        if name in arrays and len(arrays[name]) != steps:
            raise DatasetError(f"{path / (name + '.npy')}: {len(arrays[name])} rows for {steps} steps; {collect_hint}")
    return Dataset(path, meta, arrays["observations"], arrays["actions"], rewards, starts, returns_to_go,
                   labels=arrays.get("labels"), aux_labels=arrays.get("aux_labels"))

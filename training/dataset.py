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
    aux_labels.npy       (steps,) int64        optional: the task's auxiliary label at each step
                                               (Task.aux_label, e.g. the cue), for train --aux-weight

Arrays are plain .npy files (memory-mapped on load, never unpickled). The folder is written under
a temporary name and renamed when complete, and meta.json is written last, so an interrupted
collector never leaves something that looks like a dataset. Loading checks every file against
meta.json and raises DatasetError naming the file and the problem.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from rate_core.checkpoint import check_replaceable, recover_folder, replace_folder, staging_folder
from rate_core.model import ACTION_PAD

FORMAT_VERSION = 1
ARRAYS = ("observations", "actions", "rewards", "episode_starts")
OPTIONAL_ARRAYS = ("labels", "aux_labels")
DATASET_FILES = ("meta.json", *(f"{name}.npy" for name in ARRAYS + OPTIONAL_ARRAYS))
"""the files of a dataset folder (write_dataset and DatasetWriter replace no other)"""


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
    with DatasetWriter(path, task) as writer:
        for episode in episodes:
            writer.add_episode(episode)
        return writer.close(settings)


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
    labelled = any(source.labels is not None for source in sources)
    with_aux = all(source.aux_labels is not None for source in sources)
    with DatasetWriter(path, tasks.pop()) as writer:
        for source in sources:
            writer.append("observations", source.observations)
            writer.append("actions", source.actions)
            writer.append("rewards", source.rewards)
            if labelled:
                writer.append("labels", source.actions if source.labels is None else source.labels)
            if with_aux:
                writer.append("aux_labels", source.aux_labels)
        starts = np.concatenate([[0]] + [source.episode_starts[1:] + offset
                                         for source, offset in zip(sources, offsets, strict=True)])
        settings = {"merged_from": [{"path": str(source.path), "episodes": source.num_episodes,
                                     "settings": source.meta.get("settings")} for source in sources]}
        return writer.close(settings, episode_starts=starts)


class DatasetWriter:
    """Writes a dataset folder array by array as the data comes, so the writer never holds more than
    the chunk it is given (the collector adds one episode at a time: 300 Memory Maze episodes are
    3.7 GB of frames). Everything goes into a staging folder beside `path`; close() writes the
    headers, then meta.json, then renames the folder to `path` (replacing one there). Leaving a
    `with` block by an exception, or abort(), removes the staging folder.

        with DatasetWriter("data/tmaze/expert", "tmaze") as writer:
            for episode in episodes:
                writer.add_episode(episode)
            writer.close(settings)
    """

    HEADER_BYTES = 256
    """room kept at the start of each .npy file for its header, written at close() with the final row
    count (a header for a shape of 4 dimensions of any size takes under 128)"""
    BLOCK_BYTES = 1 << 26
    """appended chunks (maybe memory-mapped datasets of several GB) are copied this much at a time"""

    def __init__(self, path: str | os.PathLike, task: str):
        self.path, self.task = Path(path), task
        recover_folder(self.path, "partial")  # what a writer killed mid-write or mid-swap left
        check_replaceable(self.path, "meta.json", "dataset", own=DATASET_FILES)  # before any work: close() replaces it
        self.staging = staging_folder(self.path, "partial")
        self._files = {}  # array name -> open file
        self._layout = {}  # array name -> [dtype, shape of one row, rows written]
        self._lengths = []  # steps of each episode given to add_episode

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()

    def add_episode(self, episode: dict) -> None:
        """Append one episode: observations (T, ...), actions (T,), rewards (T,), and labels (T,) and
        aux_labels (T,) if the first episode had them (then every episode must)."""
        names = ARRAYS[:3] + tuple(name for name in OPTIONAL_ARRAYS if name in episode)
        if self._lengths and set(names) != set(self._layout):
            raise ValueError(f"episode {len(self._lengths)} has {', '.join(names)}, the first had "
                             f"{', '.join(self._layout)}: all episodes or none must have labels and aux_labels")
        steps = len(episode["actions"])
        dtypes = {"actions": np.int64, "rewards": np.float32, "labels": np.int64, "aux_labels": np.int64}
        for name in names:
            values = np.asarray(episode[name], dtype=dtypes.get(name))
            if len(values) != steps:
                raise ValueError(f"episode {len(self._lengths)}: {len(values)} {name} for {steps} actions")
            self.append(name, values)
        self._lengths.append(steps)

    def append(self, name: str, chunk: np.ndarray) -> None:
        """Append rows to the array `name` (its dtype and row shape are those of its first chunk)."""
        if name not in self._files:
            self._files[name] = open(self.staging / f"{name}.npy", "wb")
            self._files[name].write(b"\0" * self.HEADER_BYTES)
            self._layout[name] = [chunk.dtype, chunk.shape[1:], 0]
        dtype, row_shape, _ = self._layout[name]
        if chunk.shape[1:] != row_shape:
            raise ValueError(f"{name}: rows of shape {chunk.shape[1:]} after rows of shape {row_shape}")
        if not np.can_cast(chunk.dtype, dtype, "same_kind"):
            raise ValueError(f"{name}: {chunk.dtype} values after {dtype} ones")
        block = max(1, self.BLOCK_BYTES // max(1, chunk[:1].nbytes))
        for first in range(0, len(chunk), block):
            self._files[name].write(np.ascontiguousarray(chunk[first:first + block], dtype=dtype).data)
        self._layout[name][2] += len(chunk)

    def close(self, settings: dict, episode_starts: np.ndarray | None = None) -> Path:
        """Finish the files and put the folder in place; returns its path. episode_starts: the offsets
        (episodes + 1,) where the arrays were given by append(); by default those of add_episode()."""
        if episode_starts is None:
            if not self._lengths:
                self.abort()
                raise ValueError("no episodes to write")
            episode_starts = np.concatenate([[0], np.cumsum(self._lengths)])
        self.append("episode_starts", np.asarray(episode_starts, dtype=np.int64))
        declared = {}
        for name, file in self._files.items():
            dtype, row_shape, rows = self._layout[name]
            file.seek(0)
            file.write(_npy_header(dtype, (rows, *row_shape), self.HEADER_BYTES))
            file.close()
            declared[name] = {"shape": [rows, *row_shape], "dtype": str(dtype)}
        meta = {
            "format_version": FORMAT_VERSION, "task": self.task, "episodes": len(episode_starts) - 1,
            "steps": declared["actions"]["shape"][0], "settings": settings, "arrays": declared,
        }
        (self.staging / "meta.json").write_text(json.dumps(meta, indent=2))
        check_replaceable(self.path, "meta.json", "dataset", own=DATASET_FILES)  # what appeared there since __init__
        return replace_folder(self.staging, self.path)  # the old dataset is deleted once the new is in place

    def abort(self) -> None:
        """Drop everything written so far."""
        for file in self._files.values():
            file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _npy_header(dtype: np.dtype, shape: tuple, size: int) -> bytes:
    """A .npy (version 1.0) header of exactly `size` bytes for a C-ordered array."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(n) for n in shape)}).encode("latin1")
    padding = size - 10 - len(text) - 1
    if padding < 0:
        raise ValueError(f"a .npy header for shape {shape} does not fit in {size} bytes")
    return b"\x93NUMPY\x01\x00" + (size - 10).to_bytes(2, "little") + text + b" " * padding + b"\n"


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

    def fingerprint(self) -> str:
        """A short hash of what the dataset is (its meta.json, where each episode starts and every reward):
        another collection at the same path differs (train --resume refuses it)."""
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for array in (self.episode_starts, self.rewards):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

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
    recover_folder(path, "partial")  # a writer killed while it swapped a new folder in: the newest whole one goes there
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
    for first, end in pairwise(starts):
        returns_to_go[first:end] = np.cumsum(rewards[first:end][::-1])[::-1]
    for name in ("observations", "rewards") + OPTIONAL_ARRAYS:
        if name in arrays and len(arrays[name]) != steps:
            raise DatasetError(f"{path / (name + '.npy')}: {len(arrays[name])} rows for {steps} steps; {collect_hint}")
    return Dataset(path, meta, arrays["observations"], arrays["actions"], rewards, starts, returns_to_go,
                   labels=arrays.get("labels"), aux_labels=arrays.get("aux_labels"))


if __name__ == "__main__":
    raise SystemExit("training.dataset reads and writes datasets (the format is in its docstring); it has no "
                     "command of its own: python -m training.collect --help makes one, training.merge joins them")

"""Checkpoints: a folder with `config.json` and `model.safetensors`, the Hugging Face Hub layout.

config.json holds {"format_version", "model_config", "task", "training"} so that
`MemoryTransformer.from_pretrained(folder)` (PyTorchModelHubMixin) rebuilds the same model.
Weights are safetensors: loading never unpickles. Every problem with a folder raises
CheckpointError naming the file and what is wrong with it.
"""

import contextlib
import functools
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from rate_core.model import MemoryTransformer, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
TRAINING_STATE_NAMES = ("train_state.json", "train_state.safetensors")
"""what training.train writes beside a checkpoint in a run's `last` folder (its resume point)"""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the file and the problem."""


def resolve_device(choice: str | torch.device = "auto") -> torch.device:
    """The torch device for `choice`: auto (cuda when there is one), cpu, cuda, cuda:N, or any other
    device torch knows (mps, ...). ValueError, saying what to use, for a name torch does not know or a
    CUDA device this machine does not have."""
    if str(choice) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {choice!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {choice}: this machine has no CUDA device (torch sees none); use cpu or auto")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {choice}: this machine has {count} CUDA device{'s' * (count > 1)} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def checkpoint_config(model: MemoryTransformer) -> dict:
    """The JSON-able content of config.json for `model`."""
    return {
        "format_version": FORMAT_VERSION,
        "model_config": asdict(model.config),
        "task": model.task,
        "training": model.training_info,
    }


def model_card(model: MemoryTransformer) -> str:
    """A short Hub model card: what the checkpoint is and how to load it."""
    c = model.config
    training = "".join(f"- {key}: {value}\n" for key, value in sorted(model.training_info.items())) or "- none\n"
    return (f"---\nlibrary_name: rate_core\ntags:\n- offline-rl\n- {c.mode}\n- {model.task or 'untrained'}\n---\n\n"
            f"# {c.mode.upper()} for {model.task or 'no task'}\n\n"
            f"A {c.mode} memory transformer (rate_core): {c.n_layer} layers of width {c.d_model}, {c.n_head} heads of "
            f"{c.d_head}, {c.num_mem_tokens} memory tokens, Transformer-XL cache {c.mem_len}, segments of "
            f"{c.segment_steps} steps; {model.num_parameters():,} parameters.\n\n"
            f"```python\nfrom rate_core.checkpoint import load_checkpoint\nmodel = load_checkpoint(folder)\n```\n\n"
            f"Training:\n{training}")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def check_replaceable(directory: str | os.PathLike, marker: str, what: str, training_state: bool = False,
                      own: tuple[str, ...] | None = None) -> None:
    """Raise ValueError unless writing a new `what` (e.g. "checkpoint") to `directory` loses nothing but an
    older `what`: the folder does not exist, is empty, or holds a `what` (its `marker` file, no subfolders)
    and, unless the new one brings its own (training_state), no training run's resume point; own: the
    names of the files a `what` holds, where no other file may be lost (an eval.json of the checkpoint
    there, a note; None: any file). Never the working folder or a folder above it."""
    directory = Path(directory)
    resolved, here = directory.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise ValueError(f"{directory} is the working folder or a folder above it; write the {what} to a new folder")
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; write the {what} to a folder")
    entries = list(directory.iterdir())
    if not entries:
        return
    problem = f"no {marker}" if not (directory / marker).is_file() else \
        "subfolders" if any(entry.is_dir() for entry in entries) else None
    if problem:
        raise ValueError(f"{directory} exists and is not a {what} (it has {problem}); writing the {what} there "
                         f"would delete what it holds: give a new folder, or remove this one yourself")
    if not training_state and any((directory / name).exists() for name in TRAINING_STATE_NAMES):
        raise ValueError(f"{directory} is a training run's resume point ({TRAINING_STATE_NAMES[0]}: what train "
                         f"--resume continues from); writing a {what} there would lose it: give another folder")
    others = sorted(entry.name for entry in entries if own is not None and entry.name not in own)
    if others:
        raise ValueError(f"{directory} holds {', '.join(others[:4])}{' and more' * (len(others) > 4)} beside its "
                         f"{what}, which writing a new {what} there would delete (an eval.json belongs to the "
                         f"{what} there): give a new folder, or move them away yourself")


def remove_orphans(parent: str | os.PathLike, prefix: str) -> None:
    """Remove the folders `parent`/`prefix`WRITER that a process killed mid-write left (see _orphans):
    staging folders are named by their writer (writer_id)."""
    for path in _orphans(parent, prefix):
        shutil.rmtree(path, ignore_errors=True)


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where that cannot be read
    (no such process, no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after the command's name and state


def writer_id() -> str:
    """This process's name for the folders it writes: PID-START, its process id and when it started, so
    that a later process given the same id (a restarted container's, whose first process is always
    the same number; or any once ids wrap around) does not take a dead writer's folders for its own,
    or for a live writer's. Where the start cannot be read, the process id alone."""
    return _writer_id(os.getpid())  # per process id: a forked child is another writer


@functools.lru_cache(maxsize=4)
def _writer_id(pid: int) -> str:
    start = _process_start(pid)
    return f"{pid}-{start}" if start else str(pid)


def _writer_alive(writer: str) -> bool:
    """Whether the process that named a folder `writer` (writer_id; older folders: PID) may still be
    writing it: it is this process, or its process id runs a process that started when it did."""
    if writer == writer_id():
        return True
    pid, _, start = writer.partition("-")
    if int(pid) == os.getpid() or not _running(int(pid)):
        return False  # this process's id, but another start (or none): the writer before it, gone
    if start:
        now = _process_start(int(pid))
        return now is None or now == start  # another process under the writer's id: the writer is gone
    return True  # a folder of the older kind, by a running process id: maybe its writer, left alone


def _orphans(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """The folders `parent`/`prefix`WRITER of writers no longer running, newest first."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    for path in parent.iterdir():
        writer = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if re.fullmatch(r"\d+(-\d+)?", writer) and not _writer_alive(writer):
            try:
                found.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # recovered meanwhile by another process
                pass
    return [path for _, path in sorted(found, reverse=True)]


def staging_folder(directory: str | os.PathLike, kind: str = "staging") -> Path:
    """A new empty folder .NAME.<kind>-WRITER beside `directory` (writer_id), to build its replacement in
    (then replace_folder); recover_folder(directory, kind) removes one that a killed writer left."""
    directory = Path(directory)
    staging = directory.parent / f".{directory.name}.{kind}-{writer_id()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def replace_folder(complete: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Put the finished folder `complete` (a staging folder beside `directory`) in place of `directory`.
    Two renames cannot be one, so the swap goes through names a kill can leave behind: `complete` is
    renamed .NAME.ready-WRITER, the old folder .NAME.retired-WRITER, then ready -> NAME. recover_folder puts
    whichever is whole back at NAME (the new one if it was ready), so a kill at any moment leaves the
    old or the new folder, found at NAME by the next reader or writer."""
    directory = Path(directory)
    ready = directory.parent / f".{directory.name}.ready-{writer_id()}"
    shutil.rmtree(ready, ignore_errors=True)
    os.replace(complete, ready)
    _swap_in(ready, directory)
    return directory


def _swap_in(ready: Path, directory: Path) -> None:
    retired = directory.parent / f".{directory.name}.retired-{writer_id()}"
    shutil.rmtree(retired, ignore_errors=True)
    if directory.exists():
        os.replace(directory, retired)
    os.replace(ready, directory)
    shutil.rmtree(retired, ignore_errors=True)


def recover_folder(directory: str | os.PathLike, staging: str = "staging") -> None:
    """Finish or undo a replace_folder that a killed process left half done beside `directory`: its
    ready folder (complete, the newer) goes in place, else its retired one (the older) goes back if
    `directory` is missing; the rest, and unfinished `.NAME.<staging>-WRITER` folders, are removed.
    Only folders of writers no longer running are touched (see writer_id), and a ready folder older
    than the folder in place is not put back over it. Nothing happens where the folder cannot be
    written (a read-only checkout)."""
    directory = Path(directory)
    leftovers = tuple(f".{directory.name}.{kind}-" for kind in ("ready", "retired", staging))
    try:  # one look at the folder: nothing named as a leftover (the usual case) needs no lock and no more
        if not any(entry.name.startswith(leftovers) for entry in directory.parent.iterdir()):
            return
    except OSError:  # no such folder (yet)
        return
    try:
        # one recovery at a time: readers that found the same leftovers at once (torchrun's processes loading
        # an --init checkpoint) would otherwise swap twice, the second moving the recovered folder away
        with _folder_lock(directory.parent):
            for ready in _orphans(directory.parent, f".{directory.name}.ready-")[:1]:
                if not directory.exists() or _made(ready) >= _made(directory):
                    _swap_in(ready, directory)
            for retired in _orphans(directory.parent, f".{directory.name}.retired-"):
                if not directory.exists():
                    os.replace(retired, directory)
                else:
                    shutil.rmtree(retired, ignore_errors=True)
            for kind in ("ready", staging):
                remove_orphans(directory.parent, f".{directory.name}.{kind}-")
    except OSError:  # a folder we may not write
        pass


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on `folder` (flock on the folder itself: no lock file to leave behind) while the
    block runs; other processes taking it wait. Where there is no flock (another OS, some network file
    systems), the block runs unlocked."""
    try:
        import fcntl

        handle = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(handle)  # releases the lock


def _made(folder: Path) -> int:
    """When `folder` was written (ns): its oldest file's time, which files added later (evaluate's
    eval.json beside a checkpoint) do not change; a folder's own time changes with renames."""
    return min((path.stat().st_mtime_ns for path in folder.iterdir()), default=folder.stat().st_mtime_ns)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", *TRAINING_STATE_NAMES)
"""the files save_checkpoint writes (the training state: with train's `extra`)"""


def save_checkpoint(model: MemoryTransformer, directory: str | os.PathLike, extra=None,
                    replace_others: bool = False) -> Path:
    """Write `model` to `directory` atomically: a kill at any moment leaves either the previous
    complete checkpoint or the new complete one, never a mix or a half-written file. A folder there
    that is not a checkpoint, or one with other files beside its checkpoint (its eval.json), is left
    alone (ValueError, see check_replaceable), unless replace_others (train's own run folders, where an
    eval.json of the weights replaced would be stale).
    extra: optional callable(folder) that writes more files (e.g. training state) into the same folder."""
    directory = Path(directory)
    if not isinstance(model.task, str):
        raise ValueError(f"the model's task must be a task name (a string), got {model.task!r}")
    config = checkpoint_config(model)
    try:  # before anything is written: metadata that JSON cannot hold (numpy numbers, paths) fails here
        json.dumps(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the model's training metadata cannot be saved as JSON ({error}); use plain numbers, "
                         f"strings, lists and dicts") from None
    recover_folder(directory)  # what a writer killed mid-swap left, so that the check sees the folder it left
    check_replaceable(directory, CONFIG_NAME, "checkpoint", training_state=extra is not None,
                      own=None if replace_others else CHECKPOINT_FILES)
    staging = staging_folder(directory)
    try:
        (staging / "README.md").write_text(model_card(model))  # save_pretrained keeps an existing card
        model.save_pretrained(staging, config=config)
        if extra is not None:
            extra(staging)
        readable = 0o666 & ~_umask()  # safetensors writes its files 0600; give every file the usual mode
        for path in staging.iterdir():
            os.chmod(path, readable)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:  # a full disk, a failing `extra`, Ctrl-C: no staging folder left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_folder(staging, directory)


RUN_FOLDERS = {"model": "the finished model", "last": "the last whole epoch, to resume from"}


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """Parse and check config.json of a checkpoint folder; returns the dict with `model_config`
    turned into a ModelConfig."""
    directory = Path(directory)
    if directory.is_file():
        hint = f"; give its folder {directory.parent}" if directory.name in (CONFIG_NAME, WEIGHTS_NAME) else ""
        raise CheckpointError(f"{directory}: a file, not a checkpoint folder (expected a folder with "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}){hint}")
    recover_folder(directory)  # a writer killed while it swapped a new folder in: the newest whole one goes there
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder does not exist (expected a folder with "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        inside = [name for name in ("model", "last") if (directory / name / CONFIG_NAME).is_file()]
        if inside:  # train's --out: the checkpoints are in it
            raise CheckpointError(f"{directory}: a training run's folder, not a checkpoint; give the checkpoint in it: "
                                  + " or ".join(f"{directory / name} ({RUN_FOLDERS[name]})" for name in inside))
        raise CheckpointError(f"{config_path}: missing; a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error}); the file is truncated or corrupt") from error
    if not isinstance(config, dict) or not isinstance(config.get("model_config"), dict):
        raise CheckpointError(f"{config_path}: no 'model_config' object; this is not a rate_core checkpoint")
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int):
        raise CheckpointError(f"{config_path}: format_version must be a whole number, got {version!r}")
    if not isinstance(config.get("task", ""), str):
        raise CheckpointError(f"{config_path}: 'task' must be a task name, got {config['task']!r}")
    if not isinstance(config.get("training") or {}, dict):
        raise CheckpointError(f"{config_path}: 'training' must be an object of metadata, got {config['training']!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {version} is newer than this rate_core "
                              f"({FORMAT_VERSION}); upgrade rate_core")
    try:
        config["model_config"] = ModelConfig(**config["model_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: bad model_config: {error}") from error
    return config


def load_checkpoint(directory: str | os.PathLike, task: str | None = None, mode: str | None = None,
                    device: str | torch.device = "cpu") -> MemoryTransformer:
    """Load a checkpoint folder into a MemoryTransformer in eval mode on `device`.

    task, mode: when given, the checkpoint must have been trained for that task / in that mode.
    device: cpu, cuda, cuda:N or auto (resolve_device; ValueError for one this machine lacks).
    Raises CheckpointError for a missing folder or file, a corrupt or truncated file, weights that
    do not match the config, or a different task or mode.
    """
    device = resolve_device(device)
    if str(directory).startswith("hf://"):
        raise CheckpointError(f"{directory}: a Hugging Face Hub reference, not a folder; load it with "
                              f"rate_core.hub.load_reference({str(directory)!r}) or "
                              f"MemoryTransformer.from_pretrained({str(directory)[5:]!r})")
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    config_path = directory / CONFIG_NAME
    model_config = config["model_config"]
    if task is not None and config.get("task") != task:
        raise CheckpointError(f"{config_path}: checkpoint is for task {config.get('task')!r}, expected {task!r}: "
                              f"use a checkpoint trained on {task}")
    if mode is not None and model_config.mode != mode:
        raise CheckpointError(f"{config_path}: checkpoint is a {model_config.mode!r} model, expected {mode!r}")

    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    def unreadable(error):
        return CheckpointError(f"{weights_path}: cannot be read ({error}); the file is truncated or corrupt")

    try:  # the names and shapes first, from the file's header: a wrong or huge file is refused before it is read
        with safe_open(weights_path, framework="pt") as header:
            shapes = {name: tuple(header.get_slice(name).get_shape()) for name in header.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise unreadable(error) from error
    with torch.device("meta"):  # shapes without memory: a config edited to a huge width must not take the RAM
        expected = MemoryTransformer(model_config).state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong_shape = [f"{k}: file {shapes[k]} vs config {tuple(v.shape)}"
                   for k, v in expected.items() if k in shapes and shapes[k] != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        details = "; ".join(filter(None, [
            f"missing tensors {missing[:5]}" if missing else "",
            f"unexpected tensors {unexpected[:5]}" if unexpected else "",
            f"wrong shapes {wrong_shape[:5]}" if wrong_shape else "",
        ]))
        raise CheckpointError(f"{weights_path}: does not match {CONFIG_NAME} ({details})")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise unreadable(error) from error
    # bytes that still parse can be garbage, and a diverged run saves NaN: one cheap pass over the weights
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{weights_path}: tensor {bad[0]!r} holds NaN or infinite values{more}; the file is "
                              f"corrupt or the training diverged")
    model = MemoryTransformer(model_config, task=config.get("task", ""), training=config.get("training"))
    model.load_state_dict(state)
    return model.to(device).eval()

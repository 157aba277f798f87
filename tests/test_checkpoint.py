"""Checkpoint folders: round trips (ours and the Hub mixin's) and a clear error for each bad case."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rate_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rate_core.model import MemoryTransformer
from tests.tiny import random_batch, sample_logits, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("rate_cached", obs_kind="image", obs_shape=(3, 64, 64))
    model.training_info = {"epochs": 3, "dataset": "unit"}
    directory = save_checkpoint(model, tmp_path / "ckpt")
    return model, directory


def test_round_trip_gives_identical_outputs(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith("README")) == \
        ["config.json", "model.safetensors"]
    loaded = load_checkpoint(directory, task="unit_test", mode="rate")
    assert loaded.config == model.config and loaded.task == "unit_test"
    assert loaded.training_info == {"epochs": 3, "dataset": "unit"}
    assert not loaded.training
    batch = random_batch(model.config)
    with torch.no_grad():
        assert torch.equal(sample_logits(model, *batch), sample_logits(loaded, *batch))


def test_hub_mixin_round_trip(tmp_path, saved):
    model, directory = saved
    loaded = MemoryTransformer.from_pretrained(directory)
    batch = random_batch(model.config)
    with torch.no_grad():
        assert torch.equal(sample_logits(model, *batch), sample_logits(loaded, *batch))
    # A folder written by the mixin's own save_pretrained loads through ours.
    model.save_pretrained(tmp_path / "mixin")
    again = load_checkpoint(tmp_path / "mixin")
    assert again.config == model.config and again.task == "unit_test"
    with torch.no_grad():
        assert torch.equal(sample_logits(model, *batch), sample_logits(again, *batch))


def test_saving_over_a_checkpoint_replaces_it_and_leaves_no_debris(saved):
    model, directory = saved
    other = tiny_model("rate_cached", seed=5, obs_kind="image", obs_shape=(3, 64, 64))
    save_checkpoint(other, directory)
    loaded = load_checkpoint(directory)
    assert torch.equal(loaded.head.weight, other.head.weight)
    assert [p.name for p in directory.parent.iterdir()] == ["ckpt"]


KILLED_MID_SWAP = """
import os, sys
from pathlib import Path
from rate_core.checkpoint import save_checkpoint
from tests.tiny import tiny_model

directory, at = Path(sys.argv[1]), sys.argv[2]
real_replace = os.replace

def replace(source, target):  # the kill: before the rename named `at`
    if (at == "retire" and Path(source) == directory) or (at == "swap-in" and Path(target) == directory):
        os._exit(9)
    real_replace(source, target)

os.replace = replace
save_checkpoint(tiny_model("rate_cached", seed=5, obs_kind="image", obs_shape=(3, 64, 64)), directory)
"""


@pytest.mark.parametrize("at", ["retire", "swap-in"])
def test_a_save_killed_between_its_renames_leaves_the_new_checkpoint_for_the_next_reader(saved, at):
    _, directory = saved
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(directory), at], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    left = sorted(p.name for p in directory.parent.iterdir())
    assert any(".ready-" in name for name in left), left  # the new checkpoint, whole, beside the folder
    assert ("ckpt" in left) is (at == "retire")  # killed after the old one was retired: no ckpt folder at all
    assert any(".retired-" in name for name in left) is (at == "swap-in")
    loaded = load_checkpoint(directory)  # the reader finishes the swap
    assert torch.equal(loaded.head.weight, tiny_model("rate_cached", seed=5, obs_kind="image",
                                                      obs_shape=(3, 64, 64)).head.weight)
    assert [p.name for p in directory.parent.iterdir()] == ["ckpt"]




def test_a_checkpoint_with_other_files_beside_it_is_not_replaced_unless_asked(saved):
    model, directory = saved
    (directory / "eval.json").write_text("{}")  # its evaluation (minutes of work), or a note
    with pytest.raises(ValueError, match=r"holds eval.json beside its checkpoint, which writing a new checkpoint "
                                         r"there would delete .*give a new folder, or move them away yourself"):
        save_checkpoint(tiny_model("rate_cached", seed=5, obs_kind="image", obs_shape=(3, 64, 64)), directory)
    assert (directory / "eval.json").exists() and torch.equal(_weights(directory), model.head.weight)
    save_checkpoint(model, directory, replace_others=True)  # train's own run folders: a stale eval.json goes
    assert not (directory / "eval.json").exists()

def _weights(directory):
    return load_checkpoint(directory).head.weight


def test_a_dead_writers_folder_is_recovered_even_under_a_process_id_in_use(saved):
    # killed writers' ready folders (a complete new checkpoint each, the folder itself missing), named by a process
    # id that is in use again: this process's own (a restarted container's first process has the same id as the
    # killed one's) and a live process's; and an older kind of name, the bare process id
    import shutil

    from rate_core.checkpoint import _process_start, writer_id

    _, directory = saved
    new = tiny_model("rate_cached", seed=5, obs_kind="image", obs_shape=(3, 64, 64))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        while _process_start(sleeper.pid) is None:
            pass
        for writer in (f"{os.getpid()}-1", f"{sleeper.pid}-1", str(os.getpid())):
            save_checkpoint(new, directory.parent / "new")
            shutil.rmtree(directory)
            (directory.parent / "new").rename(directory.parent / f".ckpt.ready-{writer}")
            assert torch.equal(_weights(directory), new.head.weight), writer  # the reader finished the swap
            assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]
        # a live writer's folders are its own: not touched (this process's, and the sleeper's with its start)
        for writer in (writer_id(), f"{sleeper.pid}-{_process_start(sleeper.pid)}"):
            (directory.parent / f".ckpt.ready-{writer}").mkdir()
            load_checkpoint(directory)
            assert (directory.parent / f".ckpt.ready-{writer}").exists(), writer
            (directory.parent / f".ckpt.ready-{writer}").rmdir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_writers_ready_folder_older_than_the_folder_in_place_is_not_put_back(saved):
    model, directory = saved
    old = directory.parent / ".ckpt.ready-999999999-1"  # no process has this id
    save_checkpoint(tiny_model("rate_cached", seed=5, obs_kind="image", obs_shape=(3, 64, 64)), directory.parent / "x")
    (directory.parent / "x").rename(old)
    newest = max(path.stat().st_mtime_ns for path in directory.iterdir())
    for path in old.iterdir():  # written before the checkpoint in place
        os.utime(path, ns=(newest - 10**9, newest - 10**9))
    assert torch.equal(_weights(directory), model.head.weight)  # not rolled back to the dead writer's
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]
    # a newer one is put in place although a file was added to the folder in place after it was written
    newer = tiny_model("rate_cached", seed=7, obs_kind="image", obs_shape=(3, 64, 64))
    save_checkpoint(newer, directory.parent / "x")
    (directory.parent / "x").rename(old)
    (directory / "eval.json").write_text("{}")  # evaluate's, after the dead writer's checkpoint was made
    assert torch.equal(_weights(directory), newer.head.weight)


WAITS_FOR_THE_LOCK = """
import sys, time
from rate_core.checkpoint import load_checkpoint
started = time.monotonic()
load_checkpoint(sys.argv[1])
print(time.monotonic() - started)
"""


def test_readers_recovering_one_folder_at_once_take_turns(saved):
    # two readers that find a dead writer's ready folder at the same moment would both swap it in, the second
    # moving the first's result away ("checkpoint folder does not exist": 1 trial in 30 of 4 readers): the
    # recovery holds a lock on the folder's parent, so a second reader waits and then finds nothing to do
    from rate_core.checkpoint import _folder_lock

    _, directory = saved
    new = tiny_model("rate_cached", seed=5, obs_kind="image", obs_shape=(3, 64, 64))
    save_checkpoint(new, directory.parent / "x")
    (directory.parent / "x").rename(directory.parent / ".ckpt.ready-999999999-1")
    root = Path(__file__).resolve().parents[1]
    with _folder_lock(directory.parent):  # another reader recovering
        reader = subprocess.Popen([sys.executable, "-c", WAITS_FOR_THE_LOCK, str(directory)], cwd=root,
                                  env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True)
        try:
            reader.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
        assert reader.poll() is None  # waiting for the lock
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and float(out) >= 0  # then recovered, once
    assert torch.equal(_weights(directory), new.head.weight)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]

def test_checkpoint_files_get_the_mode_of_ordinary_files(saved, tmp_path):
    _, directory = saved
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    modes = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
    assert modes["model.safetensors"] == ordinary.stat().st_mode & 0o777, modes
    assert len(set(modes.values())) == 1, modes


def test_config_holds_model_task_and_training(saved):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    assert config["task"] == "unit_test" and config["format_version"] == 1
    assert config["model_config"]["mode"] == "rate" and config["model_config"]["obs_shape"] == [3, 64, 64]
    assert config["training"] == {"epochs": 3, "dataset": "unit"}


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_files(saved):
    _, directory = saved
    os.remove(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(directory)
    os.remove(directory / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(directory)


def test_truncated_weights(saved):
    _, directory = saved
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read.*truncated or corrupt"):
        load_checkpoint(directory)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read"):
        load_checkpoint(directory)


def test_corrupt_config(saved):
    _, directory = saved
    path = directory / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(directory)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(CheckpointError, match=r"config\.json: no 'model_config'"):
        load_checkpoint(directory)
    path.write_text(json.dumps({"model_config": {"mode": "rate", "num_mem_tokens": 0}}))
    with pytest.raises(CheckpointError, match=r"config\.json: bad model_config.*num_mem_tokens"):
        load_checkpoint(directory)
    path.write_text(json.dumps({"model_config": {"mode": "rate", "d_modle": 3}}))
    with pytest.raises(CheckpointError, match=r"config\.json: bad model_config.*d_modle"):
        load_checkpoint(directory)


def test_weights_that_do_not_match_the_config(saved):
    _, directory = saved
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["model_config"]["d_head"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match config\.json.*wrong shapes"):
        load_checkpoint(directory)
    config["model_config"]["d_head"] = 8
    config["model_config"]["n_layer"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match config\.json.*missing tensors"):
        load_checkpoint(directory)
    config["model_config"]["n_layer"] = 2
    config["model_config"]["d_model"] = 10**8  # the model of this config would take terabytes: never built
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong shapes.*vs config \(100000000,"):
        load_checkpoint(directory)


def test_wrong_task_or_mode(saved):
    _, directory = saved
    with pytest.raises(CheckpointError, match=r"config\.json: checkpoint is for task 'unit_test', expected 'tmaze'"):
        load_checkpoint(directory, task="tmaze")
    with pytest.raises(CheckpointError, match=r"config\.json: checkpoint is a 'rate' model, expected 'dt'"):
        load_checkpoint(directory, mode="dt")


def test_loading_never_unpickles(saved, monkeypatch):
    _, directory = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(directory)
    MemoryTransformer.from_pretrained(directory)


def test_averaging_checkpoints_takes_the_weighted_mean_of_every_float_tensor(tmp_path, capsys):
    from training.average import Args, main

    first, second = tiny_model("rate", seed=0), tiny_model("rate", seed=1)
    save_checkpoint(first, tmp_path / "a")
    save_checkpoint(second, tmp_path / "b")
    main(Args(sources=(tmp_path / "a", tmp_path / "b"), out=tmp_path / "soup", weights=(1.0, 3.0)))
    soup = load_checkpoint(tmp_path / "soup")
    assert "average of 2 checkpoints" in capsys.readouterr().out
    a, b, mixed = first.state_dict(), second.state_dict(), soup.state_dict()
    assert set(mixed) == set(a)
    floats = [key for key in a if a[key].is_floating_point()]
    assert floats and not torch.equal(a[floats[0]], b[floats[0]])
    for key in floats:
        assert torch.allclose(mixed[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-6), key
    assert [(s["checkpoint"], s["weight"]) for s in soup.training_info["average_of"]] == [
        (str(tmp_path / "a"), 0.25), (str(tmp_path / "b"), 0.75)]
    # a checkpoint averaged with itself is itself: the same actions' logits
    main(Args(sources=(tmp_path / "a", tmp_path / "a"), out=tmp_path / "self"))
    batch = random_batch(first.config)
    assert torch.allclose(sample_logits(load_checkpoint(tmp_path / "self"), *batch),
                          sample_logits(first, *batch), atol=1e-5)


def test_averaging_refuses_different_models_and_bad_arguments(tmp_path):
    from training.average import Args, main

    save_checkpoint(tiny_model("rate", seed=0), tmp_path / "a")
    save_checkpoint(tiny_model("rate", seed=1, d_model=32, d_inner=64), tmp_path / "wide")
    save_checkpoint(tiny_model("dt", seed=0), tmp_path / "dt")
    other_task = tiny_model("rate", seed=2)
    other_task.task = "tmaze"
    save_checkpoint(other_task, tmp_path / "other_task")
    with pytest.raises(SystemExit, match=r"model config differs .*d_inner.*d_model"):
        main(Args(sources=(tmp_path / "a", tmp_path / "wide"), out=tmp_path / "x"))
    with pytest.raises(SystemExit, match="model config differs"):
        main(Args(sources=(tmp_path / "a", tmp_path / "dt"), out=tmp_path / "x"))
    with pytest.raises(SystemExit, match="task 'tmaze' differs"):
        main(Args(sources=(tmp_path / "a", tmp_path / "other_task"), out=tmp_path / "x"))
    with pytest.raises(SystemExit, match="at least two"):
        main(Args(sources=(tmp_path / "a",), out=tmp_path / "x"))
    with pytest.raises(SystemExit, match="one weight per checkpoint"):
        main(Args(sources=(tmp_path / "a", tmp_path / "a"), out=tmp_path / "x", weights=(1.0,)))
    with pytest.raises(SystemExit, match="non-negative"):
        main(Args(sources=(tmp_path / "a", tmp_path / "a"), out=tmp_path / "x", weights=(1.0, -1.0)))
    with pytest.raises(SystemExit, match="must be finite"):
        main(Args(sources=(tmp_path / "a", tmp_path / "a"), out=tmp_path / "x", weights=(float("nan"), 1.0)))
    run_last = tmp_path / "run" / "last"  # a run's resume point: a checkpoint and its training state
    save_checkpoint(tiny_model("rate", seed=0), run_last,
                    extra=lambda folder: (folder / "train_state.json").write_text("{}"))
    with pytest.raises(SystemExit, match="resume point .* would lose it"):
        main(Args(sources=(tmp_path / "a", tmp_path / "a"), out=run_last))
    assert (run_last / "train_state.json").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        main(Args(sources=(tmp_path / "a", tmp_path / "missing"), out=tmp_path / "x"))
    with pytest.raises(SystemExit, match="one of the sources"):
        main(Args(sources=(tmp_path / "a", tmp_path / "wide"), out=tmp_path / "a"))
    assert not (tmp_path / "x").exists()


def test_a_file_is_not_taken_for_a_missing_folder(saved):
    _, directory = saved
    with pytest.raises(CheckpointError, match=r"config\.json: a file, not a checkpoint folder .*give its folder"):
        load_checkpoint(directory / "config.json")


def test_a_task_that_is_not_a_name(saved):
    _, directory = saved
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "task": 7}))
    with pytest.raises(CheckpointError, match=r"config\.json: 'task' must be a task name, got 7"):
        load_checkpoint(directory)
    path.write_text(json.dumps({**config, "format_version": "one"}))
    with pytest.raises(CheckpointError, match=r"config\.json: format_version must be a whole number, got 'one'"):
        load_checkpoint(directory)


def _poison(path, fill=b"\xff"):
    """Overwrite every tensor byte of a safetensors file (after its 8-byte length and JSON header); 0xFF is NaN."""
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:start] + fill * (len(data) - start))


def test_weights_that_are_not_finite(saved):
    model, directory = saved
    _poison(directory / "model.safetensors")  # still parses: every float is NaN
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '[\w.]+' holds NaN or infinite values "
                                              r"\(and \d+ more tensors\); the file is corrupt"):
        load_checkpoint(directory)
    with torch.no_grad():
        model.head.weight[1, 2] = float("inf")
    save_checkpoint(model, directory)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'head\.weight' holds NaN or infinite "
                                              r"values; the file is corrupt or the training diverged"):
        load_checkpoint(directory)


def test_from_pretrained_of_a_local_folder_validates_like_load_checkpoint(saved, tmp_path, monkeypatch, caplog):
    """The Hub mixin reads config.json itself; ours must see every bad folder first, with the same message."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, directory = saved
    path = directory / "config.json"
    config = path.read_text()

    def same_error(folder):
        with pytest.raises(CheckpointError) as ours:
            load_checkpoint(folder)
        with pytest.raises(CheckpointError) as mixin:
            MemoryTransformer.from_pretrained(folder)
        assert str(mixin.value) == str(ours.value)
        return str(ours.value)

    assert same_error(tmp_path / "nowhere").endswith("nowhere: checkpoint folder does not exist (expected a folder "
                                                     "with config.json and model.safetensors)")
    path.write_text(config[:40])
    assert "config.json: not valid JSON" in same_error(directory)
    path.write_text("[1, 2]")
    assert "config.json: no 'model_config' object" in same_error(directory)
    path.unlink()
    assert same_error(directory) == f"{path}: missing; a checkpoint folder needs config.json and model.safetensors"
    save_checkpoint(tiny_model("rate"), tmp_path / "run" / "model")  # train's --out, given for its model
    assert same_error(tmp_path / "run") == (f"{tmp_path / 'run'}: a training run's folder, not a checkpoint; give the "
                                            f"checkpoint in it: {tmp_path / 'run' / 'model'} (the finished model)")
    assert "not found" not in caplog.text  # nor the mixin's own warning
    monkeypatch.chdir(tmp_path)  # a relative path that is not here could be a Hub repository: say both
    with pytest.raises(CheckpointError, match=r"^runs/missing: no such checkpoint folder here, and not in the local "
                                              r"Hugging Face cache"):
        MemoryTransformer.from_pretrained("runs/missing")


def test_config_values_of_the_wrong_type_are_checkpoint_errors(saved):
    _, directory = saved
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "model_config": {**config["model_config"], "n_layer": 2.0}}))
    with pytest.raises(CheckpointError, match=r"config\.json: bad model_config: .*n_layer must be a whole number"):
        load_checkpoint(directory)
    path.write_text(json.dumps({**config, "training": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"config\.json: 'training' must be an object of metadata"):
        load_checkpoint(directory)


def test_saving_metadata_json_cannot_hold_writes_nothing(tmp_path):
    import numpy as np

    model = tiny_model("rate")
    model.training_info = {"learning_rate": np.float32(1e-3)}
    with pytest.raises(ValueError, match="training metadata cannot be saved as JSON"):
        save_checkpoint(model, tmp_path / "run")
    model.training_info, model.task = {}, 5
    with pytest.raises(ValueError, match="task must be a task name"):
        save_checkpoint(model, tmp_path / "run")
    model.task = "unit_test"

    def failing_extra(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "run", extra=failing_extra)
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def test_a_device_this_machine_lacks_is_named(saved, monkeypatch):
    _, directory = saved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda: this machine has no CUDA device"):
        load_checkpoint(directory, device="cuda")
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or auto, got 'gpu'"):
        load_checkpoint(directory, device="gpu")
    from rate_core.checkpoint import resolve_device

    assert resolve_device("mps").type == "mps"  # the library passes on the devices torch knows
    assert next(load_checkpoint(directory, device="auto").parameters()).device.type == "cpu"


def test_weights_that_do_not_fit_the_config_are_refused_from_the_header_before_they_are_read(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import rate_core.checkpoint as checkpoint

    folder = tmp_path / "foreign"
    save_checkpoint(tiny_model("rate"), folder)
    save_file({"junk": torch.zeros(64, 64)}, folder / "model.safetensors")  # e.g. a large file of another model
    monkeypatch.setattr(checkpoint, "load_file", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(CheckpointError, match=r"does not match config.json \(missing tensors .*unexpected tensors "
                                              r"\['junk'\]"):
        load_checkpoint(folder)

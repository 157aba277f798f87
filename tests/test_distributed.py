"""The trainer under torchrun: 2 CPU processes (gloo) end with the weights of one process on the
same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rate_core.checkpoint import load_checkpoint
from rate_core.tasks import get_task
from training.collect import collect
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("memory_grad", ["bptt", "detached"])  # detached: the MRV gets no gradient in a step
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, memory_grad):
    data = collect(get_task("tmaze"), tmp_path / "data", episodes_per_setting=4, seed=0)  # 12 samples
    common = dict(task="tmaze", model="rate", data=data, epochs=1, batch_size=4, warmup_steps=2, eval_every=0,
                  learning_rate=5e-5,  # Adam turns rounding noise of ~zero gradients into steps of ~lr
                  seed=3, dropout=0.0, memory_grad=memory_grad)
    single = load_checkpoint(train(TrainConfig(out=tmp_path / "one", **common)))
    args = ["--task", "tmaze", "--model", "rate", "--data", str(data), "--epochs", "1", "--batch-size", "4",
            "--warmup-steps", "2", "--learning-rate", "5e-5", "--eval-every", "0", "--seed", "3", "--dropout", "0",
            "--memory-grad", memory_grad, "--out", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "training.train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    double = load_checkpoint(tmp_path / "two" / "model")
    assert double.training_info["processes"] == 2
    for (name, a), b in zip(single.state_dict().items(), double.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (name, (a - b).abs().max())
    changed = load_checkpoint(tmp_path / "one" / "last")
    assert changed.training_info["epochs_done"] == 1


SAME_WEIGHTS = """
import json, os, sys
import torch
import training.train as trainer

data, out = sys.argv[1:3]
real_step, sums = trainer.train_step, []

def step(model, *args, **kwargs):  # every update's weights, summed, in this process
    losses = real_step(model, *args, **kwargs)
    sums.append(sum(float(p.detach().double().sum()) for p in model.parameters()))
    return losses

trainer.train_step = step
trainer.train(trainer.TrainConfig(task="tmaze", model="rate", data=data, out=out, epochs=400, batch_size=4,
                                  warmup_steps=2, eval_every=0, seed=3, curves=False, max_minutes=0.05))
with open(os.path.join(out, f"sums_{os.environ['RANK']}.json"), "w") as f:
    json.dump(sums, f)
"""


def test_two_processes_keep_the_same_weights_under_a_time_limit(tmp_path):
    """--max-minutes decays the learning rate by time: by process 0's clock in every process, or the
    processes would take different steps and their weights drift apart (DDP averages gradients only)."""
    data = collect(get_task("tmaze"), tmp_path / "data", episodes_per_setting=4, seed=0)
    script = tmp_path / "same_weights.py"
    script.write_text(SAME_WEIGHTS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(data), str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sums = [json.loads((tmp_path / "run" / f"sums_{rank}.json").read_text()) for rank in (0, 1)]
    assert len(sums[0]) > 10 and sums[0] == sums[1]


def test_the_process_group_waits_long_enough_for_process_0s_evaluation(monkeypatch):
    # the others wait at a barrier while process 0 evaluates: torch's default limit (nccl 10 min, gloo 30)
    # would end them during a long evaluation
    import datetime

    import torch.distributed as dist

    from training import train as train_module

    started = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: started.update(backend=backend, **kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert train_module.setup_distributed("cpu") == (1, 2, torch.device("cpu"))
    assert started["backend"] == "gloo" and started["timeout"] >= datetime.timedelta(hours=1)

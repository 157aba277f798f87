"""The trainer under torchrun: 2 CPU processes (gloo) end with the weights of one process on the
same global batches."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from rate_core.checkpoint import load_checkpoint
from rate_core.tasks import get_task
from training.collect import collect
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    data = collect(get_task("tmaze"), tmp_path / "data", episodes_per_setting=4, seed=0)  # 12 samples
    common = dict(task="tmaze", model="rate", data=data, epochs=1, batch_size=4, warmup_steps=2, eval_every=0,
                  learning_rate=5e-5,  # Adam turns rounding noise of ~zero gradients into steps of ~lr
                  seed=3, dropout=0.0)
    single = load_checkpoint(train(TrainConfig(out=tmp_path / "one", **common)))
    args = ["--task", "tmaze", "--model", "rate", "--data", str(data), "--epochs", "1", "--batch-size", "4",
            "--warmup-steps", "2", "--learning-rate", "5e-5", "--eval-every", "0", "--seed", "3", "--dropout", "0",
            "--out", str(tmp_path / "two")]
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

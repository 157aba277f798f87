"""Publishing: the dry-run upload folder loads through from_pretrained offline to the same model,
its card's metadata parses, and hf:// references fail clearly when the Hub is out of reach."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from rate_core.checkpoint import CheckpointError, load_checkpoint
from rate_core.hub import checkpoint_folder, load_reference
from rate_core.model import MemoryTransformer
from tests.tiny import random_batch

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "assets" / "checkpoints" / "tmaze" / "rate"


@pytest.fixture(scope="module")
def dry_run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "rate-tmaze"
    result = subprocess.run([sys.executable, "-m", "training.push", "--checkpoint", str(SHIPPED), "--repo-id",
                             "someone/rate-tmaze", "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing uploaded" in result.stdout
    return out


def test_dry_run_folder_holds_what_would_be_uploaded(dry_run_folder):
    names = sorted(p.name for p in dry_run_folder.iterdir())  # the marker of push's folders is not uploaded
    assert names == [".rate_core_upload", "README.md", "config.json", "episode.mp4", "eval.json", "model.safetensors"]
    assert (dry_run_folder / "model.safetensors").read_bytes() == (SHIPPED / "model.safetensors").read_bytes()
    assert (dry_run_folder / "episode.mp4").stat().st_size > 1000


def test_push_replaces_only_its_own_folders_and_publishes_only_the_protocols_evaluation(tmp_path):
    import shutil

    from training.push import Args, main

    checkpoint, other = tmp_path / "ck", tmp_path / "other"
    shutil.copytree(SHIPPED, checkpoint)
    shutil.copytree(SHIPPED, other)
    for out in (checkpoint, other, checkpoint / "inside", tmp_path):  # never a checkpoint, nor where it lies
        with pytest.raises(SystemExit, match="is the checkpoint's folder|is not a Hub upload folder|working folder"):
            main(Args(checkpoint=checkpoint, repo_id="someone/x", dry_run=True, out=out, video=False))
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())
    for _ in range(2):  # its own folder it replaces
        main(Args(checkpoint=checkpoint, repo_id="someone/x", dry_run=True, out=tmp_path / "up", video=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "other", "up"]
    evaluation = json.loads((checkpoint / "eval.json").read_text())
    (checkpoint / "eval.json").write_text(json.dumps({**evaluation, "memory_horizon": 1}))
    with pytest.raises(SystemExit, match=r"not the protocol's evaluation of this model \(memory_horizon differ"):
        main(Args(checkpoint=checkpoint, repo_id="someone/x", dry_run=True, out=tmp_path / "up", video=False))
    assert (tmp_path / "up" / "README.md").exists()  # the earlier folder stays


def test_dry_run_folder_round_trips_through_from_pretrained_offline(dry_run_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = load_checkpoint(SHIPPED)
    loaded = MemoryTransformer.from_pretrained(str(dry_run_folder))
    assert loaded.task == "tmaze" and loaded.config == original.config
    rtg, obs, actions = random_batch(original.config, batch=2, steps=60)
    with torch.no_grad():
        expected, _ = original(rtg[:, :50], obs[:, :50], actions[:, :50])
        got, _ = loaded.eval()(rtg[:, :50], obs[:, :50], actions[:, :50])
    assert torch.equal(expected, got)
    assert load_reference(dry_run_folder, task="tmaze").config == original.config


def test_card_metadata_parses_with_the_evaluation_table(dry_run_folder):
    card = ModelCard.load(dry_run_folder / "README.md")
    evaluation = json.loads((SHIPPED / "eval.json").read_text())
    results = card.data.eval_results
    assert len(results) == len(evaluation["results"])
    assert [r.metric_value for r in results] == [r["success_rate"] for r in evaluation["results"]]
    assert results[0].dataset_type == "tmaze" and results[0].metric_type == "success_rate"
    assert card.data.library_name == "rate_core" and "rate" in card.data.tags
    assert "episode.mp4" in card.text and "| 9600 |" in card.text


def test_hub_reference_offline_without_cache_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        checkpoint_folder("hf://someone/rate-tmaze")
    with pytest.raises(CheckpointError, match="expected hf://USER/NAME"):
        checkpoint_folder("hf://not-a-repo-id")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_reference("hf://someone/rate-tmaze")


def fake_hub_cache(cache, repo_id, checkpoint, config_text=None):
    """A local Hub cache holding `checkpoint`'s files as `repo_id` (config.json replaced by config_text if given)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((checkpoint / name).read_bytes())
    if config_text is not None:
        (snapshot / "config.json").write_text(config_text)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def test_a_corrupt_hub_checkpoint_gives_the_loaders_error_naming_the_file(offline_cache):
    config = (SHIPPED / "config.json").read_text()
    snapshot = fake_hub_cache(offline_cache, "someone/broken", SHIPPED, config[:25])
    message = rf"^{snapshot / 'config.json'}: not valid JSON \(.*\); the file is truncated or corrupt$"
    with pytest.raises(CheckpointError, match=message):
        load_reference("hf://someone/broken")
    with pytest.raises(CheckpointError, match=message):
        MemoryTransformer.from_pretrained("someone/broken")
    fake_hub_cache(offline_cache, "someone/good", SHIPPED)
    assert load_reference("hf://someone/good", task="tmaze", mode="rate").task == "tmaze"
    assert MemoryTransformer.from_pretrained("someone/good").config == load_checkpoint(SHIPPED).config
    with pytest.raises(CheckpointError, match=r"config\.json: checkpoint is a 'rate' model, expected 'dt'"):
        load_reference("hf://someone/good", mode="dt")


def test_a_checkpoint_of_no_known_task_names_its_config(tmp_path):
    config = json.loads((SHIPPED / "config.json").read_text())
    for name, task, problem in [("nameless", None, "names no task"), ("other", "nope", "unknown task 'nope'")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((SHIPPED / "model.safetensors").read_bytes())
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "task"}
                                                       | ({"task": task} if task else {})))
        with pytest.raises(CheckpointError, match=rf"^{folder / 'config.json'}: {problem}; known tasks: .*tmaze"):
            load_reference(folder)


def test_card_of_a_return_scored_task_has_no_success_column():
    from rate_core.hub import hub_model_card

    folder = ROOT / "assets" / "checkpoints" / "memory_maze" / "rate"
    evaluation = json.loads((folder / "eval.json").read_text())
    card = hub_model_card(load_checkpoint(folder), "someone/rate-memory-maze", evaluation)
    result = evaluation["results"][0]
    assert (f"| step_cap | episodes | return |\n| --- | --- | --- |\n| 1000 | {result['episodes']} | "
            f"{result['mean_return']:.3f} ± {result['return_sem']:.3f} |") in card


def test_from_pretrained_takes_hf_references_and_refuses_unknown_keywords(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="hf://someone/rate-tmaze: not in the local Hugging Face cache"):
        MemoryTransformer.from_pretrained("hf://someone/rate-tmaze")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['mode', 'task'\].*load_checkpoint"):
        MemoryTransformer.from_pretrained(str(SHIPPED), task="memory_maze", mode="dt")
    with pytest.raises(CheckpointError, match=r"a Hugging Face Hub reference, not a folder; load it with "
                                              r"rate_core.hub.load_reference\('hf://someone/rate-tmaze'\)"):
        load_checkpoint("hf://someone/rate-tmaze")


def test_a_hub_reference_downloads_the_model_and_its_scores_only():
    from huggingface_hub.utils import filter_repo_objects

    from rate_core.hub import DOWNLOAD_FILES

    repo = ["README.md", "config.json", "model.safetensors", "eval.json", "episode.mp4", "videos/a.mp4",
            "other/config.json", "pytorch_model.bin"]
    assert sorted(filter_repo_objects(repo, allow_patterns=DOWNLOAD_FILES)) == ["config.json", "eval.json",
                                                                              "model.safetensors"]


def test_push_uploads_what_the_card_says_and_keeps_a_public_repository_from_a_private_upload(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from training import push
    from training.cli import cli

    calls = []

    class FakeApi:  # the Hub, with an existing public repository
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", kwargs))

        def repo_info(self, repo_id, **kwargs):
            return SimpleNamespace(private=False)

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "https://huggingface.co/someone/rate-tmaze/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    argv = ["--checkpoint", str(SHIPPED), "--repo-id", "someone/rate-tmaze", "--no-video",
            "--out", str(tmp_path / "up")]
    with pytest.raises(SystemExit, match="exists and is public .*nothing uploaded"):
        push.main(cli(push.Args, [*argv, "--private"]))
    assert [name for name, _ in calls] == ["create_repo"]
    push.main(cli(push.Args, argv))
    upload = calls[-1][1]
    # an earlier push's video (this one has none) or eval.json is deleted in the same commit
    assert upload["delete_patterns"] == ["*.mp4", "eval.json"] and upload["ignore_patterns"] == [".rate_core_upload"]
    with pytest.raises(SystemExit, match=r"--checkpoint hf://someone/x: push uploads a local checkpoint folder"):
        push.main(cli(push.Args, ["--checkpoint", "hf://someone/x", "--repo-id", "someone/y"]))

"""Publish a checkpoint on the Hugging Face Hub, with a model card that says what it scores.

    python -m training.push --checkpoint assets/checkpoints/tmaze/rate --repo-id USER/rate-tmaze --dry-run
    python -m training.push --checkpoint assets/checkpoints/tmaze/rate --repo-id USER/rate-tmaze

The upload folder holds config.json and model.safetensors (unchanged), eval.json (when the
checkpoint has one), README.md (the card: task, mode, config, training, the evaluation table and
the same table as model-index metadata) and an example episode video. `--dry-run` writes exactly
that folder and uploads nothing. Log in first with `huggingface-cli login` (or set HF_TOKEN).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from huggingface_hub.utils import HFValidationError, validate_repo_id

from rate_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_replaceable, load_checkpoint
from rate_core.hub import hub_model_card
from rate_core.tasks import get_task
from training.cli import OWN_DEFAULT, cli, run_main
from training.compare import load_evaluation

VIDEO_NAME = "episode.mp4"


@dataclass
class Args:
    """Upload a checkpoint folder to the Hugging Face Hub with a model card and an example video."""

    checkpoint: Path
    """checkpoint folder (config.json + model.safetensors, eval.json if evaluated)"""
    repo_id: str
    """Hub repository, USER/NAME (created if missing)"""
    dry_run: bool = False
    """write the folder that would be uploaded and stop"""
    out: Annotated[Path | None, OWN_DEFAULT] = None
    """where to build the upload folder (default: outputs/push/<NAME>)"""
    video: bool = True
    """include an example episode video (seed 0, the task's default settings)"""
    private: bool = False
    """create the repository as private"""


def example_video(model, folder: Path) -> str | None:
    """Render one argmax episode of the model's task into folder/episode.mp4."""
    from app.episodes import episode_videos, make_request, play

    task = get_task(model.task)
    spec = task.demo_setting
    request = make_request(task.name, 0, spec.default if spec else None, None, task.demo_step_cap or 0, False)
    trace = play(model, request)
    path = episode_videos([trace], [model], [f"{model.config.mode.upper()}"], task, folder=folder / ".video")[0]
    shutil.move(path, folder / VIDEO_NAME)
    shutil.rmtree(folder / ".video", ignore_errors=True)
    return VIDEO_NAME


def build_upload_folder(checkpoint: Path, repo_id: str, out: Path, video: bool = True) -> Path:
    """The exact folder to upload; returns it."""
    model = load_checkpoint(checkpoint)  # validates the folder
    evaluation = None
    if (checkpoint / "eval.json").exists():
        evaluation = load_evaluation(checkpoint / "eval.json", per_episode=False)  # SystemExit if not one
    check_replaceable(out, CONFIG_NAME, "Hub upload folder")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "eval.json"):
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, out / name)
    video_name = example_video(model, out) if video and model.task else None
    title = get_task(model.task).title if model.task else None
    (out / "README.md").write_text(hub_model_card(model, repo_id, evaluation, video_name, title))
    return out


def main(args: Args) -> None:
    try:
        validate_repo_id(args.repo_id)
        if args.repo_id.count("/") != 1:
            raise HFValidationError("expected one '/'")
    except HFValidationError as error:
        raise SystemExit(f"error: --repo-id must be USER/NAME (letters, digits, '-', '_', '.'), got "
                         f"{args.repo_id!r}: {error}") from None
    out = args.out or Path("outputs") / "push" / args.repo_id.split("/")[1]
    try:
        check_replaceable(out, CONFIG_NAME, "Hub upload folder")
    except ValueError as error:
        raise SystemExit(f"error: --out {error}")
    try:
        folder = build_upload_folder(args.checkpoint, args.repo_id, out, args.video)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}")
    except KeyError as error:
        raise SystemExit(f"error: {args.checkpoint}: {error.args[0]}")
    files = sorted(p.name for p in folder.iterdir())
    print(f"upload folder {folder}: {', '.join(files)}")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
        info = api.upload_folder(repo_id=args.repo_id, folder_path=folder, repo_type="model",
                                 commit_message=f"Upload {folder.name} from rate_core")
    except Exception as error:  # network, authentication, permissions: say what to do
        raise SystemExit(f"error: upload to {args.repo_id} failed ({error}); check the network and "
                         f"`huggingface-cli login`, or use --dry-run to only build the folder")
    print(f"uploaded: {info}")


if __name__ == "__main__":
    run_main(main, cli(Args))

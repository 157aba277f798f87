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

from rate_core.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_replaceable, load_checkpoint,
                                  recover_folder, replace_folder, staging_folder)
from rate_core.hub import hub_model_card
from rate_core.tasks import get_task
from training.cli import OWN_DEFAULT, cli, run_main
from training.compare import load_evaluation
from training.evaluate import not_the_protocol

VIDEO_NAME = "episode.mp4"
UPLOAD_MARKER = ".rate_core_upload"
"""marks a folder that push built (not uploaded): the only kind of folder push replaces"""


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
    """create the repository as private (an existing repository keeps its visibility: push stops if it
    is public and --private was given)"""


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
    """The exact folder to upload, built beside `out` and put in place whole; returns it. ValueError for an
    `out` that is the checkpoint's folder, holds it or lies in it, or holds anything but an earlier upload
    folder, and for an eval.json whose run is not the task's protocol (the card presents it as that)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() in (checkpoint.resolve(), *checkpoint.resolve().parents) or \
            checkpoint.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} is the checkpoint's folder, holds it or lies inside it; give another folder "
                         f"for the upload (default: outputs/push/NAME)")
    model = load_checkpoint(checkpoint)  # validates the folder
    evaluation = None
    if (checkpoint / "eval.json").exists():
        evaluation = load_evaluation(checkpoint / "eval.json", per_episode=False)  # SystemExit if not one
        differ = not_the_protocol(evaluation, get_task(model.task)) if model.task else []
        differ += [name for name, value in (("task", model.task), ("mode", model.config.mode))
                   if evaluation.get(name) != value]
        if differ:
            raise ValueError(f"{checkpoint / 'eval.json'} is not the protocol's evaluation of this model "
                             f"({', '.join(differ)} differ), which the card would present it as; evaluate it "
                             f"again with python -m training.evaluate --checkpoint {checkpoint}")
    recover_folder(out)
    check_replaceable(out, UPLOAD_MARKER, "Hub upload folder")
    staging = staging_folder(out)
    try:  # a failure or Ctrl-C here leaves the earlier upload folder as it was
        (staging / UPLOAD_MARKER).write_text("built by python -m training.push (not uploaded); push replaces "
                                             "only folders with this file\n")
        for name in (CONFIG_NAME, WEIGHTS_NAME, "eval.json"):
            if (checkpoint / name).exists():
                shutil.copy2(checkpoint / name, staging / name)
        video_name = example_video(model, staging) if video and model.task else None
        title = get_task(model.task).title if model.task else None
        (staging / "README.md").write_text(hub_model_card(model, repo_id, evaluation, video_name, title))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_folder(staging, out)


def main(args: Args) -> None:
    try:
        validate_repo_id(args.repo_id)
        if args.repo_id.count("/") != 1:
            raise HFValidationError("expected one '/'")
    except HFValidationError as error:
        raise SystemExit(f"error: --repo-id must be USER/NAME (letters, digits, '-', '_', '.'), got "
                         f"{args.repo_id!r}: {error}") from None
    if str(args.checkpoint).startswith("hf:/"):  # a Path keeps one slash of hf://
        raise SystemExit(f"error: --checkpoint {str(args.checkpoint).replace('hf:/', 'hf://', 1)}: push uploads a "
                         f"local checkpoint folder; that one is on the Hub already")
    out = args.out or Path("outputs") / "push" / args.repo_id.split("/")[1]
    try:
        check_replaceable(out, UPLOAD_MARKER, "Hub upload folder")
    except ValueError as error:
        raise SystemExit(f"error: --out {error}")
    try:
        folder = build_upload_folder(args.checkpoint, args.repo_id, out, args.video)
    except (CheckpointError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    except KeyError as error:
        raise SystemExit(f"error: {args.checkpoint / 'eval.json'} has no {error.args[0]!r} entry (not as "
                         f"training.evaluate writes it); evaluate the checkpoint again")
    files = sorted(p.name for p in folder.iterdir() if p.name != UPLOAD_MARKER)
    print(f"upload folder {folder}: {', '.join(files)}")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
        if args.private and not api.repo_info(args.repo_id, repo_type="model").private:
            raise SystemExit(f"error: {args.repo_id} exists and is public (--private only sets a new repository's "
                             f"visibility); nothing uploaded: make it private on the Hub first, or leave out --private")
        # an earlier push's video or eval.json that this folder has not goes: the repository holds what the card says
        info = api.upload_folder(repo_id=args.repo_id, folder_path=folder, repo_type="model",
                                 commit_message=f"Upload {folder.name} from rate_core", ignore_patterns=[UPLOAD_MARKER],
                                 delete_patterns=["*.mp4", "eval.json"])
    except SystemExit:
        raise
    except Exception as error:  # network, authentication, permissions: say what to do
        raise SystemExit(f"error: upload to {args.repo_id} failed ({error}); check the network and "
                         f"`huggingface-cli login`, or use --dry-run to only build the folder")
    print(f"uploaded: {info}")


if __name__ == "__main__":
    run_main(main, cli(Args))

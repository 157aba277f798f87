"""training.curves: reading a training log (resumed runs, cut lines) and drawing it."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from training.curves import Args, main, moving_average, plot_runs, read_log, summary, write_curves


def _write_log(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _batch(epoch, step, loss):
    return {"epoch": epoch, "step": step, "loss": loss, "segment_losses": [loss], "lr": 1e-3 * step}


def test_a_resumed_run_is_read_as_the_sitting_that_finished_each_step(tmp_path):
    records = [_batch(1, 1, 1.0), _batch(1, 2, 0.9), {"epoch": 1, "step": 2, "epoch_seconds": 1.0, "val_loss": 0.8,
                                                     "eval": {"100": 0.5}},
               _batch(2, 3, 0.7), {"epoch": 2, "step": 3, "stopped": "max_minutes"},  # killed in epoch 2
               _batch(2, 3, 0.6), _batch(2, 4, 0.5),  # resumed from the end of epoch 1
               {"epoch": 2, "step": 4, "epoch_seconds": 1.5, "val_loss": 0.4, "eval": {"100": 0.75, "1000": 0.25}}]
    log = read_log(_write_log(tmp_path / "run", records, tail='{"epoch": 3, "st'))  # a line cut by a kill
    assert log.steps.tolist() == [1, 2, 3, 4]
    assert log.losses.tolist() == [1.0, 0.9, 0.6, 0.5]
    assert log.epoch_steps.tolist() == [2, 4]
    assert log.val_losses.tolist() == [0.8, 0.4]
    assert list(log.evaluations) == ["100", "1000"]
    assert log.evaluations["100"].tolist() == [0.5, 0.75]
    assert math.isnan(log.evaluations["1000"][0]) and log.evaluations["1000"][1] == 0.25
    assert not log.stopped  # the resumed sitting went on
    assert "best held-out loss 0.4000 after epoch 2" in summary(log)
    assert "best evaluation at 100: 0.75 after epoch 2" in summary(log)


def test_an_epoch_logged_before_a_kill_and_done_again_is_read_once(tmp_path):
    # killed after epoch 2's line was written but before its checkpoint: the resumed run redoes epoch 2
    records = [_batch(1, 1, 1.0), {"epoch": 1, "step": 1, "epoch_seconds": 1.0},
               _batch(2, 2, 0.9), {"epoch": 2, "step": 2, "epoch_seconds": 1.0, "val_loss": 5.0},
               _batch(2, 2, 0.8), {"epoch": 2, "step": 2, "epoch_seconds": 1.0, "val_loss": 0.5}]
    log = read_log(_write_log(tmp_path / "run", records))
    assert log.losses.tolist() == [1.0, 0.8] and log.epoch_steps.tolist() == [1, 2]
    assert math.isnan(log.val_losses[0]) and log.val_losses[1] == 0.5


def test_a_run_stopped_at_its_time_limit_says_so(tmp_path):
    log = read_log(_write_log(tmp_path / "run", [_batch(1, 1, 1.0), {"epoch": 1, "step": 1, "stopped": "max_minutes"}]))
    assert log.stopped and "stopped at --max-minutes" in summary(log)


def test_a_resumed_sitting_stopped_at_once_drops_the_killed_sittings_later_steps(tmp_path):
    # killed in epoch 2 after step 5; resumed from the end of epoch 1 (step 3) with its time already spent
    records = [_batch(1, 1, 1.0), _batch(1, 2, 0.9), _batch(1, 3, 0.8), {"epoch": 1, "step": 3, "epoch_seconds": 1.0},
               _batch(2, 4, 0.7), _batch(2, 5, 0.6), {"epoch": 2, "step": 3, "stopped": "max_minutes"}]
    log = read_log(_write_log(tmp_path / "run", records))
    assert log.steps.tolist() == [1, 2, 3] and log.epoch_steps.tolist() == [3] and log.stopped


def test_moving_average_skips_missing_values():
    values = np.array([1.0, 3.0, np.nan, 5.0])
    assert moving_average(values, 2).tolist() == [1.0, 2.0, 3.0, 5.0]
    assert moving_average(values, 1).tolist()[:2] == [1.0, 3.0]


def test_panels_follow_what_the_logs_hold(tmp_path):
    plain = read_log(_write_log(tmp_path / "plain", [_batch(1, 1, 1.0), _batch(1, 2, 0.5),
                                                     {"epoch": 1, "step": 2, "epoch_seconds": 1.0}]))
    figure = plot_runs([plain])
    assert [a.get_ylabel() for a in figure.axes] == ["training loss", "learning rate"]
    full = read_log(_write_log(tmp_path / "full", [_batch(1, 1, 1.0), {"epoch": 1, "step": 1, "val_loss": 0.9,
                                                                       "eval": {"150": 0.5}}]))
    figure = plot_runs([plain, full], metric="success rate")
    assert [a.get_ylabel() for a in figure.axes] == ["training loss", "held-out loss", "success rate", "learning rate"]
    assert len(figure.axes[0].get_legend().get_texts()) == 2  # one entry per run


def test_the_png_is_written_whole_and_the_cli_explains_bad_input(tmp_path, capsys):
    run = _write_log(tmp_path / "run", [_batch(1, s, 1.0 / s) for s in range(1, 30)])
    out = write_curves([read_log(run)], tmp_path / "c.png")
    assert Image.open(out).size[0] > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "run"]  # no partial file left
    main(Args(runs=(run,)))
    assert (run / "curves.png").is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist: give a run folder"):
        main(Args(runs=(tmp_path / "missing",)))
    with pytest.raises(SystemExit, match="must be a .png"):
        main(Args(runs=(run,), out=tmp_path / "c.jpg"))
    (tmp_path / "folder.png").mkdir()
    for out in (tmp_path / "nowhere" / "c.png", tmp_path / "folder.png"):  # one line, before the work
        with pytest.raises(SystemExit, match=r"^error: --out .*: cannot write a file there"):
            main(Args(runs=(run,), out=out))
    with pytest.raises(SystemExit, match="at least one run"):
        main(Args(runs=()))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text("not json\n{}\n")
    with pytest.raises(SystemExit, match="is not JSON"):
        main(Args(runs=(tmp_path / "bad",)))

"""rectified_flow_train.py: a real run on photos, exact resume, DDP and DataParallel, notebook sampling."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rectified_flow_train
from checkpoint import RunRecord, load_checkpoint
from helpers import TINY, blobs, fit, tiny_config
from solvers import Sampler

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "small32", "--base-channels", "16", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "10",
         "--num-workers", "0", "--val-t-points", "2", "--log-every", "5"]


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """4 epochs at 32 px on 160 real CIFAR-10 photos (10% held out for validation)."""
    from conftest import SHARED_DATA

    source = SHARED_DATA / "cifar10-test-jpg"
    if not source.is_dir():
        pytest.skip(f"real photos need {SHARED_DATA}/cifar10-test-jpg")
    tmp = tmp_path_factory.mktemp("rf")
    for cls in ("automobile", "horse"):
        (tmp / "photos" / cls).mkdir(parents=True)
        for src in sorted((source / cls).glob("*.jpg"))[:80]:
            shutil.copy(src, tmp / "photos" / cls)
    summary = rectified_flow_train.main([
        "--data-root", str(tmp / "photos"), "--val-fraction", "0.1", "--epochs", "4", "--keep-last", "2", *SMALL,
        "--out-dir", str(tmp / "ck"), "--out", str(tmp / "ck" / "rf_best.pth"),
        "--sample-dir", str(tmp / "samples")])
    return tmp, summary


def test_photo_run_writes_epochs_last_and_best_by_validation(photo_run):
    tmp, summary = photo_run
    records = [json.loads(line) for line in (tmp / "ck" / "log.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["kind"] == "step"]
    assert steps[-1] < 0.75 * steps[0], steps
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 4 and all(r["val_loss"] is not None for r in epochs)
    best_epoch = min(epochs, key=lambda r: r["val_loss"])["epoch"]
    assert load_checkpoint(tmp / "ck" / "rf_best.pth")["epoch"] == best_epoch
    assert load_checkpoint(tmp / "ck" / "last.pth")["epoch"] == 4
    assert sorted(p.name for p in (tmp / "ck").glob("epoch_*.pth")) == ["epoch_3.pth", "epoch_4.pth"]  # --keep-last 2
    assert (tmp / "samples" / "epoch_4.png").is_file()
    ckpt = load_checkpoint(tmp / "ck" / "last.pth")
    assert ckpt["model_config"]["num_classes"] is None and ckpt["model_config"]["image_size"] == 32
    assert Sampler.recorded(ckpt["sampler"]) == Sampler("euler", 16, 1.0)  # the photo default, unguided: no classes


@pytest.mark.parametrize("classes,dropout,guidance", [(None, 0.1, 1.0), (10, 0.1, 2.0), (10, 0.0, 1.0)])
def test_photo_checkpoints_guide_only_where_the_null_label_was_trained(classes, dropout, guidance):
    model_cfg = replace(rectified_flow_train.DEFAULTS[1], num_classes=classes)
    cfg = replace(rectified_flow_train.DEFAULTS[0], label_dropout=dropout)
    assert rectified_flow_train.folder_sampler(model_cfg, cfg) == Sampler("euler", 16, guidance)


def test_validation_loss_is_fixed_for_fixed_weights(photo_run):
    from data import image_folder_splits
    from checkpoint import model_from_checkpoint
    from device import Runtime
    from flow import validation_loss

    tmp, _ = photo_run
    _, val, _ = image_folder_splits(tmp / "photos", 32, 0.1)
    model = model_from_checkpoint(load_checkpoint(tmp / "ck" / "last.pth"))
    rt = Runtime(torch.device("cpu"))
    assert validation_loss(model, val, rt, 8, 2, False) == validation_loss(model, val, rt, 8, 2, False)


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model_state"]


def test_resume_is_exact(tmp_path):
    """12 steps straight == 7 steps, stop mid-epoch, resume, 5 more (same weights, EMA and optimizer)."""
    straight = tmp_path / "straight"
    fit(tiny_config(straight, epochs=2), TINY, blobs(), None)
    parts = tmp_path / "parts"
    fit(tiny_config(parts, epochs=2, max_steps=7), TINY, blobs(), None)
    assert load_checkpoint(parts / "ck" / "last.pth")["step"] == 7
    fit(tiny_config(parts, epochs=2, resume="auto"), TINY, blobs(), None)
    a, b = load_checkpoint(straight / "ck" / "last.pth"), load_checkpoint(parts / "ck" / "last.pth")
    assert a["step"] == b["step"] == 12
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
        assert torch.equal(a["ema_state"]["weights"][key], b["ema_state"]["weights"][key]), key
    for i, moments in a["optimizer_state"]["state"].items():  # AdamW's moments and step count were restored
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer_state"]["state"][i][name]), (i, name)


def test_weights_saved_with_wrapper_prefixes_resume_and_sample(tmp_path):
    """Checkpoints from DataParallel/DDP (module.) or torch.compile (_orig_mod.) wrappers load everywhere."""
    from checkpoint import save_checkpoint
    from sampling import sample_from_checkpoint

    fit(tiny_config(tmp_path / "a", epochs=1, parallel="dp"), TINY, blobs(), None)  # the DataParallel path runs
    ckpt = load_checkpoint(tmp_path / "a" / "ck" / "last.pth")
    ema = {f"_orig_mod.{k}": v for k, v in ckpt["ema_state"]["weights"].items()}
    prefixed = dict(ckpt, model_state={f"module.{k}": v for k, v in ckpt["model_state"].items()},
                    ema_state=dict(ckpt["ema_state"], weights=ema))
    save_checkpoint(tmp_path / "b" / "ck" / "last.pth", prefixed)
    resumed = fit(tiny_config(tmp_path / "b", epochs=1, resume="auto"), TINY, blobs(), None)
    assert resumed["step"] == 6  # nothing left to train: the prefixed weights were loaded as they are
    assert all(torch.equal(resumed["model"].state_dict()[k], v) for k, v in ckpt["model_state"].items())
    with_prefix = sample_from_checkpoint(tmp_path / "b" / "ck" / "last.pth", steps=2, batch_size=3, seed=0,
                                         device="cpu")
    plain = sample_from_checkpoint(tmp_path / "a" / "ck" / "last.pth", steps=2, batch_size=3, seed=0, device="cpu")
    assert torch.equal(with_prefix, plain)


def test_batch_smaller_than_world_is_refused(tmp_path, monkeypatch):
    from config import check_train_config

    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        check_train_config(tiny_config(tmp_path, batch_size=2), world=4)


@pytest.mark.parametrize("which", ["photos", "labelled"])
def test_sample_from_checkpoint(which, request, tmp_path):
    if which == "photos":
        path, channels, size = request.getfixturevalue("photo_run")[0] / "ck" / "rf_best.pth", 3, 32
    else:  # a class-conditional checkpoint like mnist_train.py writes
        fit(tiny_config(tmp_path, epochs=1), TINY, blobs(), None, record=RunRecord(class_names=["a", "b", "c"]))
        path, channels, size = tmp_path / "best.pth", 1, 8
    out = tmp_path / "grid.png"
    images = rectified_flow_train.sample_from_checkpoint(path, out, steps=3, batch_size=5, seed=7, device="cpu")
    assert images.shape == (5, channels, size, size) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert out.is_file()
    again = rectified_flow_train.sample_from_checkpoint(path, None, steps=3, batch_size=5, seed=7, device="cpu")
    assert torch.equal(images, again)
    other = rectified_flow_train.sample_from_checkpoint(path, None, steps=3, batch_size=5, seed=8, device="cpu")
    assert not torch.equal(images, other)


def test_sample_from_checkpoint_label_errors(tmp_path):
    from dataclasses import replace

    fit(tiny_config(tmp_path / "cond", epochs=1), TINY, blobs(), None)
    with pytest.raises(ValueError, match="label 3 is out of range: this model knows classes 0-2"):
        rectified_flow_train.sample_from_checkpoint(tmp_path / "cond" / "best.pth", labels=[0, 3], steps=1,
                                                    device="cpu")
    fit(tiny_config(tmp_path / "uncond", epochs=1), replace(TINY, num_classes=None), blobs(), None)
    with pytest.raises(ValueError, match="unconditional"):
        rectified_flow_train.sample_from_checkpoint(tmp_path / "uncond" / "best.pth", labels=[0], steps=1, device="cpu")


def test_import_has_no_side_effects(tmp_path):
    code = "import sys; sys.argv = ['x', '--bogus']; import rectified_flow_train, mnist_train; print('imported')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0 and result.stdout == "imported\n", result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--data-root", "/nonexistent/celeba"], "does not exist"),
    (["--image-size", "30"], "cannot go through"),
    (["--parallel", "ddp"], "unknown --parallel"),
])
def test_cli_errors(args, message, tmp_path, cifar_root, capsys):
    """The script's own exit path (cli.run), in this process: one line, no traceback."""
    from cli import run as run_main

    base = ["--data-root", str(cifar_root), "--out-dir", str(tmp_path), "--epochs", "1"]
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: rectified_flow_train.main([*base, *args]))
    said = f"{stop.value.code}\n{capsys.readouterr().err}"
    assert stop.value.code not in (0, None) and message in said and "Traceback" not in said, said[-2000:]

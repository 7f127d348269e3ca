"""The training loop's contracts: LR schedule, clipping, flips, exact resume (after Ctrl-C, kill -9 or a
changed set-up), output paths, logs and the checks that refuse impossible settings."""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import device
import trainer
from checkpoint import CheckpointError, load_checkpoint
from device import Runtime, setup_runtime
from helpers import TINY, assert_same_weights, blobs, fit, tiny_config, training_times
from budget import learning_rate
from config import TrainConfig
from data import Batch
from trainer import build, train_step

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_learning_rate_warmup_then_decay_to_zero():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, lr_schedule="linear")
    assert [learning_rate(cfg, s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 9, 14) == pytest.approx(0.5) and learning_rate(cfg, 13, 14) == pytest.approx(0.1)
    cosine = replace(cfg, lr_schedule="cosine")
    assert learning_rate(cosine, 9, 14) == pytest.approx(0.5) and learning_rate(cosine, 4, 14) == 1.0
    assert learning_rate(replace(cfg, lr_schedule="constant"), 13, 14) == 1.0


def test_the_optimizer_runs_at_the_scheduled_rate_and_gradients_are_clipped(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, grad_clip=1e-3)
    parts = build(cfg, TINY, Runtime(CPU))
    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        norms.append(original(params, max_norm).item())  # the norm before clipping
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train_step(parts, cfg, Batch(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3), step=0, lr=0.025)
    assert norms[0] > 1e-3 and norms[1] == pytest.approx(1e-3, rel=1e-3)  # clipped to --grad-clip
    assert parts.optimizer.param_groups[0]["lr"] == 0.025


def test_without_momentum_a_step_moves_each_weight_by_lr_times_its_gradients_sign(tmp_path):
    """--adam-beta1 0 (beta2 0 too): Adam's first step is lr * g / |g| per weight, the sign of the gradient."""
    cfg = tiny_config(tmp_path, adam_beta1=0.0, adam_beta2=0.0, grad_clip=0.0)
    parts = build(cfg, TINY, Runtime(CPU))
    assert parts.optimizer.param_groups[0]["betas"] == (0.0, 0.0)
    before = [p.detach().clone() for p in parts.model.parameters()]
    train_step(parts, cfg, Batch(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3), step=0, lr=0.01)
    for p, b in zip(parts.model.parameters(), before):
        moved = (b - p.detach())[p.grad.abs() > 1e-4]
        assert torch.allclose(moved, 0.01 * p.grad.sign()[p.grad.abs() > 1e-4], atol=1e-5)


def test_hflip_is_applied_and_repeats_on_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, hflip=True)
    parts = build(cfg, TINY, Runtime(CPU))
    seen = []
    loss = trainer.flow_matching_loss
    spy = lambda net, x1, *a: (seen.append(x1.clone()), loss(net, x1, *a))[1]
    monkeypatch.setattr(trainer, "flow_matching_loss", spy)
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(32, 1, 1, 1) / 64  # not mirror-symmetric
    y = torch.zeros(32, dtype=torch.long)
    for step in (5, 5, 6):
        train_step(parts, cfg, Batch(x, y), step)
    flipped = [torch.equal(img, x[0].flip(-1)) for img in seen[0]]
    assert all(f or torch.equal(img, x[0]) for f, img in zip(flipped, seen[0]))
    assert 4 < sum(flipped) < 28  # about half
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])  # the step's seed decides


def test_t_mu_shifts_the_training_times_toward_the_noise_end(tmp_path, monkeypatch):
    times = training_times(tiny_config(tmp_path, t_schedule="logit-normal", t_mu=-2.0), monkeypatch)
    assert times.median().item() == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item(), abs=0.03)


def test_default_outputs_follow_out_dir_and_folders_are_created(tmp_path):
    import rectified_flow_train

    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(photos / f"{i}.png")
    args = ["--data-root", str(photos), "--image-size", "8", "--channel-mult", "1,2", "--base-channels", "8",
            "--num-res-blocks", "1", "--attention-resolutions", "4", "--batch-size", "8", "--epochs", "1",
            "--num-workers", "0", "--val-fraction", "0.2", "--val-t-points", "1"]
    for run in ("a", "b"):
        summary = rectified_flow_train.main([*args, "--out-dir", str(tmp_path / "runs" / run)])
        assert summary["checkpoint"] == str(tmp_path / "runs" / run / "rf_best.pth")
        assert (tmp_path / "runs" / run / "samples" / "epoch_1.png").is_file()
    best = tmp_path / "deep" / "new" / "best.pth"  # an --out in a folder nobody created, by its old name
    rectified_flow_train.main([*args, "--out-dir", str(tmp_path / "runs" / "c"), "--checkpoint", str(best)])
    assert load_checkpoint(best)["epoch"] == 1


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "0", "--epochs must be > 0"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--lr", "-1", "--lr must be > 0"),
    ("--time-budget", "-5", "--time-budget must be >= 0"),
    ("--time-limit", "-1", "--time-limit must be >= 0"),
    ("--sample-every", "0", "--sample-every must be >= 1"),
    ("--label-dropout", "1.5", "--label-dropout must lie in [0, 1]"),
    ("--lr-schedule", "step", "unknown --lr-schedule 'step'"),
    ("--num-classes", "7", "MNIST has 1 channel and 10 classes"),
    ("--attention-resolutions", "5", "match no level"),
])
def test_impossible_settings_are_refused_before_any_data_is_read(flag, value, message, tmp_path, monkeypatch):
    import mnist_train

    early = lambda *a, **k: pytest.fail("data read before the flags were checked")
    monkeypatch.setattr(mnist_train, "load_mnist", early)
    with pytest.raises(ValueError, match=re.escape(message)):
        mnist_train.main(["--out-dir", str(tmp_path / "ck"), flag, value])
    assert not (tmp_path / "ck").exists()


def test_a_refused_setting_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "mnist_train.py"), "--epochs", "0", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stderr[-2000:]
    assert result.stderr.strip() == "error: --epochs must be > 0, got 0.0", result.stderr[-2000:]


def test_max_steps_mid_epoch_names_only_files_that_exist(tmp_path):
    summary = fit(tiny_config(tmp_path, max_steps=4), TINY, blobs(), None)
    assert summary["checkpoint"] is None and summary["files"] == [str(tmp_path / "ck" / "last.pth")]
    assert not (tmp_path / "best.pth").exists()


@pytest.mark.parametrize("select_by,epoch", [("val-loss", 1), ("last", 2)])
def test_select_by_picks_the_published_epoch(select_by, epoch, tmp_path, monkeypatch):
    losses = iter([0.5, 0.7])  # epoch 2 validates worse
    monkeypatch.setattr(trainer, "validation_loss", lambda *a, **k: next(losses))
    summary = fit(tiny_config(tmp_path, select_by=select_by), TINY, blobs(), blobs(32, seed=1))
    assert load_checkpoint(tmp_path / "best.pth")["epoch"] == epoch and summary["best_val_loss"] == 0.5


@pytest.mark.parametrize("capability,expected",
                         [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_amp_on_cuda_uses_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    from device import resolve_amp

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what T4s report (emulated)
    assert resolve_amp("auto", torch.device("cuda")) == expected


def test_resume_with_another_batch_size_is_refused(tmp_path):
    fit(tiny_config(tmp_path, max_steps=4), TINY, blobs(), None)
    with pytest.raises(CheckpointError, match="--batch-size 16 then, 8 now"):
        fit(tiny_config(tmp_path, batch_size=8, resume="auto"), TINY, blobs(), None)
    with pytest.raises(CheckpointError, match="steps per epoch 6 then, 4 now"):  # the training set changed
        fit(tiny_config(tmp_path, resume="auto"), TINY, blobs(64), None)


def test_resume_a_run_with_fp16_gets_a_fresh_grad_scaler(tmp_path, monkeypatch):
    fit(tiny_config(tmp_path, max_steps=4), TINY, blobs(), None)
    monkeypatch.setattr(device, "resolve_amp", lambda amp, where: amp)  # fp16 autocast + scaler on the CPU
    summary = fit(tiny_config(tmp_path, amp="fp16", resume="auto"), TINY, blobs(), None)
    assert summary["step"] == 12 and load_checkpoint(tmp_path / "ck" / "last.pth")["scaler_state"]["scale"] > 0


def test_ctrl_c_inside_a_step_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    fit(tiny_config(tmp_path / "straight"), TINY, blobs(), None)
    original = trainer.EMA.update
    calls = []

    def interrupted(self, model):  # Ctrl-C after optimizer.step, before the step is counted
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, model)

    monkeypatch.setattr(trainer.EMA, "update", interrupted)
    stopped = fit(tiny_config(tmp_path / "parts"), TINY, blobs(), None)
    assert stopped["step"] == 5 and stopped["checkpoint"] is None
    monkeypatch.setattr(trainer.EMA, "update", original)
    fit(tiny_config(tmp_path / "parts", resume="auto"), TINY, blobs(), None)
    assert_same_weights(load_checkpoint(tmp_path / "straight" / "ck" / "last.pth"),
                        load_checkpoint(tmp_path / "parts" / "ck" / "last.pth"))


def test_kill_9_then_resume_from_the_periodic_save_equals_an_uninterrupted_run(tmp_path):
    straight = fit(tiny_config(tmp_path / "straight", epochs=3), TINY, blobs(), None)
    # save_every 1e-9 minutes: last.pth after every step; the process sleeps per step so the kill lands mid-epoch
    code = ("import sys, time; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
            "from pathlib import Path; import trainer\n"
            "from helpers import TINY, assert_same_weights, blobs, fit, tiny_config\n"
            "step = trainer.train_step\n"
            "trainer.train_step = lambda *a, **k: (time.sleep(0.3), step(*a, **k))[1]\n"
            "fit(tiny_config(Path(sys.argv[2]), epochs=3, save_every=1e-9), TINY, blobs(), None)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path / "parts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "parts" / "ck" / "last.pth"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (last.is_file() and load_checkpoint(last)["step"] >= 8):
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    step = load_checkpoint(last)["step"]
    assert 8 <= step < 18 and step % 6, step  # killed inside an epoch, after a periodic save
    resumed = fit(tiny_config(tmp_path / "parts", epochs=3, resume="auto"), TINY, blobs(), None)
    assert resumed["step"] == straight["step"] == 18
    assert_same_weights(load_checkpoint(tmp_path / "straight" / "ck" / "last.pth"), load_checkpoint(last))


def test_log_restarts_on_a_fresh_run_and_drops_records_past_the_resumed_step(tmp_path):
    log = tmp_path / "ck" / "log.jsonl"
    fit(tiny_config(tmp_path, log_every=1), TINY, blobs(), None)
    first = log.read_bytes()
    fit(tiny_config(tmp_path, log_every=1), TINY, blobs(), None)  # a second run in the same out-dir
    assert (tmp_path / "ck.1" / "log.jsonl").read_bytes() == first  # the first run's log kept aside, whole
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, 13))
    # a crash after step 12 left records up to 12, but the checkpoint we resume from is at step 6
    (tmp_path / "ck" / "epoch_1.pth").replace(tmp_path / "ck" / "last.pth")
    fit(tiny_config(tmp_path, log_every=1, resume="auto"), TINY, blobs(), None)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 13))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


@pytest.mark.parametrize("parallel", ["none", "dp"])
def test_torchrun_with_parallel_none_or_dp_is_refused(monkeypatch, parallel):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=f"--parallel {parallel} cannot run under torchrun"):
        setup_runtime("cpu", parallel)


def run_ddp_worker(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py in 2 gloo processes on the CPU; fails the test unless both exit cleanly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), *args],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_keeps_ranks_in_step_validates_on_all_and_logs_the_global_loss(tmp_path):
    """2 gloo processes: identical weights, one writer, the global loss, validation sharded over the ranks."""
    from checkpoint import model_from_checkpoint
    from flow import validation_loss

    result = run_ddp_worker(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    assert r0["loss"] == r1["loss"]  # the all-reduced mean, not each rank's own share
    # 96 images / 2 ranks / 8 per rank = 6 steps per epoch: the global batch of 16 is split, not doubled.
    ckpt = load_checkpoint(tmp_path / "ck" / "last.pth")
    assert ckpt["step"] == 12 and ckpt["loss"] == pytest.approx(r0["loss"])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "epoch_1.pth", "epoch_2.pth",
                                                                    "last.pth", "log.jsonl", "loss.png"]
    assert result.stdout.count("epoch 2/2  step 12") == 1  # rank 0 prints, rank 1 does not
    single = model_from_checkpoint(ckpt, use_ema=False)
    assert all(torch.equal(single.state_dict()[k], r0["weights"][k]) for k in r0["weights"])
    t_points = ckpt["train_config"]["val_t_points"]
    val = validation_loss(model_from_checkpoint(ckpt), blobs(24, seed=1), Runtime(CPU), 5, t_points, True)
    assert ckpt["val_loss"] == pytest.approx(val, rel=1e-5)  # sharded over ranks = one process


def test_a_ctrl_c_on_one_ddp_rank_stops_all_at_the_next_log_step_and_resumes_exactly(tmp_path):
    """The stop check's all-reduce runs at log steps only (every 2 steps here): a Ctrl-C on rank 1 inside step 3 stops
    both ranks after step 4, and --resume auto finishes with the weights of a run never stopped."""
    run_ddp_worker(tmp_path / "whole")
    stopped = run_ddp_worker(tmp_path / "cut", "cpu", "0", "flow-matching", "3")
    assert load_checkpoint(tmp_path / "cut" / "ck" / "last.pth")["step"] == 4
    assert "Ctrl-C at step 4, inside epoch 1" in stopped.stdout  # said by rank 0, which was not interrupted
    run_ddp_worker(tmp_path / "cut", "cpu", "0", "flow-matching", "0", "resume")
    assert_same_weights(load_checkpoint(tmp_path / "cut" / "ck" / "last.pth"),
                        load_checkpoint(tmp_path / "whole" / "ck" / "last.pth"))


def test_ddp_ranks_agree_on_where_a_time_budget_ends(tmp_path):
    """Each rank times itself; the fit takes the slowest, so both stop at the same step (or the run would hang)."""
    run_ddp_worker(tmp_path, "cpu", "0.25")  # 15 s: room past the 2 epochs on a slow 2-core AVX2 machine too
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    ckpt = load_checkpoint(tmp_path / "ck" / "last.pth")
    # past the 2 epochs it replaced; at the fitted end, or before it when an epoch end overran the budget
    assert ckpt["horizon_fitted"] and 12 < ckpt["step"] <= ckpt["schedule_steps"]


def test_checkpoints_are_synced_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    import checkpoint

    events = []
    fsync, replace_ = os.fsync, os.replace
    def spy(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", spy)
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append(("replace", str(b))), replace_(a, b))[1])
    checkpoint.save_checkpoint(tmp_path / "a.pth", {"model_state": {}})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)  # the file's data, then the folder entry


def test_train_speed_benchmark_sets_up_as_training_does(monkeypatch):
    import benchmark

    calls = []
    monkeypatch.setattr(device, "configure_backends", lambda deterministic: calls.append(deterministic))
    flags = ["--preset", "cpu", "--base-channels", "8", "--batch-size", "4"]
    row = benchmark.train_speed("mnist", flags, steps=1, warmup=0)
    assert calls == [False] and row["images_per_s"] > 0


def test_a_loss_plot_with_nothing_to_label_writes_no_warning(tmp_path):
    import json
    import warnings

    from runlog import plot_losses

    log = tmp_path / "log.jsonl"  # a run shorter than --log-every, without a validation set
    log.write_text(json.dumps({"kind": "epoch", "step": 3, "loss": 0.5, "val_loss": None}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_losses(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_fractional_epochs_end_inside_the_last_with_the_lr_schedule(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1.5, lr_schedule="linear", log_every=1)
    summary = fit(cfg, TINY, blobs(), blobs(24, seed=1))  # 6 steps an epoch: the run ends at step 9
    records = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert summary["step"] == 9 and [r["step"] for r in records if r["kind"] == "epoch"] == [6, 9]
    assert [r["lr"] for r in records if r["kind"] == "step"][-1] == pytest.approx(2e-3 / 9)  # the decay's last step
    assert load_checkpoint(tmp_path / "ck" / "epoch_2.pth")["step"] == 9


def test_sample_every_draws_grids_at_its_multiples_and_the_last_epoch(tmp_path):
    fit(tiny_config(tmp_path, epochs=5, sample_every=2), TINY, blobs(), blobs(24, seed=1))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_2.png", "epoch_4.png", "epoch_5.png"]
    assert (tmp_path / "ck" / "epoch_5.pth").is_file()  # the checkpoints of every epoch, as before


def test_tensorboard_log_holds_the_scalars_and_the_epoch_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tiny_config(tmp_path, logger="tensorboard", log_every=3), TINY, blobs(), blobs(24, seed=1))
    events = EventAccumulator(str(tmp_path / "ck" / "tensorboard"), size_guidance={"images": 0}).Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [3, 6, 9, 12]  # 2 epochs of 6 steps, a record every 3
    assert [e.step for e in events.Scalars("epoch/val_loss")] == [6, 12]
    assert all(e.value > 0 for e in events.Scalars("epoch/images_per_s"))
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([2e-3] * 4)
    grids = events.Images("samples")
    assert [g.step for g in grids] == [6, 12] and grids[0].width > 0
    # the JSON lines stay, with the same losses
    records = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)


def wandb_records(run_file: Path) -> list:
    """The records of an offline wandb run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, payload, records = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def test_wandb_offline_run_holds_the_scalars_and_the_epoch_grids(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                        "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))  # no account, nothing written outside tmp_path
    fit(tiny_config(tmp_path, logger="wandb", log_every=3), TINY, blobs(), blobs(24, seed=1))
    (run_file,) = (tmp_path / "ck" / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stem == "run-" + (tmp_path / "ck" / "wandb_id.txt").read_text()  # what a resume continues
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    records = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history if "train/loss" in h] == [3, 6, 9, 12]  # 2 epochs of 6 steps, every 3
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx(
        [r["loss"] for r in records if r["kind"] == "step"])
    epochs = [h for h in history if "epoch/val_loss" in h]
    assert [h["_step"] for h in epochs] == [6, 12] and all(h["epoch/images_per_s"] > 0 for h in epochs)
    grids = [h for h in history if h.get("samples/_type") == "image-file"]
    assert [h["_step"] for h in grids] == [6, 12]
    assert all((run_file.parent / "files" / h["samples/path"]).stat().st_size > 100 for h in grids)


def test_loggers_without_their_package_say_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        fit(tiny_config(tmp_path, logger="tensorboard"), TINY, blobs(), blobs(24, seed=1))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="pip install wandb"):
        fit(tiny_config(tmp_path, logger="wandb"), TINY, blobs(), blobs(24, seed=1))
    with pytest.raises(ValueError, match="unknown --logger 'mlflow'"):
        fit(tiny_config(tmp_path, logger="mlflow"), TINY, blobs(), blobs(24, seed=1))


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    fit(tiny_config(tmp_path, epochs=1), TINY, blobs(), None)
    capsys.readouterr()
    summary = fit(tiny_config(tmp_path, epochs=1, resume="auto"), TINY, blobs(), None)
    said = capsys.readouterr().out
    assert summary["step"] == 6 and "nothing to do: that run already reached its end at step 6" in said

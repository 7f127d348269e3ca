"""End to end on real MNIST: train a tiny model, sample a grid, and the CLI's error messages."""
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import mnist_train
from checkpoint import load_checkpoint
from data import DataError, load_mnist
from solvers import Sampler

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--base-channels", "16", "--num-res-blocks", "1", "--attention-resolutions", "7", "--dropout", "0",
              "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "20", "--val-size", "200", "--val-t-points", "2",
              "--log-every", "25"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The CPU preset's model, trained for 150 steps of 32 on 2,400 real digits."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST needs {SHARED_DATA}/MNIST/raw (make test DATA_ROOT=DIR)")
    tmp = tmp_path_factory.mktemp("mnist")
    summary = mnist_train.main([
        "--data-root", str(SHARED_DATA), "--no-download", "--subset", "2400", "--epochs", "2", *TINY_FLAGS,
        "--out-dir", str(tmp / "ck"), "--out", str(tmp / "mnist.pth"), "--sample-dir", str(tmp / "samples")])
    return tmp, summary


def test_training_loss_falls_and_outputs_are_written(trained):
    tmp, summary = trained
    assert summary["step"] == 150
    steps = [json.loads(line) for line in (tmp / "ck" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    assert losses[-1] < 0.6 * losses[0], losses
    epochs = [r for r in steps if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["images_per_s"] > 0 for r in epochs)
    for name in ("ck/epoch_1.pth", "ck/epoch_2.pth", "ck/last.pth", "mnist.pth", "ck/loss.png", "ck/config.json",
                 "samples/epoch_2.png"):
        assert (tmp / name).is_file(), name
    ckpt = load_checkpoint(tmp / "mnist.pth")
    assert ckpt["model_config"]["num_classes"] == 10 and ckpt["model_config"]["image_size"] == 28
    assert ckpt["train_config"]["batch_size"] == 32 and ckpt["preset"] == "cpu"
    assert Sampler.recorded(ckpt["sampler"]) == Sampler("midpoint", 4, 1.1)  # what every sampling path reads


@pytest.mark.parametrize("classes,dropout,guidance", [(None, 0.1, 1.0), (10, 0.1, 1.1), (10, 0.0, 1.0)])
def test_mnist_checkpoints_guide_only_where_the_null_label_was_trained(classes, dropout, guidance):
    model_cfg = replace(mnist_train.DEFAULTS[1], num_classes=classes)
    cfg = replace(mnist_train.DEFAULTS[0], label_dropout=dropout)
    assert mnist_train.mnist_sampler(model_cfg, cfg) == Sampler(guidance=guidance)


def test_mnist_test_writes_a_labelled_grid(trained, tmp_path):
    tmp, _ = trained
    out = tmp_path / "grid.png"
    result = run("mnist_test.py", "--checkpoint", str(tmp / "mnist.pth"), "--digits", "0,3,7", "--per-digit", "5",
                 "--solver", "heun", "--steps", "4", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "solver heun" in result.stdout and "NFE 16 per image" in result.stdout  # 4 steps x 2 x 2 passes
    assert "guidance 1.1" in result.stdout  # the sampler the checkpoint records
    width, height = Image.open(out).size
    assert height == 2 * (3 * 30 + 2) and width == 2 * (8 + 5 * 30 + 2)  # 3 rows x 5 digits, scaled 2x; names: 8 px


def test_generate_sample_keeps_the_seed_signature(trained):
    tmp, _ = trained
    from checkpoint import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(tmp / "mnist.pth"))
    images = mnist_train.generate_sample(model, img_size=(1, 28, 28), steps=3, labels=[1, 2], seed=0)
    assert images.shape == (2, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, mnist_train.generate_sample(model, (1, 28, 28), 3, labels=[1, 2], seed=0))
    assert mnist_train.generate_sample(model, num_samples=3).shape == (3, 1, 28, 28)  # unseeded, labels 0, 1, 2
    with pytest.raises(ValueError, match=r"img_size \(1, 128, 128\) does not match the model's \(1, 28, 28\)"):
        mnist_train.generate_sample(model, img_size=(1, 128, 128))


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pth"], "not found"),
    (["--solver", "rk9"], "unknown solver 'rk9'"),
    (["--steps", "0"], "steps must lie in 1.."),
    (["--per-digit", "0"], "--per-digit must lie in 1..1000"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--digits", "3,12"], "--digits must be between 0 and 9"),
])
def test_mnist_test_cli_errors(trained, args, message, capsys):
    """The script's own exit path (cli.run), in this process: one line, no traceback (the subprocess tests below
    cover `python mnist_test.py` itself)."""
    import mnist_test
    from cli import run as run_main

    tmp, _ = trained
    checkpoint = [] if args[0] == "--checkpoint" else ["--checkpoint", str(tmp / "mnist.pth")]
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: mnist_test.main([*checkpoint, *args]))
    said = f"{stop.value.code}\n{capsys.readouterr().err}"
    assert stop.value.code not in (0, None) and message in said and "Traceback" not in said


@pytest.mark.parametrize("args,message", [
    (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA GPU"),  # one past the last GPU: absent everywhere
    (["--guidance", "2"], "trained with --label-dropout 0"),
])
def test_mnist_test_refuses_in_one_line(tmp_path, args, message):
    from helpers import tiny_checkpoint

    tiny_checkpoint(tmp_path / "c.pth", label_dropout=0.0)
    result = run("mnist_test.py", "--checkpoint", str(tmp_path / "c.pth"), "--digits", "0,1", "--device", "cpu", *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_guidance_with_an_unconditional_model_is_refused(tmp_path):
    from helpers import TINY, blobs, tiny_config
    from dataclasses import replace
    from helpers import fit

    fit(tiny_config(tmp_path, epochs=1), replace(TINY, num_classes=None), blobs(), None)
    result = run("mnist_test.py", "--checkpoint", str(tmp_path / "best.pth"), "--device", "cpu", "--guidance", "2")
    assert result.returncode != 0 and "unconditional" in result.stderr and "Traceback" not in result.stderr
    from solvers import guided_velocity
    from checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(tmp_path / "best.pth"))
    with pytest.raises(ValueError, match="guidance 2.0 needs a class-conditional model"):
        guided_velocity(model, None, 2.0)


def test_truncated_checkpoint_is_a_one_line_error(trained, tmp_path):
    tmp, _ = trained
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp / "mnist.pth").read_bytes()[:5000])
    result = run("mnist_test.py", "--checkpoint", str(cut))
    assert result.returncode != 0 and "truncated" in result.stderr and "Traceback" not in result.stderr


def test_mnist_train_cli_errors(tmp_path):
    result = run("mnist_train.py", "--data-root", str(tmp_path / "empty"), "--no-download")
    assert result.returncode != 0 and "MNIST not found" in result.stderr and "MNIST/raw" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("mnist_train.py", "--preset", "tpu")
    assert result.returncode != 0 and "invalid choice: 'tpu'" in result.stderr


@pytest.mark.parametrize("download", [True, False])
def test_local_gz_files_are_unpacked_with_or_without_download(mnist_root, tmp_path, download):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (mnist_root / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw)
    data = load_mnist(tmp_path, train=False, download=download)  # no network either way: the files are here
    x, y = data[0]
    assert len(data) == 10_000 and x.shape == (1, 28, 28) and -1 <= x.min() < x.max() <= 1 and y == 7


def test_truncated_gz_gives_a_clear_error_and_no_half_unpacked_file(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (mnist_root / "MNIST" / "raw").glob("t10k-*.gz"):
        shutil.copy(gz, raw)
    images = raw / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(DataError, match="MNIST not found"):
        load_mnist(tmp_path, train=False, download=False)
    assert sorted(p.name for p in raw.iterdir() if p.name.startswith("t10k-images")) == ["t10k-images-idx3-ubyte.gz"]


def test_resize_flag_and_missing_data(mnist_root, tmp_path):
    data = load_mnist(mnist_root, train=False, image_size=32, download=False)
    assert data[0][0].shape == (1, 32, 32)
    with pytest.raises(DataError, match="MNIST not found"):
        load_mnist(tmp_path, train=True, download=False)


def test_running_mnist_train_twice_with_defaults_loses_nothing_of_the_first_run(mnist_root, tmp_path, monkeypatch,
                                                                                 capsys):
    """Default paths (checkpoints/mnist, checkpoints/flow_matching_mnist.pth): the second run moves the first aside
    whole, says so, and its done: line names only its own files; --existing refuse touches nothing."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    flags = ["--data-root", str(mnist_root), "--no-download", "--subset", "256", "--epochs", "1", *TINY_FLAGS]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    first = mnist_train.main(flags)
    before = {p.relative_to(tmp_path / "checkpoints"): digest(p) for p in (tmp_path / "checkpoints").rglob("*")
              if p.is_file()}
    assert Path("checkpoints/flow_matching_mnist.pth") in [Path(f) for f in first["files"]]
    with pytest.raises(ValueError, match="checkpoints/mnist holds an earlier run .* --resume auto"):
        mnist_train.main([*flags, "--existing", "refuse"])
    after_refusal = {p.relative_to(tmp_path / "checkpoints"): digest(p) for p in (tmp_path / "checkpoints").rglob("*")
                     if p.is_file()}
    assert after_refusal == before
    capsys.readouterr()
    second = mnist_train.main(flags)
    assert ("kept the earlier run: moved checkpoints/mnist -> checkpoints/mnist.1, checkpoints/flow_matching_mnist.pth "
            "-> checkpoints/flow_matching_mnist.1.pth") in capsys.readouterr().out
    aside = Path("checkpoints/mnist.1")
    for name, value in before.items():  # every file of the first run, byte for byte, under checkpoints/mnist.1
        moved = (Path("checkpoints/flow_matching_mnist.1.pth") if name == Path("flow_matching_mnist.pth") else
                 aside / name.relative_to("mnist"))
        assert digest(moved) == value, name
    assert all(Path(f).is_file() and not f.startswith(str(aside)) for f in second["files"])

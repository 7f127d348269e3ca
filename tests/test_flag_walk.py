"""Every flag of every script, from its argparse parser, with the bad values of its kind (numbers: nan, inf, -1, 0,
10**12; paths: missing, a file where a folder goes, a folder where a file goes, a binary file; choices: an unknown
one): the command must exit non-zero with one `error:` line naming the flag, no traceback, and every file under the
test's tree as it was. Values a flag rightly accepts are listed in ACCEPTED with the reason. Each command runs
in-process up to the point where work would start (a training step, an ODE solve, the demo's server), so that the
walk takes about a minute."""
from __future__ import annotations

import argparse
import hashlib
import struct
from dataclasses import replace
from pathlib import Path

import gradio
import pytest
import torch

from checkpoint import save_checkpoint

import app
import benchmark
import config
import editing
import evaluate
import fid
import mnist_test
import mnist_train
import pretrained
import rectified_flow_train
import readers
import reflow
import solvers
import trainer
from cli import run as run_main
from conftest import SHARED_DATA
from data import load_mnist
from helpers import TINY, TINY_MNIST, tiny_checkpoint
from sampling import SampleConfig

# (module, subcommand or None, the arguments that make a valid command; G: the given tree, D: real MNIST)
COMMANDS = [
    (mnist_train, None, ["--data-root", "D", "--batch-size", "32", "--epochs", "1", "--val-size", "20",
                         "--no-download"]),
    (rectified_flow_train, None, ["--data-root", "G/photos", "--image-size", "8", "--channel-mult", "1,2",
                                  "--attention-resolutions", "4", "--base-channels", "8", "--batch-size", "4"]),
    (mnist_test, None, ["--checkpoint", "G/mnist.pth"]),
    (evaluate, "mnist", ["--checkpoint", "G/mnist.pth", "--data-root", "D", "--classifier", "G/reader.pth",
                         "--n", "20"]),
    (evaluate, "fid", ["--checkpoint", "G/photo.pth", "--real-dir", "G/photos", "--n", "4"]),
    (evaluate, "straightness", ["--checkpoint", "G/mnist.pth", "--n", "10"]),
    (evaluate, "likelihood", ["--checkpoint", "G/mnist.pth", "--data-root", "D", "--n", "10"]),
    (evaluate, "train-classifier", ["--data-root", "D"]),
    (reflow, "pairs", ["--checkpoint", "G/tiny.pth", "--count", "20"]),
    (reflow, "train", ["--pairs", "G/pairs", "--val-size", "4", "--batch-size", "8"]),
    (reflow, "distill", ["--pairs", "G/pairs", "--val-size", "4", "--batch-size", "8", "--init-from", "G/tiny.pth"]),
    (editing, "invert", ["--checkpoint", "G/mnist.pth", "--data-root", "D"]),
    (editing, "swap", ["--checkpoint", "G/mnist.pth", "--data-root", "D"]),
    (editing, "interpolate", ["--checkpoint", "G/mnist.pth", "--data-root", "D"]),
    (pretrained, "export", ["--checkpoint", "G/mnist.pth", "--out", "exported", "--force"]),
    (benchmark, "nfe", ["--checkpoint", "G/mnist.pth", "--data-root", "D", "--classifier", "G/reader.pth",
                        "--n", "20"]),
    (benchmark, "guidance", ["--checkpoint", "G/mnist.pth", "--data-root", "D", "--classifier", "G/reader.pth",
                             "--n", "20"]),
    (benchmark, "fewstep", ["--checkpoints", "G/mnist.pth", "--data-root", "D", "--classifier", "G/reader.pth",
                            "--n", "20"]),
    (benchmark, "fid-sizes", ["--checkpoint", "G/photo.pth", "--real-dir", "G/photos", "--n", "4", "--sizes", "2"]),
    (benchmark, "inversion", ["--checkpoints", "G/mnist.pth", "--data-root", "D"]),
    (benchmark, "train-speed", ["mnist"]),
    (app, None, ["--checkpoint", "G/mnist.pth", "--data-root", "D"]),
]
NUMBERS = ["nan", "inf", "-1", "0", str(10**12)]
PATHS = {"missing": "G/missing/x.pth", "file for a folder": "G/notes.txt", "folder for a file": "G/afolder",
         "binary": "G/binary.bin"}
# (flag, value label) or (script, flag, value label): why a command rightly takes it
ACCEPTED = {
    ("--seed", "-1"): "any integer seeds the generators", ("--seed", "0"): "a seed", ("--seed", str(10**12)): "a seed",
    ("--max-steps", "0"): "0 = no limit", ("--max-steps", str(10**12)): "a limit beyond the run's end changes nothing",
    ("--time-budget", "0"): "0 = off", ("--time-limit", "0"): "0 = off", ("--save-every", "0"): "0 = epoch ends only",
    ("--keep-last", "0"): "0 keeps all", ("--keep-last", str(10**12)): "keeps all",
    ("--warmup-steps", "0"): "no warm-up", ("--weight-decay", "0"): "no decay", ("--grad-clip", "0"): "0 = off",
    ("--label-dropout", "0"): "no guidance training", ("--ema-decay", "0"): "no averaging",
    ("--t-mu", "-1"): "a shift toward the noise", ("--t-mu", "0"): "no shift", ("--adam-beta2", "0"): "RMS off",
    ("--adam-beta1", "0"): "momentum off",
    ("--num-workers", "0"): "loading in the main process", ("--t-grid", "0"): "0 = continuous t",
    ("--guidance", "0"): "w = 0: the unconditional model", ("--mf-weight-power", "0"): "0 = plain MSE",
    ("--mf-share", "0"): "0 = flow matching", ("--mf-curriculum", "0"): "0 = MeanFlow throughout",
    ("--mf-guidance", "0"): "w = 0: folds in the unconditional velocity", ("--dm-weight", "0"): "0 = regression alone",
    ("--dm-t-min", "0"): "t from the noise end", ("--val-size", "0"): "0 = a share of the pairs",
    ("--exact-n", "0"): "0 = none", ("--guided", "0"): "0 = none", ("--ref-steps", "0"): "0 = no reference",
    ("--warmup", "0"): "no untimed steps", ("--subset", "0"): "0 = all digits", ("--port", "0"): "0: any free port",
    ("--dropout", "0"): "no dropout", ("--val-fraction", "0"): "no validation split",
    ("--out", "missing"): "an output: created", ("--out-dir", "missing"): "an output: created",
    ("--sample-dir", "missing"): "an output: created", ("--json", "missing"): "an output: created",
    ("--stats-cache", "missing"): "a cache folder: created", ("--data-root", "missing"): "train-speed and "
    "mnist_train download there", ("--mf-mu", "-1"): "a location",
    ("--mf-mu", "0"): "a location", ("--dm-start", "0"): "0 = from the first step",
    ("--batch-size", str(10**12)): "a batch larger than a draw takes it whole (training refuses it)",
    ("--out", "file for a folder"): "an output file: one there is replaced (a run's checkpoint: moved aside, kept)",
    ("--out", "binary"): "an output file: one there is replaced (a run's checkpoint: moved aside, kept)",
    ("--json", "file for a folder"): "an output file: one there is replaced",
    ("--json", "binary"): "an output file: one there is replaced",
    ("--out-dir", "folder for a file"): "a folder, as it should be", ("--sample-dir", "folder for a file"): "a folder",
    ("--stats-cache", "folder for a file"): "a folder", ("--subset", str(10**12)): "more than the set takes it all",
    ("--shard-size", str(10**12)): "one shard holds all the pairs", ("--notes", "file for a folder"): "a text file",
    ("--host", "bogus"): "a host name: the server resolves it",
    **{("app", "--data-root", label): "the demo reads the digits when its Edit tab asks, and says so there"
       for label in ("file for a folder", "folder for a file", "binary")},
}


def tiny_mnist(root: Path, source: Path, n: int = 200) -> Path:
    """root/MNIST/raw holding the first n digits of each real split, in the idx files torchvision reads."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for train, prefix in ((True, "train"), (False, "t10k")):
        digits = load_mnist(source, train=train, download=False)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                          + digits.images[:n].numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                          + digits.labels[:n].to(torch.uint8).numpy().tobytes())
    return root


@pytest.fixture(scope="module")
def given(tmp_path_factory) -> Path:
    """The files a walk hands over: tiny checkpoints, a reader, a photo folder, pairs, junk."""
    from PIL import Image

    root = tmp_path_factory.mktemp("walk")
    tiny_checkpoint(root / "mnist.pth", TINY_MNIST)
    tiny_checkpoint(root / "tiny.pth", TINY)
    tiny_checkpoint(root / "photo.pth", replace(TINY, in_channels=3, num_classes=None))
    save_checkpoint(root / "reader.pth", {"model_state": readers.MnistClassifier().state_dict(),
                                                   "test_accuracy": 0.1, "kind": "mnist-classifier", "arch": "cnn"})
    for i in range(8):
        (root / "photos").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(root / "photos" / f"{i}.png")
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "afolder").mkdir()
    reflow.draw_pairs(root / "tiny.pth", root / "pairs", count=20, shard_size=10,
                      sample=SampleConfig(solver="euler", steps=2, guidance=1.0))
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A tiny MNIST root (200 digits a split) outside the walked tree: read, never written."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST needs {SHARED_DATA}/MNIST/raw")
    return tiny_mnist(tmp_path_factory.mktemp("digits"), SHARED_DATA)


class Work(Exception):
    """Raised where a command's work would start: every check before it has passed."""


def parser_of(module, sub: str | None, base: list[str], monkeypatch) -> argparse.ArgumentParser:
    """The parser a command parses with, caught at its parse_args."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise Work

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    try:
        module.main(([sub] if sub else []) + base)
    except Work:
        pass
    monkeypatch.undo()
    p = caught[0]
    if sub and p._subparsers and not p.prog.endswith(sub):
        p = next(a for a in p._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices[sub]
    return p


def kind(action: argparse.Action) -> str | None:
    """number | path | choice | text, or None for a flag that takes no value."""
    if action.nargs == 0 or not action.option_strings or action.help == argparse.SUPPRESS:
        return None
    if action.choices is not None:
        return "choice"
    if action.type in (int, float):
        return "number"
    name = action.dest
    pathy = ("dir", "root", "out", "checkpoint", "pairs", "resume", "init_from", "classifier", "metrics", "notes",
             "json", "teacher", "cache")
    if action.type in (None, str) and any(p in name for p in pathy):
        return "path"
    return "number" if getattr(action.type, "__name__", "").startswith(("int", "float")) else "text"


def values(k: str) -> dict[str, str]:
    if k == "number":
        return {v: v for v in NUMBERS}
    if k == "path":
        return PATHS
    return {"bogus": "bogus-value"}


def cases() -> list[tuple]:
    return [(m.__name__, sub, base) for m, sub, base in COMMANDS]


def checksums(root: Path) -> dict:
    return {p.relative_to(root): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in root.rglob("*")}


def stop_work(monkeypatch) -> None:
    """Where work starts, raise Work: the run's first step (after its outputs are made), an ODE solve, a server."""
    def work(*args, **kwargs):
        raise Work

    monkeypatch.setattr(trainer, "make_room", work)
    monkeypatch.setattr(reflow, "flow_batches", work)
    monkeypatch.setattr(fid, "inception_features", work)
    monkeypatch.setattr(benchmark, "real_features", work)
    monkeypatch.setattr(solvers, "solve", work)
    monkeypatch.setattr(evaluate, "solve", work)
    monkeypatch.setattr(evaluate, "straightness", work)
    monkeypatch.setattr(readers, "progress", work)
    monkeypatch.setattr(evaluate, "image_bits_per_dim", work)
    monkeypatch.setattr(benchmark, "train_speed", work)
    monkeypatch.setattr(gradio.Blocks, "launch", work)
    monkeypatch.setattr(config, "make_room", work)


@pytest.mark.parametrize("name, sub, base", cases(), ids=[f"{c[0]}-{c[1]}" for c in cases()])
def test_every_flag_refuses_the_bad_values_of_its_kind(given, digits, name, sub, base, monkeypatch, capsys, tmp_path):
    module = next(m for m, s, _ in COMMANDS if m.__name__ == name)
    fill = lambda a: str(digits) if a == "D" else a.replace("G/", f"{given}/") if a.startswith("G/") else a  # noqa: E731
    argv = [fill(a) for a in base]
    parser = parser_of(module, sub, argv, monkeypatch)
    wrong, tried = [], 0
    for action in parser._actions:
        k = kind(action)
        if k is None:
            continue
        flag = max(action.option_strings, key=len)
        for label, value in values(k).items():
            if (flag, label) in ACCEPTED or (name, flag, label) in ACCEPTED:
                continue
            here = tmp_path / f"{flag}-{label}".replace(" ", "-")  # where the command runs: its default outputs
            here.mkdir()
            before = checksums(given), checksums(here)
            with monkeypatch.context() as m:
                m.chdir(here)
                stop_work(m)
                outcome = attempt(module, [*([sub] if sub else []), *argv, flag, fill(value)], capsys)
            tried += 1
            if outcome != "refused":
                wrong.append(f"{flag} {label}: {outcome}")
            elif (checksums(given), checksums(here)) != before:
                wrong.append(f"{flag} {label}: refused, but the tree changed")
    print(f"walked: {tried} bad values")
    assert tried and not wrong, f"{len(wrong)} wrong:\n" + "\n".join(wrong)


def attempt(module, argv: list[str], capsys) -> str:
    """refused | accepted | a description of what went wrong."""
    flag = argv[-2]
    try:
        run_main(lambda: module.main(argv))
    except Work:
        return "accepted"
    except SystemExit as stop:
        code = stop.code
        err = [*capsys.readouterr().err.splitlines(), *([code] if isinstance(code, str) else [])]
        said = [line for line in err if "error:" in line]
        if code in (0, None):
            return "accepted"
        if len(said) != 1:
            return f"{len(said)} error lines: {err[-3:]}"
        if not any(name in said[0] for name in (flag, flag[2:].replace("-", "_"), argv[-1], Path(argv[-1]).name)):
            return f"names neither {flag} nor its value: {said[0]}"
        return "refused"
    except Exception as e:  # noqa: BLE001 - what the walk is looking for
        return f"traceback {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    capsys.readouterr()
    return "accepted"

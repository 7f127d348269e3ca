"""Bad input, table-driven: every script and the Python entry points answer one line (what is wrong, with the value,
what to do), exit non-zero without a traceback, and leave every file they were given untouched (checksums)."""
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import benchmark
import editing
import evaluate
import mnist_test
import mnist_train
import pretrained
import rectified_flow_train
import reflow
from checkpoint import CheckpointError, load_checkpoint
from cli import run as run_main
from helpers import TINY, TINY_MNIST, tiny_checkpoint
from sampling import SampleConfig, sample_from_checkpoint
from unet import ConditionalUNet

SCRIPTS = {"mnist_test": mnist_test, "mnist_train": mnist_train, "evaluate": evaluate, "reflow": reflow,
           "benchmark": benchmark, "pretrained": pretrained, "editing": editing, "rf_train": rectified_flow_train}


@pytest.fixture(scope="module")
def given(tmp_path_factory) -> Path:
    """Files a user hands over: checkpoints of two shapes, an export, junk, a run folder, pairs with a bad shard."""
    root = tmp_path_factory.mktemp("given")
    tiny_checkpoint(root / "mnist.pth", TINY_MNIST)
    tiny_checkpoint(root / "tiny.pth", TINY)
    pretrained.export(root / "mnist.pth", root / "export")
    tiny_checkpoint(root / "three.pth", replace(TINY_MNIST, num_classes=3))  # digits' shape, other classes
    pretrained.export(root / "three.pth", root / "export3")
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "afolder").mkdir()
    (root / "cut.pth").write_bytes((root / "mnist.pth").read_bytes()[:3000])
    (root / "run").mkdir()
    (root / "run" / "log.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss": 1.0}) + "\n")
    pretrained.export(root / "mnist.pth", root / "listed")
    (root / "listed" / "config.json").write_text("[1, 2]")  # a model folder whose config is a JSON list
    (root / "list.json").write_text("[1]")
    (root / "binary.bin").write_bytes(bytes(range(256)))
    nan = load_checkpoint(root / "mnist.pth")
    torch.save({**nan, "sampler": {"solver": "midpoint", "steps": 4, "guidance": float("nan")}}, root / "nan.pth")
    reflow.draw_pairs(root / "tiny.pth", root / "pairs", count=20, shard_size=10,
                      sample=SampleConfig(solver="euler", steps=2, guidance=1.0))
    reflow.draw_pairs(root / "tiny.pth", root / "badpairs", count=20, shard_size=10,
                      sample=SampleConfig(solver="euler", steps=2, guidance=1.0))
    shard = root / "badpairs" / "shard_00001.pt"
    shard.write_bytes(shard.read_bytes()[:500])
    return root


def checksums(root: Path) -> dict:
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


G = "{given}"  # replaced by the fixture's folder
NUMBERS = [("--lr", "0", "--lr must be > 0"), ("--lr", "nan", "--lr must be > 0"),
           ("--epochs", "0", "--epochs must be"),
           ("--batch-size", "0", "--batch-size must be"), ("--ema-decay", "1.5", "--ema-decay must lie in"),
           ("--label-dropout", "-0.1", "--label-dropout must lie in"), ("--grad-clip", "nan", "--grad-clip must be"),
           ("--warmup-steps", "-1", "--warmup-steps must be"), ("--time-limit", "-1", "--time-limit must be"),
           ("--val-t-points", "0", "--val-t-points must be"), ("--keep-last", "-2", "--keep-last must be"),
           ("--log-every", "0", "--log-every must be"), ("--mf-sigma", "0", "--mf-sigma must be > 0"),
           ("--weight-decay", "nan", "--weight-decay must be"), ("--max-steps", "-5", "--max-steps must be"),
           ("--t-mu", "nan", "give a finite value"), ("--adam-beta2", "1", "--adam-beta2 must lie in [0, 1)"),
           ("--coupling", "exact", "unknown --coupling 'exact'")]
CASES = [
    # class: missing, foreign or corrupt inputs
    ("mnist_test", ["--checkpoint", f"{G}/missing.pth"], "not found"),
    ("mnist_test", ["--checkpoint", f"{G}/notes.txt"], "truncated or not a PyTorch checkpoint"),
    ("mnist_test", ["--checkpoint", f"{G}/cut.pth"], "truncated or not a PyTorch checkpoint"),
    ("mnist_test", ["--checkpoint", f"{G}/afolder"], "is not an exported model folder"),
    ("evaluate", ["mnist", "--checkpoint", f"{G}/missing.pth"], "not found"),
    ("evaluate", ["mnist", "--checkpoint", f"{G}/mnist.pth", "--classifier", f"{G}/nope.pth", "--data-root", "{data}"],
     "make it first with `python evaluate.py train-classifier"),
    ("evaluate", ["train-classifier", "--data-root", f"{G}/nowhere"], "MNIST"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/missing.pth", "--out-dir", f"{G}/newpairs"], "not found"),
    ("reflow", ["train", "--pairs", f"{G}/afolder"], "no manifest.json"),
    ("reflow", ["train", "--pairs", f"{G}/badpairs", "--out-dir", f"{G}/out"], "shard_00001.pt is truncated"),
    ("pretrained", ["export", "--checkpoint", f"{G}/missing.pth", "--out", f"{G}/e2"], "not found"),
    ("pretrained", ["export", "--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/afolder"], "not an exported model"),
    ("pretrained", ["export", "--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/export"], "pass --force"),
    ("mnist_train", ["--data-root", f"{G}/nowhere", "--no-download", "--out-dir", f"{G}/o"], "MNIST not found"),
    ("rf_train", ["--data-root", f"{G}/nowhere", "--out-dir", f"{G}/o"], "does not exist"),
    ("editing", ["invert", "--checkpoint", f"{G}/missing.pth", "--data-root", G], "not found"),
    # class: values no run can use
    *[("mnist_train", [flag, value, "--out-dir", f"{G}/o", "--objective", "meanflow"], message)
      for flag, value, message in NUMBERS],
    *[("rf_train", [flag, value, "--out-dir", f"{G}/o", "--data-root", f"{G}/afolder"], message)
      for flag, value, message in NUMBERS if flag != "--mf-sigma"],
    ("rf_train", ["--image-size", "30", "--data-root", f"{G}/afolder"], "image size 30 cannot go through"),
    ("mnist_train", ["--label-dropout", "1", "--out-dir", f"{G}/o"], "--label-dropout 1 drops every label"),
    ("mnist_train", ["--t-schedule", "uniform", "--out-dir", f"{G}/o"], "--t-mu -0.5 shifts the logit-normal"),
    ("mnist_train", ["--objective", "mean", "--out-dir", f"{G}/o"], "unknown --objective 'mean'"),
    ("mnist_train", ["--existing", "keep", "--out-dir", f"{G}/o"], "unknown --existing 'keep'"),
    ("mnist_train", ["--num-classes", "5", "--out-dir", f"{G}/o"], "MNIST has 1 channel and 10 classes"),
    ("mnist_train", ["--channel-mult", "x"], "invalid comma-separated integers"),
    ("mnist_train", ["--resume", f"{G}/mnist.pth", "--init-from", f"{G}/mnist.pth"], "give one of the two"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--solver", "rk45"], "unknown solver 'rk45'"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--steps", "0"], "steps must lie in 1.."),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--guidance", "inf"], "guidance must be a finite number"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--digits", "3,10"], "--digits must be between 0 and 9"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--digits", "a"], "--digits takes comma-separated digits"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--per-digit", "100000"], "--per-digit must lie in 1..1000"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--batch-size", "0"], "batch_size must be >= 1"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--solver", "meanflow"], "jumps along average velocities"),
    ("evaluate", ["mnist", "--checkpoint", f"{G}/mnist.pth", "--n", "15", "--data-root", "{data}"], "--n must be"),
    ("evaluate", ["fid", "--checkpoint", f"{G}/mnist.pth", "--real-dir", f"{G}/afolder"], "compare unlike things"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--count", "0", "--out-dir", f"{G}/p0"], "--count"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--count", str(10**13), "--out-dir", f"{G}/p1"], "GB"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--states", "--solver", "dopri5", "--out-dir", f"{G}/p2"],
     "--states keeps the points of a fixed-step grid"),
    ("reflow", ["train", "--pairs", f"{G}/pairs", "--objective", "meanflow"], "distill --objective meanflow"),
    ("reflow", ["train", "--pairs", f"{G}/pairs", "--val-size", "50"], "--val-size must lie between"),
    ("reflow", ["distill", "--pairs", f"{G}/pairs", "--k", "0", "--init-from", f"{G}/tiny.pth", "--val-size", "4"],
     "--k must lie in 1..1000"),
    ("reflow", ["distill", "--pairs", f"{G}/pairs", "--objective", "meanflow", "--init-from", f"{G}/tiny.pth"],
     "holds endpoints only"),
    ("reflow", ["distill", "--pairs", f"{G}/pairs", "--val-size", "4"], "pass --init-from PATH"),
    ("benchmark", ["train-speed", "mnist", "--steps", "0"], "--steps must be >= 1"),
    ("benchmark", ["fewstep", "--checkpoints", f"{G}/missing.pth", "--data-root", G], "not found"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--shard-size", "0", "--out-dir", f"{G}/p3"], "--shard-size"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--guidance", "nan", "--out-dir", f"{G}/p4"], "finite"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--weights", "best", "--out-dir", f"{G}/p5"],
     "invalid choice: 'best'"),
    ("editing", ["swap", "--checkpoint", f"{G}/mnist.pth", "--solver", "rk45", "--data-root", G], "unknown solver"),
    ("editing", ["invert", "--checkpoint", f"{G}/mnist.pth", "--steps", "0", "--data-root", G], "steps must lie in"),
    ("evaluate", ["straightness", "--checkpoint", f"{G}/missing.pth"], "not found"),
    ("evaluate", ["likelihood", "--checkpoint", f"{G}/mnist.pth"], "give the images"),
    ("pretrained", ["export", "--checkpoint", f"{G}/notes.txt", "--out", f"{G}/e3"], "truncated or not"),
    # the cases of issue 58, each named there
    ("mnist_test", ["--checkpoint", f"{G}/listed"], "holds a JSON list, not the object"),
    ("evaluate", ["mnist", "--checkpoint", f"{G}/mnist.pth", "--classifier", f"{G}/mnist.pth", "--data-root", "{data}"],
     "is not an MNIST classifier written by evaluate.py"),
    ("pretrained", ["export", "--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/e4", "--metrics", f"{G}/list.json"],
     "holds a JSON list, not the object"),
    ("pretrained", ["export", "--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/e5", "--metrics", f"{G}/binary.bin"],
     "--metrics"),
    ("pretrained", ["export", "--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/e6", "--notes", f"{G}/binary.bin"],
     "--notes"),
    ("mnist_test", ["--checkpoint", f"{G}/nan.pth"], "the checkpoint's recorded sampler"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/samples"], "give an image file name ending in"),
    ("mnist_test", ["--checkpoint", f"{G}/mnist.pth", "--out", f"{G}/notes.txt/x.png"], "is a file: pick another"),
    ("reflow", ["pairs", "--checkpoint", f"{G}/tiny.pth", "--out-dir", f"{G}/notes.txt"], "is a file: pick another"),
    ("editing", ["swap", "--checkpoint", f"{G}/mnist.pth", "--indices", "5-2", "--data-root", G], "reversed"),
    ("editing", ["swap", "--checkpoint", f"{G}/mnist.pth", "--data-root", G, "--image-dir", G], "not both"),
    ("mnist_train", ["--backbone", "dit", "--out-dir", f"{G}/o"], "--preset cpu-dit"),
    ("mnist_train", ["--num-classes", "none", "--label-dropout", "0.5", "--out-dir", f"{G}/o"], "none to drop"),
    ("mnist_train", ["--lr", "inf", "--out-dir", f"{G}/o"], "--lr must be"),
    ("evaluate", ["likelihood", "--checkpoint", f"{G}/mnist.pth", "--n", str(10**9)], "--n must lie in"),
    ("evaluate", ["train-classifier", "--data-root", "{data}", "--epochs", "0"], "--epochs must lie in 1..100"),
    ("reflow", ["distill", "--pairs", f"{G}/pairs", "--init-from", f"{G}/tiny.pth", "--recommend-steps", "3"],
     "unrecognized arguments: --recommend-steps 3"),
    ("reflow", ["distill", "--pairs", f"{G}/pairs", "--init-from", f"{G}/tiny.pth", "--objective", "meanflow", "--k",
                "2"], "leave --k out"),
    # class: a model of other data or kind
    ("mnist_train", ["--data-root", "{data}", "--subset", "64", "--batch-size", "32", "--init-from", f"{G}/tiny.pth",
                     "--out-dir", f"{G}/o"], "image_size: 8 vs 28"),
    ("mnist_train", ["--data-root", "{data}", "--subset", "64", "--batch-size", "32", "--resume", f"{G}/export",
                     "--out-dir", f"{G}/o"], "is an exported folder"),
    ("mnist_train", ["--data-root", "{data}", "--subset", "64", "--batch-size", "32", "--objective", "meanflow",
                     "--init-from", f"{G}/export3", "--out-dir", f"{G}/o"], "num_classes: 3 vs 10"),
    # class: outputs that cannot be written, and another run's files
    ("mnist_train", ["--data-root", "{data}", "--out-dir", f"{G}/notes.txt"], "is a file"),
    ("mnist_train", ["--data-root", "{data}", "--out-dir", f"{G}/o", "--out", f"{G}/afolder"], "is a folder"),
    ("mnist_train", ["--data-root", "{data}", "--out-dir", f"{G}/o", "--sample-dir", f"{G}/notes.txt/s"], "is a file"),
    ("mnist_train", ["--data-root", "{data}", "--out-dir", f"{G}/run", "--existing", "refuse"],
     "holds an earlier run (log.jsonl): continue it with --resume auto"),
]


@pytest.mark.parametrize("script, args, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_bad_input_is_one_line_and_touches_nothing(given, mnist_root, script, args, message, capsys):
    before = checksums(given)
    argv = [a.replace(G, str(given)).replace("{data}", str(mnist_root)) for a in args]
    if script in ("mnist_train", "rf_train") and "--out" not in args:  # never the repo's own checkpoints/
        argv += ["--out", str(given / "o" / "best.pth")]
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: SCRIPTS[script].main(argv))
    code = stop.value.code  # cli.run's "error: ..." (printed by the interpreter on exit), or argparse's status 2
    err = [*capsys.readouterr().err.splitlines(), *([code] if isinstance(code, str) else [])]
    said = "\n".join(line for line in err if line.strip() and not line.startswith(("usage:", " ")))
    assert code not in (0, None) and "Traceback" not in said, said
    assert message in said and len([line for line in said.splitlines() if "error: " in line]) == 1, said
    assert checksums(given) == before


API = [
    (lambda g: sample_from_checkpoint(g / "missing.pth"), CheckpointError, "not found"),
    (lambda g: sample_from_checkpoint(g / "mnist.pth", labels=[1.5]), ValueError, "class indices"),
    (lambda g: sample_from_checkpoint(g / "mnist.pth", labels=[10]), ValueError, "label 10 is out of range"),
    (lambda g: sample_from_checkpoint(g / "mnist.pth", steps=0), ValueError, "steps must lie in 1.."),
    (lambda g: sample_from_checkpoint(g / "mnist.pth", solver="ode45"), ValueError, "unknown solver"),
    (lambda g: sample_from_checkpoint(g / "mnist.pth", guidance=float("nan")), ValueError, "finite"),
    (lambda g: sample_from_checkpoint(g / "mnist.pth", out_path=g / "notes.txt" / "x.png"), (ValueError, OSError),
     "notes.txt"),
    (lambda g: editing.invert_from_checkpoint(g / "mnist.pth", torch.full((1, 1, 28, 28), float("nan")),
                                              labels=[0]), ValueError, "NaN"),
    (lambda g: editing.invert_from_checkpoint(g / "mnist.pth", torch.rand(1, 1, 28, 28), labels=torch.tensor([0.5])),
     ValueError, "integers"),
    (lambda g: editing.invert_from_checkpoint(g / "mnist.pth", torch.rand(1, 1, 8, 8), labels=[0]), ValueError,
     "images must be (B, 1, 28, 28)"),
    (lambda g: ConditionalUNet.from_pretrained(str(g / "nope")), ValueError, "no such folder"),
    (lambda g: ConditionalUNet.from_pretrained(str(g / "afolder")), ValueError, "is not an exported model folder"),
    (lambda g: load_checkpoint(g / "notes.txt"), CheckpointError, "truncated or not a PyTorch checkpoint"),
    (lambda g: reflow.load_pairs(g / "badpairs", val_size=2), ValueError, "shard_00001.pt is truncated"),
]


@pytest.mark.parametrize("call, error, message", API, ids=[f"api-{i}" for i in range(len(API))])
def test_the_python_entry_points_raise_one_clear_error(given, call, error, message):
    before = checksums(given)
    with pytest.raises(error) as raised:
        call(given)
    assert message in str(raised.value) and "\n" not in str(raised.value).strip()
    assert checksums(given) == before


def test_a_refused_run_leaves_an_earlier_checkpoint_where_it_was(tmp_path, mnist_root, monkeypatch):
    """--out-dir a file is refused before the earlier run's checkpoint would be moved aside."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "flow_matching_mnist.pth").write_bytes(b"the earlier run")
    (tmp_path / "afile").write_text("a file")
    before = checksums(tmp_path)
    with pytest.raises(SystemExit):
        run_main(lambda: mnist_train.main(["--data-root", str(mnist_root), "--out-dir", "afile"]))
    assert checksums(tmp_path) == before and sorted(p.name for p in tmp_path.rglob("*")) == [
        "afile", "checkpoints", "flow_matching_mnist.pth"]


def test_a_failed_download_removes_the_folders_it_made(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    import data

    def offline(self):
        (Path(self.root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does, then fails
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(data.DataError, match="MNIST not found"):
        data.load_mnist(tmp_path / "new" / "data", train=True)
    assert list(tmp_path.iterdir()) == []

"""Metrics (Fréchet distance, MNIST classifier) and the benchmark CLI on small real data."""
import json

import pytest
import torch

import benchmark
import checkpoint
import evaluate
from checkpoint import CheckpointError, load_checkpoint
from data import TensorImages, load_mnist
import readers
from evaluate import frechet_distance, frechet_from_stats, mnist_quality
from readers import MnistClassifier, load_classifier, predict, tensors, train_classifier
from helpers import TINY_MNIST, tiny_checkpoint
from sampling import MEANFLOW_SAMPLER, load_for_sampling, sample_model
from solvers import Sampler
from unet import ConditionalUNet


def test_frechet_zero_for_identical_sets_and_symmetric():
    torch.manual_seed(0)
    a, b = torch.randn(500, 6), torch.randn(400, 6) * 1.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.5


def test_frechet_closed_form_for_gaussians():
    mu1, mu2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0])
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = (mu1 - mu2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum()  # diagonal covariances
    assert frechet_from_stats(mu1, torch.diag(d1), mu2, torch.diag(d2)) == pytest.approx(expected.item(), rel=1e-9)
    # Non-diagonal: S1 = A^2 with A symmetric positive definite, S2 = I  ->  Tr((A - I)^2)
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    expected = torch.trace((a - torch.eye(3, dtype=torch.float64)) @ (a - torch.eye(3, dtype=torch.float64)))
    identity = torch.eye(3, dtype=torch.float64)
    assert frechet_from_stats(zero, a @ a, zero, identity) == pytest.approx(expected.item(), rel=1e-9)
    # From samples: large N approaches the population value
    torch.manual_seed(0)
    x = torch.randn(200_000, 3) * d1.sqrt() + mu1
    y = torch.randn(200_000, 3) * d2.sqrt() + mu2
    population = ((mu1 - mu2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum()).item()
    assert frechet_distance(x, y) == pytest.approx(population, rel=0.02)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST needs {SHARED_DATA}/MNIST/raw (make test DATA_ROOT=DIR)")
    path = tmp_path_factory.mktemp("clf") / "clf.pth"
    accuracy = train_classifier(str(SHARED_DATA), epochs=1, subset=6000, out=str(path))
    return path, accuracy, SHARED_DATA


def test_classifier_trains_and_metrics_behave(classifier):
    path, accuracy, root = classifier
    assert accuracy > 0.90
    model, stored = load_classifier(path)
    assert stored == accuracy
    real = load_mnist(root, train=False, download=False)
    x, y = tensors(real, 1000)
    preds, feats = predict(model, x)
    assert (preds == y).float().mean().item() == pytest.approx(accuracy, abs=0.04)
    _, other = predict(model, tensors(real, 1000, start=1000)[0])
    _, noise = predict(model, torch.rand(1000, 1, 28, 28) * 2 - 1)
    floor = frechet_distance(other, feats)
    assert frechet_distance(noise, feats) > 20 * floor


def test_the_second_reader_trains_on_shifted_digits_and_loads_as_its_arch(classifier, tmp_path):
    _, _, root = classifier
    path = tmp_path / "bn.pth"
    accuracy = train_classifier(str(root), epochs=1, subset=3000, out=str(path), arch="bn-cnn")
    model, stored = load_classifier(path)
    assert isinstance(model, readers.MnistBNClassifier) and not model.training and stored == accuracy > 0.90
    x, y = tensors(load_mnist(root, train=False, download=False), 500)
    preds, feats = predict(model, x)
    assert feats.shape == (500, 128) and (preds == y).float().mean().item() == pytest.approx(accuracy, abs=0.05)
    with pytest.raises(ValueError, match="unknown classifier arch 'vit'"):
        train_classifier(str(root), out=None, arch="vit")


def test_random_shift_moves_each_image_by_its_own_offset_within_the_limit():
    x = torch.full((200, 1, 9, 9), -1.0)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    torch.manual_seed(0)
    where = (readers.random_shift(x, 2) == 1).nonzero()[:, 2:] - 4
    assert len(where) == 200 and where.abs().max() == 2  # every pixel kept, moved at most 2 each way
    assert len({tuple(w) for w in where.tolist()}) == 25  # all 5 x 5 offsets occur across the batch


def test_missing_classifier_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="make it first with `python evaluate.py train-classifier --data-root DIR "
                                              "--out .*none.pth`"):
        load_classifier(tmp_path / "none.pth")
    monkeypatch.chdir(tmp_path)  # the second reader's default path, absent here: the advice names its --arch
    with pytest.raises(CheckpointError, match="--arch bn-cnn --out checkpoints/mnist_classifier_bn.pth"):
        load_classifier("checkpoints/mnist_classifier_bn.pth")
    foreign = {"kind": "mnist-classifier", "arch": "vit", "model_state": {}, "test_accuracy": 0.9}
    torch.save(foreign, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="arch 'vit', which this repo does not know"):
        load_classifier(tmp_path / "vit.pth")


@pytest.fixture(scope="module")
def tiny_mnist_checkpoint(tmp_path_factory):
    """An untrained 28 px class-conditional checkpoint: enough to exercise the benchmark plumbing."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    tiny_checkpoint(path, TINY_MNIST)
    return path


def test_benchmark_nfe_and_guidance_write_json_and_png(classifier, tiny_mnist_checkpoint, tmp_path):
    clf, _, root = classifier
    common = ["--checkpoint", str(tiny_mnist_checkpoint), "--classifier", str(clf), "--data-root", str(root),
              "--n", "20", "--device", "cpu", "--out-dir", str(tmp_path)]
    rows = benchmark.main(["nfe", *common, "--solvers", "euler,heun", "--steps", "1,2", "--tolerances", "1e-2",
                           "--ref-steps", "3"])
    data = json.loads((tmp_path / "nfe.json").read_text())
    assert [(r["solver"], r["nfe"]) for r in data["rows"]][:4] == [("euler", 1), ("euler", 2), ("heun", 2), ("heun", 4)]
    assert data["rows"][-1]["reference"] and data["rows"][-1]["nfe"] == 12 and len(rows) == 6
    assert all(0 <= r["accuracy"] <= 1 and r["frechet"] > 0 and r["n"] == 20 for r in rows)
    assert (tmp_path / "nfe_vs_frechet.png").stat().st_size > 1000
    benchmark.main(["guidance", *common, "--scales", "1,3", "--steps", "2"])
    data = json.loads((tmp_path / "guidance.json").read_text())
    assert [(r["guidance"], r["nfe"]) for r in data["rows"]] == [(1.0, 4), (3.0, 8)]  # midpoint, 2 steps; guided: x2
    assert (tmp_path / "guidance.png").stat().st_size > 1000


def test_benchmark_fewstep_compares_models_at_equal_nfe_and_their_own_sampler(classifier, tiny_mnist_checkpoint,
                                                                              tmp_path):
    from dataclasses import replace

    from checkpoint import save_checkpoint

    clf, _, root = classifier
    one_step = tmp_path / "d1.pth"  # the same weights posing as a distilled model that samples in one Euler step
    save_checkpoint(one_step, {**load_checkpoint(tiny_mnist_checkpoint), "kind": "distilled-1",
                               "sampler": {"solver": "euler", "steps": 1, "guidance": 1.0}})
    meanflow = tmp_path / "mf.pth"
    tiny_checkpoint(meanflow, replace(TINY_MNIST, average_velocity=True))
    save_checkpoint(meanflow, {**load_checkpoint(meanflow), "kind": "meanflow", "sampler": MEANFLOW_SAMPLER.record()})
    rows = benchmark.main(["fewstep", "--checkpoints", f"{tiny_mnist_checkpoint},{one_step},{meanflow}",
                           "--classifier", str(clf), "--data-root", str(root), "--n", "20", "--nfe", "1,2",
                           "--n-straightness", "10", "--guided", "1.5", "--minutes", "5,15,10", "--device", "cpu",
                           "--out-dir", str(tmp_path)])
    assert [(r["kind"], r["solver"], r["nfe"], r["guidance"], r["recommended"], r["minutes"]) for r in rows] == [
        ("1-rectified", "euler", 1, 1.0, False, 5), ("1-rectified", "euler", 2, 1.0, False, 5),
        ("1-rectified", "midpoint", 8, 1.0, True, 5), ("1-rectified", "euler", 2, 1.5, False, 5),
        ("distilled-1", "euler", 1, 1.0, True, 15), ("distilled-1", "euler", 2, 1.0, False, 15),
        ("distilled-1", "euler", 2, 1.5, False, 15),
        ("meanflow", "meanflow", 1, 1.0, True, 10), ("meanflow", "meanflow", 2, 1.0, False, 10),
        ("meanflow", "meanflow", 2, 1.5, False, 10)]
    assert rows[0]["straightness"] == rows[4]["straightness"] > 0  # the same weights, the same paths
    assert all(r["excess"] == pytest.approx(r["frechet"] - r["floor"]) for r in rows)
    assert (tmp_path / "fewstep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "fewstep.json").read_text())["rows"]
    assert (tmp_path / "fewstep_minutes.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="--minutes gives 1 values for 2 checkpoints"):
        benchmark.main(["fewstep", "--checkpoints", f"{one_step},{meanflow}", "--minutes", "5",
                        "--classifier", str(clf),
                        "--data-root", str(root), "--n", "20", "--device", "cpu", "--out-dir", str(tmp_path)])


def test_evaluate_straightness_uses_the_recommended_guidance_and_writes_json(tiny_mnist_checkpoint, tmp_path):
    result = evaluate.main(["straightness", "--checkpoint", str(tiny_mnist_checkpoint), "--n", "10", "--device", "cpu",
                            "--json", str(tmp_path / "out" / "s.json")])
    stored = json.loads((tmp_path / "out" / "s.json").read_text())
    assert stored["straightness"] == result["straightness"] > 0 and stored["guidance"] == 1.0
    assert set(stored["distance"]) == {"1", "2", "4", "8"} and stored["reference_steps"] == 64


def test_train_speed_reports_images_per_second(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN reads it once, at its first use in the process
    out = tmp_path / "speed.json"
    benchmark.main(["train-speed", "mnist", "--preset", "cpu", "--base-channels", "8", "--batch-size", "8",
                    "--steps", "2", "--warmup", "1", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["images_per_s"] > 0 and row["preset"] == "cpu" and row["model"]["base_channels"] == 8
    assert row["torch"] == torch.__version__ and row["threads"] >= 1
    assert row["isa_caps"] == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert torch.cuda.is_available() or "a stand-in capped by ONEDNN_MAX_CPU_ISA=AVX2" in row["device"]


def test_train_speed_times_the_meanflow_step(tmp_path):
    """The benchmark builds the model the objective trains (average velocity), as a training run does."""
    out = tmp_path / "speed.json"
    benchmark.main(["train-speed", "mnist", "--preset", "cpu", "--base-channels", "8", "--batch-size", "8",
                    "--steps", "1",
                    "--warmup", "0", "--out", str(out), "--objective", "meanflow", "--mf-share", "0.5"])
    row = json.loads(out.read_text())["rows"][0]
    assert row["images_per_s"] > 0 and row["model"]["average_velocity"] and row["train"]["objective"] == "meanflow"


def indexed_digits(n: int) -> TensorImages:
    """n fake 28 px test digits whose first two pixels spell their index, so a set's origin can be read back."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    return TensorImages(images, torch.arange(n) % 10, 28)


def test_the_reference_and_floor_are_disjoint_class_balanced_random_test_digits(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "predict", lambda clf, images: (seen.append(images), predict(clf, images))[1])
    torch.manual_seed(0)
    model, real = ConditionalUNet(TINY_MNIST).eval(), indexed_digits(400)
    result = mnist_quality(model, MnistClassifier(), real, 100, Sampler("euler", 1))
    generated, reference, floor = seen
    index = lambda images: ((images[:, 0, 0, 0] + 1) * 127.5).round().long() * 256 + (  # noqa: E731
        (images[:, 0, 0, 1] + 1) * 127.5).round().long()
    ref, other = index(reference), index(floor)
    assert len(set(ref.tolist()) | set(other.tolist())) == 200  # disjoint
    assert torch.equal(torch.bincount(real.labels[ref], minlength=10), torch.full((10,), 10))  # 10 of each digit
    assert torch.equal(torch.bincount(real.labels[other], minlength=10), torch.full((10,), 10))
    assert ref.max() > 300 and ref.min() < 100  # spread over the whole split, not a contiguous range
    assert result["excess"] == pytest.approx(result["frechet"] - result["floor"])
    smaller, _ = evaluate.reference_sets(real.labels, 50)
    assert set(smaller.tolist()) <= set(ref.tolist())  # a larger N extends the smaller reference
    with pytest.raises(ValueError, match="between 20 and 200: the reference and floor sets are two disjoint"):
        mnist_quality(model, MnistClassifier(), indexed_digits(400), 210)  # 40 of each digit: 20 + 20 at most


@pytest.mark.parametrize("main,command", [(evaluate.main, "mnist"), (benchmark.main, "nfe")],
                         ids=["evaluate", "benchmark"])
@pytest.mark.parametrize("args,message", [
    (["--guidance", "2"], "trained with --label-dropout 0"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA GPU"),  # one past the last GPU: absent everywhere
])
def test_quality_commands_refuse_before_sampling(tmp_path, main, command, args, message):
    tiny_checkpoint(tmp_path / "c.pth", TINY_MNIST, label_dropout=0.0)
    common = ["--checkpoint", str(tmp_path / "c.pth"), "--classifier", str(tmp_path / "absent.pth"), "--device", "cpu"]
    with pytest.raises(ValueError, match=message):  # before the (absent) classifier is needed
        main([command, *common, *args])


@pytest.mark.parametrize("name", ["mnist-1rf", "mnist-meanflow"])
def test_committed_models_draw_the_digits_their_cards_say(classifier, name):
    clf, clf_accuracy, _ = classifier
    folder = checkpoint.PRETRAINED / name
    card = json.loads((folder / "flow_config.json").read_text())["metrics"]
    loaded = load_for_sampling(folder)
    labels = torch.arange(300) % 10
    samples = sample_model(loaded.model, 300, labels, loaded.sampler, seed=1)
    preds, _ = predict(load_classifier(clf)[0], samples.images * 2 - 1)
    # the card's figure is by a 99.2% classifier at N = 4,000; this one is weaker (1 epoch) and N smaller
    accuracy = (preds == labels).float().mean().item()
    assert card["accuracy"] - 0.06 - (1 - clf_accuracy) < accuracy < card["accuracy"] + 0.04

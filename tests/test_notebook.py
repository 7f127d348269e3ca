"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom in a real Jupyter kernel."""
import sys
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest
import torch
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from checkpoint import save_checkpoint
from ema import EMA
from flow import flow_matching_loss
from helpers import TINY, blobs
from unet import ConditionalUNet

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def tiny_checkpoint(path: Path, steps: int = 30, **extra) -> Path:
    """A class-conditional 8x8 checkpoint fitted for a few steps: the notebook must run, quality does not matter."""
    torch.manual_seed(0)
    data = blobs()
    x = torch.stack([data[i][0] for i in range(len(data))])
    model = ConditionalUNet(TINY)
    ema = EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = flow_matching_loss(model, x, data.labels, TINY.num_classes, label_dropout=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    save_checkpoint(path, {"epoch": 1, "step": steps, "loss": loss.item(), "model_state": model.state_dict(),
                           "ema_state": ema.state_dict(), "optimizer_state": opt.state_dict(),
                           "model_config": asdict(TINY), "train_config": {"label_dropout": 0.1},
                           "class_names": ["a", "b", "c"], **extra})
    return path


def run_notebook(cwd: Path, checkpoint: str, few_step: str | None) -> nbformat.NotebookNode:
    """Execute the notebook from cwd with its parameters cell replaced, then print the kernel's sys.prefix."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in params.metadata.get("tags", []), "the first code cell must be the parameters cell"
    params.source = f"CHECKPOINT = {checkpoint!r}\nFEW_STEP_CHECKPOINT = {few_step!r}\nDEVICE = 'cpu'\nDATA_ROOT = None"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    return execute(nb, cwd)


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run nb's cells from cwd in a kernel of this environment."""
    # Only this environment's kernel spec: a user-level "python3" spec must not swap in another Python.
    specs = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_and_draws_every_figure(tmp_path):
    path = str(tiny_checkpoint(tmp_path / "tiny.pth"))
    # What reflow.py records: the few-step cell samples it with its own sampler too.
    few_step = str(tiny_checkpoint(tmp_path / "few.pth", steps=5, kind="distilled-1",
                                   sampler={"solver": "euler", "steps": 1, "guidance": 1.0}))
    nb = run_notebook(ROOT, path, few_step)
    kernel_prefix = nb.cells[-1].outputs[0].text.strip()
    assert Path(kernel_prefix) == Path(sys.prefix), f"the kernel ran {kernel_prefix}, not this environment"
    figures = [c for c in nb.cells if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert len(figures) == 5  # labelled grid, guidance sweep, NFE sweep, few-step comparison, editing


def test_missing_checkpoint_says_make_train_from_notebooks_folder():
    with pytest.raises(CellExecutionError, match="FileNotFoundError") as err:
        run_notebook(ROOT / "notebooks", "checkpoints/not_there.pth", few_step=None)
    assert str(ROOT / "checkpoints" / "not_there.pth") in str(err.value) and "make train" in str(err.value)


def test_the_setup_cell_clones_and_installs_outside_a_clone(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (setup,) = [c for c in nb.cells if "setup" in c.metadata.get("tags", [])]
    assert "REPO_URL = " in setup.source
    setup.source = setup.source.replace(setup.source.split("REPO_URL = ")[1].split()[0], repr(str(ROOT)))  # local
    nb.cells = [setup, nbformat.v4.new_code_cell("import sampling; print(ROOT, sampling.__file__)")]
    execute(nb, tmp_path)
    stdout = [o for o in nb.cells[-1].outputs if o.get("name") == "stdout"]  # (stderr may carry import warnings)
    root, module = stdout[-1].text.split()
    assert Path(root) == tmp_path / "flow-image-generator" and Path(module) == Path(root) / "sampling.py"

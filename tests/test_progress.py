"""Progress bars of long jobs (progress.progress): on a terminal only, hidden by TQDM_DISABLE=1, none for 1 batch."""
import io

import pytest
import torch

from helpers import TINY
from sampling import sample_model
from solvers import Sampler
from unet import ConditionalUNet


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr,disable,batches,shown", [
    (Terminal, None, 3, True), (Terminal, "1", 3, False), (io.StringIO, None, 3, False), (Terminal, None, 1, False)])
def test_sampling_shows_a_bar_on_a_terminal_unless_asked_not_to(stderr, disable, batches, shown, monkeypatch):
    err = stderr()
    monkeypatch.setattr("sys.stderr", err)
    if disable:
        monkeypatch.setenv("TQDM_DISABLE", disable)
    model = ConditionalUNet(TINY).eval()
    images = sample_model(model, 6, torch.arange(6) % 3, Sampler("euler", 1), batch_size=6 // batches).images
    assert images.shape == (6, 1, 8, 8)
    assert (f"sampling:   0%|          | 0/{batches} " in err.getvalue()) == shown  # the bar as it opens

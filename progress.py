"""What long jobs show the person running them: progress bars on a terminal, and one-line notes that do not break
them."""
from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm import tqdm


def live_bars() -> bool:
    """The one rule for progress bars: live on a terminal (stderr), never in a log file or with TQDM_DISABLE=1."""
    return os.environ.get("TQDM_DISABLE", "") in ("", "0") and sys.stderr.isatty()


def progress(iterable: Iterable, desc: str, unit: str = "batch") -> Iterable:
    """iterable with a tqdm bar on stderr for a job of several batches (live_bars), cleared when the job ends."""
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not live_bars() or len(iterable) < 2)


def note(text: str) -> None:
    """A line to the person running the job (stderr), above any live bar."""
    tqdm.write(text, file=sys.stderr)

"""Run under torchrun by test_trainer.py (gloo, CPU) and test_cuda.py (NCCL): train the tiny model with DDP,
then save each rank's weights and logged loss so the test can check that the ranks stayed in step.

    python -m torch.distributed.run --nproc_per_node=N tests/ddp_worker.py OUT_DIR [cpu|cuda [MINUTES [OBJECTIVE
        [CTRL_C_STEP [RESUME]]]]]

CTRL_C_STEP > 0: rank 1 alone gets a Ctrl-C inside that step; RESUME "resume": continue OUT_DIR's run (--resume auto).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY, blobs, ctrl_c_at_step, fit, tiny_config  # noqa: E402

if __name__ == "__main__":
    import os

    tmp = Path(sys.argv[1])
    device = sys.argv[2] if len(sys.argv) > 2 else "auto"
    budget = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    objective = sys.argv[4] if len(sys.argv) > 4 else "flow-matching"
    ctrl_c = int(sys.argv[5]) if len(sys.argv) > 5 and os.environ["RANK"] == "1" else 0
    resume = "auto" if len(sys.argv) > 6 and sys.argv[6] == "resume" else ""
    cfg = tiny_config(tmp, epochs=2, batch_size=16, device=device, time_budget=budget, objective=objective,
                      resume=resume)
    with ctrl_c_at_step(ctrl_c):  # (step 0: never)
        summary = fit(cfg, TINY, blobs(), blobs(24, seed=1))
    rank = os.environ["RANK"]
    torch.save({"weights": summary["model"].state_dict(), "loss": summary["loss"]}, tmp / f"rank{rank}.pt")

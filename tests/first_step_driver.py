"""Test helper (not a test module): `python first_step_driver.py ARGS` runs `abq ARGS`, saving the gradients
of the first optimiser step (after any reduction across ranks) to `$ABQ_FIRST_STEP` (rank 0 only), so
that tests can compare one process with several (`test_distributed.py`)."""

import os
import sys

import torch

_step = torch.optim.AdamW.step
_saved = []


def _first_step(self, *args, **kwargs):
    if not _saved and os.environ.get("RANK", "0") == "0":
        grads = [p.grad.detach().clone() if p.grad is not None else None
                 for group in self.param_groups for p in group["params"]]
        torch.save(grads, os.environ["ABQ_FIRST_STEP"])
        _saved.append(True)
    return _step(self, *args, **kwargs)


torch.optim.AdamW.step = _first_step

from abqcli.cli import main  # imported after the patch

sys.exit(main(sys.argv[1:]))

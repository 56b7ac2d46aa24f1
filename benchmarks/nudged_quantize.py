"""`python benchmarks/nudged_quantize.py ARGS` = `abq ARGS` with every block's initial LET scales multiplied by
(1 + 1e-7·N(0, 1)), seeded by the block index: a float-rounding-sized change of one process's run, the
baseline `benchmarks/distributed.py` compares the spread between 1 and N processes with."""

import sys

import torch

from abqcli.quant.methods import abq

_prepare = abq.AbqMethod.prepare


def _nudged_prepare(self, ctx):
    _prepare(self, ctx)
    generator = torch.Generator().manual_seed(ctx.index)
    with torch.no_grad():
        for p in self.transform.let_parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))


abq.AbqMethod.prepare = _nudged_prepare

from abqcli.cli import main  # imported after the patch

sys.exit(main(sys.argv[1:]))

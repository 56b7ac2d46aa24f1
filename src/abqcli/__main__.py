"""`python -m abqcli ...` (what torchrun runs: `torchrun --nproc-per-node N -m abqcli quantize RECIPE`)."""

from abqcli.cli import main

raise SystemExit(main())

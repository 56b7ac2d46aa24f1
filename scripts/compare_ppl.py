"""Print the perplexities of several `abq eval --json` results side by side (used by `make demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(paths: list[str]) -> int:
    table = Table(title="perplexity (same windows)")
    for column in ("mode", "ppl", "windows", "seqlen", "model"):
        table.add_column(column)
    for path in paths:
        result = json.loads(Path(path).read_text())
        table.add_row(result["mode"], f"{result['ppl']:.3f}", str(result["windows"]), str(result["seqlen"]),
                      result["model"])
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Evaluation segments and calibration windows (DESIGN §7).

A dataset is a name (`wikitext2`, `c4`, `ptb`) or a path to a UTF-8 text file. Offline, names resolve
inside a data directory (`--data-dir`, else `$ABQ_DATA_DIR`); online and with the `datasets` package
installed they may come from the Hugging Face hub (never used in tests).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from abqcli.errors import InputError

DATA_DIR_ENV = "ABQ_DATA_DIR"

# name -> (test file, calibration files in order of preference), relative to the data directory
DATASET_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "wikitext2": ("wikitext2/wiki.test.raw", ("wikitext2/wiki.train.raw", "wikitext2/wiki.valid.tokens")),
    "ptb": ("ptb/ptb.test.txt", ("ptb/ptb.train.txt", "ptb/ptb.valid.txt")),
    "c4": ("c4/c4.validation.txt", ("c4/c4.train.txt",)),
}
# name -> (datasets.load_dataset args, text column, joiner) for the online path
HUB_DATASETS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text", "\n\n"),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence", " "),
    "c4": (("allenai/c4", "en"), "text", " "),
}


@dataclass(frozen=True)
class TextSource:
    """A resolved text: where it came from and its sha256 (recorded with every result)."""

    name: str
    origin: str  # file path, or "hub:<id>"
    text: str
    file: str  # the file as named, machine-independent: the path as given, or relative to the data dir

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def data_dir(explicit: str | os.PathLike | None) -> Path | None:
    chosen = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def load_text(dataset: str, split: str = "test", directory: str | os.PathLike | None = None) -> TextSource:
    """The evaluation (`split="test"`) or calibration (`split="calib"`) text of a dataset.

    A path to an existing file is read as it is. A known name is looked up in the data directory;
    failing that, through the `datasets` package unless HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set.
    """
    path = Path(dataset).expanduser()
    if dataset not in DATASET_FILES:
        if path.is_file():
            return TextSource(dataset, str(path), _read(path), dataset)
        if path.suffix or os.sep in dataset:
            raise InputError(f"data file not found: {dataset}")
        raise InputError(
            f"unknown dataset: {dataset!r} (expected one of {', '.join(DATASET_FILES)} or a path to a text file)"
        )
    test_file, calib_files = DATASET_FILES[dataset]
    candidates = (test_file,) if split == "test" else calib_files
    root = data_dir(directory)
    if root is not None:
        for rel in candidates:
            if (root / rel).is_file():
                return TextSource(dataset, str(root / rel), _read(root / rel), rel)
    if _hub_allowed():
        return _load_from_hub(dataset, split)
    where = f"in data directory {root}" if root else f"(no --data-dir given and ${DATA_DIR_ENV} is not set)"
    raise InputError(f"dataset {dataset!r} not found {where}: expected {' or '.join(candidates)}")


def _read(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as fh:  # as it is: no newline translation
            return fh.read()
    except UnicodeDecodeError as exc:
        raise InputError(f"data file is not UTF-8 text: {path}") from exc


def _hub_allowed() -> bool:
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if offline:
        return False
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _load_from_hub(dataset: str, split: str) -> TextSource:  # pragma: no cover - needs the network
    import datasets

    args, column, joiner = HUB_DATASETS[dataset]
    hub_split = "test" if split == "test" else "train"
    if dataset == "c4" and split == "test":
        hub_split = "validation"
    rows = datasets.load_dataset(*args, split=hub_split)
    origin = f"hub:{'/'.join(args)}:{hub_split}"
    return TextSource(dataset, origin, joiner.join(rows[column]), origin)


def tokenize(tokenizer, text: str) -> tuple[torch.Tensor, bool]:
    """Token ids of the whole text as one string, and whether the tokenizer put a BOS token first."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    bos = tokenizer.bos_token_id
    return ids, bool(bos is not None and len(ids) and ids[0].item() == bos)


def eval_segments(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens, remainder dropped, first `limit` of them: [n, seqlen]."""
    n = ids.numel() // seqlen
    if n == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, the same for the same (ids, seed): [nsamples, seqlen]."""
    return _windows_at(ids, calibration_starts(ids, nsamples, seqlen, seed), seqlen)


def calibration_starts(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Where `calibration_windows` cuts its windows: `nsamples` starts drawn uniformly from [0, len − seqlen)."""
    if ids.numel() <= seqlen:
        raise InputError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen {seqlen} (+1)"
        )
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)


def heldout_windows(ids: torch.Tensor, count: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`count` random windows of `seqlen` tokens that share no token with `calibration_windows(ids, nsamples,
    seqlen, seed)`: starts drawn uniformly, with `seed`, from those s with |s − t| ≥ seqlen for every
    calibration start t. [count, seqlen]; InputError when the text leaves no such start."""
    taken = calibration_starts(ids, nsamples, seqlen, seed)
    free = torch.ones(ids.numel() - seqlen, dtype=torch.bool)
    for t in taken.tolist():
        free[max(t - seqlen + 1, 0): t + seqlen] = False
    candidates = free.nonzero().flatten()
    if len(candidates) == 0:
        raise InputError(f"the calibration text ({ids.numel()} tokens) leaves no window of {seqlen} tokens outside "
                         f"the {len(taken)} calibration windows for finetune.data heldout: use a longer text, "
                         "fewer calibration.nsamples, or finetune.data: calibration")
    gen = torch.Generator().manual_seed(seed)
    return _windows_at(ids, candidates[torch.randint(0, len(candidates), (count,), generator=gen)], seqlen)


def _windows_at(ids: torch.Tensor, starts: torch.Tensor, seqlen: int) -> torch.Tensor:
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])

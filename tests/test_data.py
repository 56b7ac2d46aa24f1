"""Evaluation segments, calibration windows and text resolution (DESIGN §7)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from abqcli import data
from abqcli.errors import InputError
from conftest import BOS_ID, make_tokenizer


def ids_of(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# calibration windows
# --------------------------------------------------------------------------------------------------


def test_calibration_windows_are_deterministic_per_seed():
    ids = ids_of(1000)
    a = data.calibration_windows(ids, 8, 32, seed=2)
    b = data.calibration_windows(ids, 8, 32, seed=2)
    c = data.calibration_windows(ids, 8, 32, seed=3)
    assert a.shape == (8, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_windows_are_contiguous_slices_inside_the_text():
    ids = ids_of(500)
    windows = data.calibration_windows(ids, 16, 40, seed=0)
    for w in windows:
        start = int(w[0])
        assert torch.equal(w, ids[start : start + 40])
        assert start + 40 <= ids.numel()


def test_calibration_windows_do_not_depend_on_global_rng():
    ids = ids_of(400)
    torch.manual_seed(0)
    a = data.calibration_windows(ids, 4, 16, seed=5)
    torch.manual_seed(123)
    torch.rand(10)
    b = data.calibration_windows(ids, 4, 16, seed=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [10, 32])
def test_calibration_windows_on_short_text_is_input_error(n):
    with pytest.raises(InputError, match="fewer than one window"):
        data.calibration_windows(ids_of(n), 4, 32, seed=0)


def test_calibration_windows_one_token_longer_than_a_window_works():
    windows = data.calibration_windows(ids_of(33), 3, 32, seed=0)
    assert torch.equal(windows, ids_of(32).expand(3, 32))


def test_heldout_windows_share_no_token_with_the_calibration_windows():
    """`finetune.data: heldout`: every held-out window lies outside every calibration window (ids are
    positions here), comes from anywhere else in the text, and the draw is the same for the same seed."""
    ids = ids_of(2000)
    heldout = data.heldout_windows(ids, 64, 12, 50, seed=2)
    assert heldout.shape == (64, 50)
    taken = set(data.calibration_windows(ids, 12, 50, seed=2).flatten().tolist())
    for w in heldout:
        assert torch.equal(w, ids[int(w[0]): int(w[0]) + 50])
        assert not taken & set(w.tolist())
    assert torch.equal(heldout, data.heldout_windows(ids, 64, 12, 50, seed=2))
    other = data.heldout_windows(ids, 64, 12, 50, seed=3)
    assert not torch.equal(heldout, other)
    assert not set(data.calibration_windows(ids, 12, 50, seed=3).flatten().tolist()) & set(other.flatten().tolist())
    assert len({int(w[0]) for w in heldout}) > 32  # drawn, not one place repeated


def test_heldout_windows_without_room_are_an_input_error(monkeypatch):
    ids = ids_of(100)
    monkeypatch.setattr(data, "calibration_starts", lambda ids, nsamples, seqlen, seed: torch.tensor([10, 50]))
    with pytest.raises(InputError, match="leaves no window of 40 tokens outside the 2 calibration windows"):
        data.heldout_windows(ids, 4, 2, 40, seed=0)
    monkeypatch.setattr(data, "calibration_starts", lambda ids, nsamples, seqlen, seed: torch.tensor([0]))
    window = data.heldout_windows(ids, 3, 1, 40, seed=0)  # only starts 40..59 are free
    assert all(40 <= int(w[0]) < 60 for w in window)


# --------------------------------------------------------------------------------------------------
# evaluation segments
# --------------------------------------------------------------------------------------------------


def test_eval_segments_drop_the_remainder():
    seg = data.eval_segments(ids_of(100), 32)
    assert seg.shape == (3, 32)
    assert torch.equal(seg.flatten(), ids_of(96))


def test_eval_segments_exact_multiple():
    assert data.eval_segments(ids_of(96), 32).shape == (3, 32)


def test_eval_segments_honour_limit():
    seg = data.eval_segments(ids_of(1000), 32, limit=4)
    assert seg.shape == (4, 32)
    assert torch.equal(seg, ids_of(128).reshape(4, 32))
    # a limit above the number of windows is just the windows there are
    assert data.eval_segments(ids_of(100), 32, limit=50).shape == (3, 32)


def test_eval_segments_on_short_text_is_input_error():
    with pytest.raises(InputError, match="fewer than one window"):
        data.eval_segments(ids_of(31), 32)


# --------------------------------------------------------------------------------------------------
# load_text
# --------------------------------------------------------------------------------------------------


def test_load_text_from_file_path(tiny_text_file, tiny_text):
    src = data.load_text(str(tiny_text_file))
    assert src.text == tiny_text
    assert src.origin == str(tiny_text_file)
    assert src.sha256 == hashlib.sha256(tiny_text.encode("utf-8")).hexdigest()
    assert src.sha256 == hashlib.sha256(tiny_text_file.read_bytes()).hexdigest()  # the file's own hash


def test_load_text_reads_the_file_as_it_is(tmp_path):
    """Regression: Path.read_text's universal newlines turned CRLF into LF (DESIGN §7: read as it is)."""
    path = tmp_path / "crlf.txt"
    path.write_bytes("a line\r\n\r\nnext é\n".encode())
    src = data.load_text(str(path))
    assert src.text == "a line\r\n\r\nnext é\n"
    assert src.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_text_not_utf8_is_input_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        data.load_text(str(path))


def test_load_text_unknown_name(no_data_dir_env):
    with pytest.raises(InputError, match="unknown dataset") as exc:
        data.load_text("wikitext3")
    assert "wikitext2" in str(exc.value)


def test_load_text_missing_file_path(tmp_path):
    with pytest.raises(InputError, match="data file not found"):
        data.load_text(str(tmp_path / "nothing.txt"))


def test_load_text_name_missing_in_data_dir(tmp_path):
    with pytest.raises(InputError) as exc:
        data.load_text("wikitext2", "test", tmp_path)
    msg = str(exc.value)
    assert "wikitext2/wiki.test.raw" in msg and str(tmp_path) in msg


def test_load_text_name_without_data_dir(no_data_dir_env):
    with pytest.raises(InputError, match="ABQ_DATA_DIR"):
        data.load_text("ptb")


def _fake_data_dir(root):
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text("test text\n")
    (root / "wikitext2" / "wiki.valid.tokens").write_text("valid text\n")
    return root


def test_load_text_from_data_dir_argument(tmp_path, no_data_dir_env):
    root = _fake_data_dir(tmp_path / "d")
    src = data.load_text("wikitext2", "test", root)
    assert src.text == "test text\n"
    assert src.origin == str(root / "wikitext2" / "wiki.test.raw")
    # calibration falls back to the validation tokens when there is no train split
    assert data.load_text("wikitext2", "calib", root).text == "valid text\n"


def test_load_text_from_env_var(tmp_path, monkeypatch):
    root = _fake_data_dir(tmp_path / "env")
    monkeypatch.setenv("ABQ_DATA_DIR", str(root))
    assert data.load_text("wikitext2").text == "test text\n"


def test_explicit_data_dir_wins_over_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQ_DATA_DIR", str(tmp_path / "does-not-exist"))
    root = _fake_data_dir(tmp_path / "explicit")
    assert data.load_text("wikitext2", "test", str(root)).text == "test text\n"


def test_load_text_real_data_dir(data_dir):
    src = data.load_text("wikitext2", "test", data_dir)
    assert src.origin.endswith("wiki.test.raw")
    assert len(src.text) > 100_000
    assert data.load_text("wikitext2", "calib", data_dir).origin.endswith("wiki.valid.tokens")


# --------------------------------------------------------------------------------------------------
# tokenize
# --------------------------------------------------------------------------------------------------


def test_tokenize_whole_text_with_and_without_bos(tiny_text):
    ids, has_bos = data.tokenize(make_tokenizer(add_bos=True), tiny_text)
    assert has_bos and ids[0].item() == BOS_ID
    assert (ids == BOS_ID).sum() == 1  # BOS once, for the whole text
    ids2, has_bos2 = data.tokenize(make_tokenizer(add_bos=False), tiny_text)
    assert not has_bos2
    assert torch.equal(ids[1:], ids2)

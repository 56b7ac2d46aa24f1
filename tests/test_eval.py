"""Perplexity by the GPTQ/ABQ protocol (DESIGN §7) on tiny models and a tiny text file."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from abqcli import data
from abqcli.errors import InputError, RunError
from abqcli.evaluate import EvalRequest, check_seqlen, perplexity, run_eval
from abqcli.models.loading import load_model
from abqcli.recipe import load_recipe
from conftest import make_text

SEQLEN, LIMIT = 32, 3


def request(model_dir, text_file, **kw) -> EvalRequest:
    args = {"seqlen": SEQLEN, "limit": LIMIT, "device": "cpu"} | kw
    return EvalRequest(str(model_dir), str(text_file), **args)


@pytest.fixture(scope="module")
def fp_results(tiny_models, tiny_text_file):
    return {fam: run_eval(request(tiny_models[fam], tiny_text_file)) for fam in ("llama", "opt")}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_run_eval_protocol_fields(fp_results, tiny_models, tiny_text_file, family):
    res = fp_results[family]
    assert math.isfinite(res.ppl) and res.ppl > 1
    assert res.windows == LIMIT
    assert res.tokens_scored == LIMIT * (SEQLEN - 1)
    assert res.seqlen == SEQLEN
    assert res.dataset == str(tiny_text_file)
    assert res.data_file == str(tiny_text_file)
    assert res.data_sha256 == hashlib.sha256(tiny_text_file.read_bytes()).hexdigest()
    assert res.model == str(tiny_models[family])
    assert res.mode == "fp"
    assert res.seconds >= 0
    # the llama fixture's tokenizer prepends BOS, the OPT one does not
    assert res.bos.startswith("BOS prepended") == (family == "llama")
    d = res.to_dict()
    assert set(d) >= {"ppl", "dataset", "data_file", "data_sha256", "seqlen", "windows", "tokens_scored",
                      "bos", "model", "mode", "seconds"}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_ppl_equals_a_hand_loop(fp_results, tiny_models, tiny_text_file, family):
    model, tokenizer, _ = load_model(str(tiny_models[family]))
    ids = tokenizer(tiny_text_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n = ids.numel() // SEQLEN
    assert n > LIMIT
    windows = ids[: LIMIT * SEQLEN].reshape(LIMIT, SEQLEN)
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    ppl = torch.exp(torch.cat(nlls).double().mean()).item()
    assert fp_results[family].ppl == pytest.approx(ppl, rel=1e-5)


def test_rtn_w4a4_gives_a_different_ppl(fp_results, tiny_llama, tiny_text_file):
    recipe = load_recipe("w4a4")
    res = run_eval(request(tiny_llama, tiny_text_file, recipe=recipe))
    assert math.isfinite(res.ppl)
    assert res.mode.startswith("fake-quant RTN W4A4")
    assert res.windows == LIMIT and res.tokens_scored == LIMIT * (SEQLEN - 1)
    assert abs(res.ppl - fp_results["llama"].ppl) / fp_results["llama"].ppl > 1e-3


def test_rtn_w8a16_ppl_is_close(fp_results, tiny_opt, tiny_text_file):
    res = run_eval(request(tiny_opt, tiny_text_file, recipe=load_recipe("w8a16")))
    assert res.ppl == pytest.approx(fp_results["opt"].ppl, rel=2e-2)
    assert res.ppl != fp_results["opt"].ppl


def test_limit_none_scores_every_full_window(tiny_opt, tmp_path):
    text_file = tmp_path / "small.txt"
    text_file.write_text(make_text(50, seed=7))
    _, tokenizer, _ = load_model(str(tiny_opt))
    ids, _ = data.tokenize(tokenizer, text_file.read_text(encoding="utf-8"))
    res = run_eval(request(tiny_opt, text_file, seqlen=64, limit=None))
    assert res.windows == ids.numel() // 64 > 3
    assert res.tokens_scored == res.windows * 63


def test_on_window_progress_callback(tiny_llama, tiny_text_file):
    calls = []
    res = run_eval(request(tiny_llama, tiny_text_file), lambda i, n, ppl: calls.append((i, n, ppl)))
    assert [(i, n) for i, n, _ in calls] == [(0, LIMIT), (1, LIMIT), (2, LIMIT)]
    assert calls[-1][2] == pytest.approx(res.ppl)


def test_limit_zero_is_input_error(tiny_llama, tiny_text_file):
    with pytest.raises(InputError, match="--limit"):
        run_eval(request(tiny_llama, tiny_text_file, limit=0))


def test_seqlen_longer_than_context_is_input_error(tiny_llama, tiny_text_file):
    with pytest.raises(InputError, match="context"):
        run_eval(request(tiny_llama, tiny_text_file, seqlen=512))


def test_seqlen_at_the_context_limit_works(tiny_opt, tiny_text_file):
    res = run_eval(request(tiny_opt, tiny_text_file, seqlen=256, limit=1))
    assert math.isfinite(res.ppl) and res.tokens_scored == 255


def test_check_seqlen():
    cfg = type("Cfg", (), {"max_position_embeddings": 256})()
    check_seqlen(256, cfg)
    with pytest.raises(InputError):
        check_seqlen(257, cfg)
    with pytest.raises(InputError):
        check_seqlen(1, cfg)


def test_text_shorter_than_a_window_is_input_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the cat sees a dog.")
    with pytest.raises(InputError, match="fewer than one window"):
        run_eval(request(tiny_llama, short))


def test_non_finite_logits_are_a_run_error():
    class NaNModel(torch.nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": torch.full((*ids.shape, 8), float("nan"))})()

    with pytest.raises(RunError, match="window 0"):
        perplexity(NaNModel(), torch.zeros(2, 4, dtype=torch.long))

"""`abq generate`: continuations from an FP model and from exports, cached decoding equal to full
forwards, seeded sampling repeatable, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from abqcli.generate import generate
from test_export_packed import SCHEMES, export_packed
from test_quantize_cli import abq, error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "the small cat sees a bright river"


def greedy_without_cache(model, ids: torch.Tensor, n: int) -> list[int]:
    """The reference: argmax of a full forward of the whole sequence, token after token."""
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_generate_on_a_packed_export_equals_full_forward_decoding(tmp_path, tiny_llama):
    from abqcli.formats.manifest import open_abq_output

    quant, kv_bits, _ = SCHEMES["w4a4"]
    export_packed(tiny_llama, tmp_path / "packed", quant, kv_bits)
    result = generate(str(tmp_path / "packed"), PROMPT, max_new_tokens=8, device="cpu")
    assert result.mode.startswith("packed BTC W4A4")
    model, tokenizer, _ = open_abq_output(tmp_path / "packed")
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    expected = greedy_without_cache(model, ids, 8)
    eos = expected.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in expected else len(expected)
    assert result.text == tokenizer.decode(expected[:eos], skip_special_tokens=True)
    assert result.new_tokens == eos and result.tokens_per_second > 0


def test_sampling_is_repeatable_per_seed(tiny_llama):
    runs = [generate(str(tiny_llama), PROMPT, 12, temperature=1.5, seed=seed, device="cpu").text for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_cli_prints_the_continuation_and_writes_json(tmp_path, tiny_llama, capsys):
    assert abq(tmp_path, "generate", "--model", tiny_llama, "--prompt", PROMPT, "--max-new-tokens", "5",
               "--device", "cpu", "--json", "gen.json") == 0
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "gen.json").read_text())
    assert result["text"] in captured.out and result["mode"] == "fp"
    assert "tokens/s" in captured.err and 1 <= result["new_tokens"] <= 5


@pytest.mark.parametrize("args, words", [
    (("--max-new-tokens", "0"), "--max-new-tokens 0: expected at least 1"),
    (("--chat",), "no chat template"),
    (("--temperature", "-1"), "--temperature -1.0: expected 0"),
])
def test_cli_refuses_bad_input(tmp_path, tiny_llama, capsys, args, words):
    assert abq(tmp_path, "generate", "--model", tiny_llama, "--prompt", PROMPT, "--device", "cpu", *args) == 2
    assert words in error_line(capsys.readouterr().err)

"""`model.loading: blockwise` and the activation caches (`calibration.cache`): the model's blocks read one at a
time from its safetensors, the abq-packed export written shard by shard, the caches memory-mapped on disk.
What must hold: the same integer codes and tensors as a run on the fully loaded model, an export that
`abq verify` accepts, resume, and one-line refusals of what blockwise loading cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abqcli import cli
from abqcli.errors import InputError
from abqcli.formats.abq_packed import PACKED_INDEX, PACKED_WEIGHTS, load_packed_tensors
from abqcli.pipeline import CHECKPOINT_DIR, run_quantize
from abqcli.quant.cache import DISK, MEMORY, ActivationCache, choose_cache, parse_size
from abqcli.quant.calibrate import Progress
from abqcli.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recipe_at(tmp_path: Path, model: Path, text: Path, out: str, loading: str = "full", calibration: str = "",
              formats: str = "[abq-packed]", scheme: str = "w4a4", dtype: str = "float32"):
    path = tmp_path / f"{out}.yaml"
    path.write_text(
        f"model: {{path: {model}, loading: {loading}, dtype: {dtype}}}\n"
        f"scheme: {scheme}\n"
        f"calibration: {{dataset: {text}, nsamples: 4, seqlen: 32, epochs: 2, batch_size: 2, device: cpu"
        f"{', ' + calibration if calibration else ''}}}\n"
        f"output: {{dir: {tmp_path / out}, formats: {formats}}}\n")
    return load_recipe(str(path))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_llama, tiny_text_file):
    """The reference: ABQ W4A4 on the fully loaded tiny llama, abq-packed."""
    tmp = tmp_path_factory.mktemp("full")
    summary = run_quantize(recipe_at(tmp, tiny_llama, tiny_text_file, "out"))
    return tmp / "out" / "abq-packed", summary


def assert_same_export(ours: Path, reference: Path) -> None:
    """Every tensor equal and the same per-layer metadata (abq.json) and quantization_config."""
    a, b = load_packed_tensors(ours), load_packed_tensors(reference)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    manifests = [json.loads((d / "abq.json").read_text()) for d in (ours, reference)]
    assert manifests[0]["layers"] == manifests[1]["layers"]
    configs = [json.loads((d / "config.json").read_text())["quantization_config"] for d in (ours, reference)]
    assert configs[0] == configs[1]


def test_blockwise_export_equals_the_full_load_and_is_sharded(tmp_path, tiny_llama, tiny_text_file, full_run):
    reference, full_summary = full_run
    summary = run_quantize(recipe_at(tmp_path, tiny_llama, tiny_text_file, "out", "blockwise"))
    export = tmp_path / "out" / "abq-packed"
    assert not (export / PACKED_WEIGHTS).exists()
    weight_map = json.loads((export / PACKED_INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 2 blocks, then the rest
    assert all(weight_map[name] == shards[0] for name in weight_map if name.startswith("model.layers.0."))
    assert weight_map["lm_head.weight"] == shards[2]
    assert_same_export(export, reference)
    assert summary["provenance"]["fingerprint"] == full_summary["provenance"]["fingerprint"]
    assert summary["loading"] == "blockwise" and summary["quantized_linears"] == full_summary["quantized_linears"]
    assert not (tmp_path / "out" / CHECKPOINT_DIR).exists()


def test_abq_verify_accepts_a_sharded_export(tmp_path, tiny_llama, tiny_text_file, capsys):
    run_quantize(recipe_at(tmp_path, tiny_llama, tiny_text_file, "out", "blockwise"))
    export = tmp_path / "out" / "abq-packed"
    report = tmp_path / "verify.json"
    assert cli.main(["verify", str(export), "--dataset", str(tiny_text_file), "--seqlen", "32",
                     "--json", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] is True
    assert cli.main(["inspect", str(export)]) == 0
    assert "quantized" in capsys.readouterr().out


def test_a_shard_that_disagrees_with_the_index_is_refused(tmp_path, tiny_llama, tiny_text_file):
    run_quantize(recipe_at(tmp_path, tiny_llama, tiny_text_file, "out", "blockwise"))
    export = tmp_path / "out" / "abq-packed"
    index = json.loads((export / PACKED_INDEX).read_text())
    moved = "model.layers.0.input_layernorm.weight"
    index["weight_map"][moved] = "model-00002-of-00003.safetensors"
    (export / PACKED_INDEX).write_text(json.dumps(index))
    with pytest.raises(InputError, match="disagree"):
        load_packed_tensors(export)


class StopAfter(Progress):
    def __init__(self, block: int):
        self.block = block

    def block_end(self, log) -> None:
        if log.block == self.block:
            raise KeyboardInterrupt


def test_blockwise_resume_and_disk_cache_give_the_same_export(tmp_path, tiny_llama, tiny_text_file, full_run):
    recipe = recipe_at(tmp_path, tiny_llama, tiny_text_file, "out", "blockwise", "cache: disk")
    with pytest.raises(KeyboardInterrupt):
        run_quantize(recipe, progress=StopAfter(0))
    summary = run_quantize(recipe, resume=True)
    assert summary["activation_cache"] == {"place": DISK, "dtype": "float32"}
    assert_same_export(tmp_path / "out" / "abq-packed", full_run[0])
    assert not (tmp_path / "out" / CHECKPOINT_DIR).exists()


def test_a_bfloat16_model_calibrates_with_bfloat16_caches_alike_both_ways(tmp_path, tiny_llama, tiny_text_file):
    runs = {loading: run_quantize(recipe_at(tmp_path, tiny_llama, tiny_text_file, loading, loading, "method: rtn",
                                            dtype="bfloat16"))
            for loading in ("full", "blockwise")}
    assert runs["blockwise"]["activation_cache"] == {"place": MEMORY, "dtype": "bfloat16"}
    assert_same_export(tmp_path / "blockwise" / "abq-packed", tmp_path / "full" / "abq-packed")
    tensors = load_packed_tensors(tmp_path / "blockwise" / "abq-packed")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_tied_embeddings_are_read_once_and_stay_tied(tmp_path, tiny_text_file):
    from conftest import llama_config, save_tiny_model

    config = llama_config()
    config.tie_word_embeddings = True
    model = save_tiny_model(config, tmp_path / "tied", seed=5)
    runs = {loading: run_quantize(recipe_at(tmp_path, model, tiny_text_file, loading, loading, "method: rtn"))
            for loading in ("full", "blockwise")}
    assert runs["full"]["provenance"]["fingerprint"] == runs["blockwise"]["provenance"]["fingerprint"]
    assert_same_export(tmp_path / "blockwise" / "abq-packed", tmp_path / "full" / "abq-packed")
    config = json.loads((tmp_path / "blockwise" / "abq-packed" / "config.json").read_text())
    assert config["quantization_config"]["tied_tensors"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_what_blockwise_loading_cannot_do_is_refused_in_one_line(tmp_path, tiny_llama, tiny_text_file):
    rotated = recipe_at(tmp_path, tiny_llama, tiny_text_file, "a", "blockwise", "rotation: hadamard")
    with pytest.raises(InputError, match="rotates the whole model"):
        run_quantize(rotated)
    fakequant = recipe_at(tmp_path, tiny_llama, tiny_text_file, "b", "blockwise", formats="[abq-packed, hf-fakequant]")
    with pytest.raises(InputError, match="also lists hf-fakequant"):
        run_quantize(fakequant)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_checkpoint_without_the_models_names_is_refused(tmp_path, tiny_llama, tiny_text_file):
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in tiny_llama.iterdir():
        if file.suffix != ".safetensors":
            (renamed / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    save_file({name.replace("model.", "transformer.", 1): t for name, t in tensors.items()},
              str(renamed / "model.safetensors"))
    with pytest.raises(InputError, match="lacks weights under the model's names.*model.loading: full"):
        run_quantize(recipe_at(tmp_path, renamed, tiny_text_file, "out", "blockwise"))


def test_auto_cache_goes_to_disk_above_the_budget(tmp_path):
    assert choose_cache("auto", torch.float32, 100, 99, tmp_path).place == DISK
    assert choose_cache("auto", torch.float32, 100, 100, tmp_path).place == MEMORY
    assert choose_cache("memory", torch.float32, 10**15, 1, tmp_path).place == MEMORY


def test_a_disk_cache_tensor_is_memory_mapped_and_leaves_no_file(tmp_path):
    cache = ActivationCache(torch.bfloat16, tmp_path / "cache")
    tensor = cache.empty((2, 3, 4))
    tensor[1] = 2.5
    assert tensor.dtype == torch.bfloat16 and float(tensor[1].sum()) == 30.0
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(("text", "size"), [("8GB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5g", 3 * 2**29),
                                            ("4096", 4096)])
def test_max_memory_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "8 PB"])
def test_max_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(InputError, match="--max-memory"):
        parse_size(text)

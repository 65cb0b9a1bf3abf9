"""Quantization labs: 8-bit (absmax, zero-point, LLM.int8()) in ``int8`` / ``llm_int8``, GGUF in ``gguf/``."""

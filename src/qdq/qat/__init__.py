"""Quantization-aware training (needs the torch extra: pip install 'qdq[torch]')."""

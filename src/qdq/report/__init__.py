"""Measuring what quantization cost: output metrics, per-layer error, latency."""

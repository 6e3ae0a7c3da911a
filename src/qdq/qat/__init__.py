"""The parts of qdq that need PyTorch (the optional `torch` extra): learned rounding today."""

"""Rewriting and correcting: each pass takes a model or a plan and returns a new one (fuse,
equalize, smooth, data-free statistics, bias correction, AdaRound, the Q/DQ rewrite)."""

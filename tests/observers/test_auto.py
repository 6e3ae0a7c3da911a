"""`--method auto` picks per tensor by the error on the grid its range will be used on."""

from __future__ import annotations

import numpy as np

from qdq import QScheme, choose_qparams, fake_quantize, make_observer


def test_auto_scores_its_candidates_on_the_grid_the_range_is_used_on():
    # Mostly positive values with a thin negative tail: on an asymmetric grid the tail costs a
    # few codes, on a symmetric one half of them; auto must pick by the grid it is given.
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.exponential(1.0, 20000), -rng.exponential(0.2, 200)])
    x = x.astype(np.float32)
    symmetric = QScheme(bits=8, signed=True, symmetric=True)

    def error_on(grid: QScheme, observed_on: QScheme) -> float:
        observer = make_observer("auto", observed_on)
        observer.update(x)
        y = fake_quantize(x, choose_qparams(observer.compute(), grid))
        return float(np.sum((x - y) ** 2.0))

    asymmetric = QScheme(bits=8, signed=False)
    assert error_on(symmetric, symmetric) < error_on(symmetric, asymmetric)

"""QScheme: the integer grid and the combinations it refuses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qdq import PRESETS, PerBlock, PerChannel, QScheme, SchemeError, preset


@pytest.mark.parametrize(
    ("scheme", "qmin", "qmax", "dtype"),
    [
        (QScheme(bits=8, signed=True), -128, 127, np.int8),
        (QScheme(bits=8, signed=True, symmetric=True, narrow_range=True), -127, 127, np.int8),
        (QScheme(bits=8, signed=False), 0, 255, np.uint8),
        (QScheme(bits=4, signed=True), -8, 7, np.int8),
        (QScheme(bits=4, signed=False), 0, 15, np.uint8),
        (QScheme(bits=2, signed=True), -2, 1, np.int8),
        (QScheme(bits=16, signed=True), -32768, 32767, np.int16),
        (QScheme(bits=16, signed=False), 0, 65535, np.uint16),
        (QScheme(bits=12, signed=False), 0, 4095, np.uint16),
    ],
)
def test_code_range_and_storage_follow_bits_and_sign(scheme, qmin, qmax, dtype):
    assert (scheme.qmin, scheme.qmax) == (qmin, qmax)
    assert scheme.storage_dtype == dtype


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"bits": 1}, "use 8 for int8"),
        ({"bits": 17}, "use 8 for int8"),
        ({"bits": 8.0}, "integer"),
        ({"bits": True}, "integer"),
        ({"narrow_range": True, "signed": False}, "signed=True"),
        ({"power_of_two_scale": True}, "symmetric=True"),
        ({"granularity": PerBlock(axis=1, block_size=0)}, "block_size"),
        ({"granularity": "per_channel"}, "PerChannel(axis)"),
        ({"rounding": "half_even"}, "qdq.Rounding"),
    ],
)
def test_invalid_combinations_are_rejected_with_a_fix(kwargs, fix):
    with pytest.raises(SchemeError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        QScheme(**kwargs)


def test_scheme_is_immutable_and_hashable():
    s = QScheme()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bits = 4
    assert len({QScheme(), QScheme(), QScheme(granularity=PerChannel(0))}) == 2


def test_presets_are_valid_schemes_and_unknown_names_list_the_choices():
    assert preset("int8_weights") == QScheme(
        bits=8, symmetric=True, narrow_range=True, granularity=PerChannel(0)
    )
    assert all(isinstance(s, QScheme) for s in PRESETS.values())
    with pytest.raises(SchemeError, match="int8_weights"):
        preset("int9")

"""Speech for bench/unseen.py's Silero VAD: phrases of the bench's words spoken by the eSpeak NG
inside `espeakng_loader`, between pauses, over background noise (docs/unseen.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from text_images import WORDS

SPEECH_RATE = 16_000


def speech_clips(count: int, seconds: float, seed: int) -> np.ndarray:
    """`count` 16 kHz clips (count, seconds * 16000) in [-1, 1]: phrases of WORDS spoken by
    eSpeak NG (the library and voices inside the `espeakng_loader` wheel) in random voices,
    rates and pitches, between pauses, over background noise at 5-30 dB below the speech."""
    import ctypes

    from scipy.signal import resample_poly

    spec = importlib.util.find_spec("espeakng_loader")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("espeakng_loader is not installed: pip install -e '.[unseen]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    espeak = ctypes.CDLL(str(root / "libespeak-ng.so"))
    rate = espeak.espeak_Initialize(2, 0, str(root).encode(), 0)  # synchronous, 22050 Hz
    pieces: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def collect(wav: ctypes._Pointer, samples: int, _events: int) -> int:
        if samples > 0:
            pieces.append(np.ctypeslib.as_array(wav, (samples,)).astype(np.float32) / 32768)
        return 0

    callback = callback_type(collect)
    espeak.espeak_SetSynthCallback(callback)
    rng = np.random.default_rng(seed)
    length = int(seconds * SPEECH_RATE)
    out = np.zeros((count, length), np.float32)
    for i in range(count):
        at = int(rng.integers(0, SPEECH_RATE))
        while at < length:
            voice = rng.choice(["en-us", "en", "en-us+f3", "en+m3", "en-gb-x-rp+f2"])
            espeak.espeak_SetVoiceByName(str(voice).encode())
            espeak.espeak_SetParameter(1, int(rng.integers(110, 220)), 0)  # words per minute
            espeak.espeak_SetParameter(3, int(rng.integers(20, 80)), 0)  # pitch
            text = " ".join(rng.choice(WORDS, int(rng.integers(2, 7)))).encode()
            pieces.clear()
            espeak.espeak_Synth(text, len(text) + 1, 0, 1, 0, 0, None, None)
            speech = resample_poly(np.concatenate(pieces), SPEECH_RATE, rate)
            speech = speech * rng.uniform(0.2, 1.0) / max(np.abs(speech).max(), 1e-6)
            end = min(at + len(speech), length)
            out[i, at:end] += speech[: end - at]
            at = end + int(rng.integers(SPEECH_RATE // 4, 2 * SPEECH_RATE))  # a pause
        loud = float(np.sqrt(np.mean(out[i] ** 2))) + 1e-4
        noise = rng.normal(0, 1, length)
        if rng.integers(2):  # brown (low-frequency) noise, as from a fan or traffic
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(801) / 801, "same")
        noise *= loud * 10 ** (-rng.uniform(5, 30) / 20) / (noise.std() + 1e-9)
        out[i] = np.clip(out[i] + noise, -1, 1)
    espeak.espeak_Terminate()
    return out

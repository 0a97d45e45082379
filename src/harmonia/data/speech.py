"""Offline speech synthesis with eSpeak NG, driven through ctypes.

The ``espeakng-loader`` wheel ships ``libespeak-ng`` and its voice data, so no system package is
needed. eSpeak NG is initialised once per process in synchronous mode; a synth callback collects
the int16 samples it produces at :data:`SAMPLE_RATE` Hz.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from harmonia.errors import DataError

SAMPLE_RATE = 22_050

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_lock = threading.Lock()
_engine: _Engine | None = None


class _Engine:
    """One eSpeak NG instance (the library keeps global state, so there is exactly one)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise DataError(
                "speech synthesis needs the 'espeakng-loader' package; install it with "
                "`pip install espeakng-loader`"
            ) from exc
        self.data_path = Path(espeakng_loader.get_data_path())
        self.lib = ctypes.cdll.LoadLibrary(str(espeakng_loader.get_library_path()))
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if rate != SAMPLE_RATE:
            raise DataError(f"eSpeak NG failed to initialise (returned {rate}); data path {self.data_path}")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: ctypes does not
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]

    def _collect(self, wav: Any, n: int, _events: int) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise DataError(
                f"eSpeak NG has no voice {voice!r}; see harmonia.data.speech.available_variants()"
            )
        self.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        self._chunks = []
        encoded = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise DataError(f"eSpeak NG failed to synthesize {text!r} with voice {voice!r} (status {status})")
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks).astype(np.int16)


def _get_engine() -> _Engine:
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speak ``text`` and return mono int16 samples at :data:`SAMPLE_RATE` Hz.

    Args:
        text: what to say.
        voice: an eSpeak NG voice name, optionally with a variant: ``"en-us+f3"``, ``"en-gb-scotland+m2"``.
        rate: speaking rate in words per minute (eSpeak accepts 80-450).
        pitch: base pitch, 0-100 (50 is the voice's default).
    """
    if not 80 <= rate <= 450:
        raise DataError(f"speech rate must be in [80, 450] words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise DataError(f"speech pitch must be in [0, 100], got {pitch}")
    with _lock:
        return _get_engine().synthesize(text, voice, rate, pitch)


def available_variants() -> list[str]:
    """Names of the voice variants (``f1``, ``m3``, ``croak``...) shipped with eSpeak NG."""
    with _lock:
        variants_dir = _get_engine().data_path / "voices" / "!v"
    return sorted(p.name for p in variants_dir.iterdir() if p.is_file())

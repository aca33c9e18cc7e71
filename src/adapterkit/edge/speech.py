"""Offline speech for keyword spotting: espeak-ng (bundled in the `espeakng-loader` wheel) and MFCCs.

`Speaker` is one synthetic voice: a language (its accent on English words), a voice variant, a
speaking rate and a pitch. `Channel` is what lies between the mouth and the model: a microphone's
band-pass, a room's reverberation and background noise. Features follow "Hello Edge": 16 kHz, one
second, 40 ms windows every 20 ms (49 frames), 40 mel bands, 10 MFCCs.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch
from scipy import signal

from ..errors import AdapterError

SAMPLE_RATE = 16_000
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3  # espeak_PARAMETER values
_RETRIEVAL = 1  # AUDIO_OUTPUT_RETRIEVAL: samples come back through the callback
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SpeechError(AdapterError):
    """espeak-ng is missing or refused a voice or a text."""


@dataclass(frozen=True)
class Speaker:
    language: str = "en"
    variant: str = "m1"
    rate: int = 160  # words per minute
    pitch: int = 50  # 0-99

    @property
    def voice(self) -> str:
        return f"{self.language}+{self.variant}"


class _Espeak:
    """The espeak-ng library, initialised once per process; it keeps global state, so calls are locked."""

    _instance: _Espeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise SpeechError("keyword synthesis needs the espeakng-loader wheel (pip install espeakng-loader)") from exc
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.rate = self.lib.espeak_Initialize(_RETRIEVAL, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise SpeechError(f"espeak-ng failed to initialise (returned {self.rate})")
        self.chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it later
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], n: int, events: ctypes.c_void_p) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0)
        return 0

    @classmethod
    def get(cls) -> _Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def say(self, text: str, speaker: Speaker) -> np.ndarray:
        with self._lock:
            if self.lib.espeak_SetVoiceByName(speaker.voice.encode()) != 0:
                raise SpeechError(f"espeak-ng has no voice {speaker.voice!r}")
            self.lib.espeak_SetParameter(_ESPEAK_RATE, int(speaker.rate), 0)
            self.lib.espeak_SetParameter(_ESPEAK_PITCH, int(speaker.pitch), 0)
            self.chunks = []
            data = text.encode() + b"\0"
            if self.lib.espeak_Synth(data, len(data), 0, 1, 0, 0, None, None) != 0:
                raise SpeechError(f"espeak-ng could not synthesize {text!r} with {speaker.voice!r}")
            self.lib.espeak_Synchronize()
            wave = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        return signal.resample_poly(wave, SAMPLE_RATE, self.rate).astype(np.float32)


def synthesize(text: str, speaker: Speaker) -> np.ndarray:
    """`text` spoken by `speaker`, as float32 samples at 16 kHz."""
    return _Espeak.get().say(text, speaker)


@dataclass(frozen=True)
class Channel:
    """Microphone band-pass (Hz), reverberation time (s, 0 for none) and noise (SNR range in dB)."""

    low_hz: float = 60.0
    high_hz: float = 7_500.0
    reverb_s: float = 0.0
    snr_db: tuple[float, float] = (20.0, 40.0)

    @staticmethod
    def random(rng: np.random.Generator) -> Channel:
        """A microphone and room drawn at random: what a source model is trained across."""
        low = float(rng.uniform(50, 300))
        return Channel(low, float(rng.uniform(3_400, 7_600)), float(rng.choice([0.0, rng.uniform(0.05, 0.35)])),
                       (float(rng.uniform(5, 15)), float(rng.uniform(20, 40))))

    def apply(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = signal.sosfilt(_bandpass(round(self.low_hz), round(self.high_hz)), wave)
        if self.reverb_s > 0:
            t = np.arange(int(self.reverb_s * SAMPLE_RATE)) / SAMPLE_RATE
            impulse = rng.standard_normal(t.size) * np.exp(-6.9 * t / self.reverb_s)  # -60 dB at reverb_s
            impulse[0] = 1.0
            out = signal.fftconvolve(out, impulse / np.abs(impulse).sum() * 4)[: out.size]
        power = np.mean(out**2) if np.any(out) else rng.uniform(1e-5, 1e-3)  # silence: noise of some level
        snr = rng.uniform(*self.snr_db)
        noise = np.cumsum(rng.standard_normal(out.size)) * 0.02 + rng.standard_normal(out.size)  # white + brown
        noise *= np.sqrt(power / (np.mean(noise**2) * 10 ** (snr / 10)))
        return (out + noise).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _bandpass(low: int, high: int) -> np.ndarray:
    return signal.butter(4, [low, high], btype="bandpass", fs=SAMPLE_RATE, output="sos")


def clip(wave: np.ndarray, rng: np.random.Generator, seconds: float = 1.0, shift_s: float = 0.1) -> np.ndarray:
    """One second around the utterance, shifted at random by up to `shift_s`."""
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, np.float32)
    wave = wave[:n]
    start = (n - wave.size) // 2 + int(rng.uniform(-shift_s, shift_s) * SAMPLE_RATE)
    start = min(max(start, 0), n - wave.size)
    out[start:start + wave.size] = wave
    return out


def _mel_filters(n_fft: int, bands: int, low: float, high: float) -> torch.Tensor:
    def mel(f: np.ndarray) -> np.ndarray:
        return 2595 * np.log10(1 + f / 700)

    edges = 700 * (10 ** (np.linspace(mel(np.array(low)), mel(np.array(high)), bands + 2) / 2595) - 1)
    freqs = np.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    weights = np.maximum(0, np.minimum((freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)))
    return torch.tensor(weights, dtype=torch.float32)


_DCT_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def mfcc(waves: torch.Tensor, coefficients: int = 10, bands: int = 40, cmn: bool = True) -> torch.Tensor:
    """[B, samples] at 16 kHz -> [B, 1, frames, coefficients] (log-mel then an orthonormal DCT-II).

    `cmn`: cepstral mean normalisation, each coefficient's mean over the clip subtracted. A
    microphone's fixed filter multiplies the spectrum, so it adds a constant to every frame's
    cepstrum: CMN removes it, as speech front-ends have done since the 1970s.
    """
    window, hop = 640, 320
    spec = torch.stft(waves, n_fft=window, hop_length=hop, window=torch.hann_window(window), center=False,
                      return_complex=True).abs() ** 2  # [B, freq, frames]
    mels = torch.log(_mel_filters(window, bands, 20.0, 7_600.0) @ spec + 1e-6)  # [B, bands, frames]
    key = (bands, coefficients)
    if key not in _DCT_CACHE:
        n = torch.arange(bands, dtype=torch.float64)
        k = torch.arange(coefficients, dtype=torch.float64)[:, None]
        basis = torch.cos(torch.pi / bands * (n + 0.5) * k) * np.sqrt(2 / bands)
        basis[0] /= np.sqrt(2)
        _DCT_CACHE[key] = basis.float()
    cepstra = _DCT_CACHE[key] @ mels  # [B, coefficients, frames]
    if cmn:
        cepstra = cepstra - cepstra.mean(-1, keepdim=True)
    return cepstra.transpose(1, 2).unsqueeze(1).contiguous()

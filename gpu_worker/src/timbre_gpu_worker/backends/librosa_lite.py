"""The three librosa functions the 12 Hz Qwen3-TTS path calls, for machines without librosa.

librosa pulls numba, llvmlite, scipy and scikit-learn (over 100 MB of wheels); the GPU benchmark
machine installs from a carried folder with a size limit, so there `torchaudio_shim` registers this
module as `librosa` when the real one is absent. Production images and CPU development machines have
the real librosa and never load this. `mel` matches `librosa.filters.mel` (Slaney scale and norm; the
tests compare them); `resample` is Timbre's own band-limited resampler.
"""
from __future__ import annotations

import numpy as np

_F_SP = 200.0 / 3  # Slaney: 66.67 Hz per mel below 1 kHz, logarithmic above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asanyarray(hz, dtype=np.float64)
    mels = hz / _F_SP
    log_t = hz >= _MIN_LOG_HZ
    mels = np.where(log_t, _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP, mels)
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    hz = _F_SP * mels
    log_t = mels >= _MIN_LOG_MEL
    return np.where(log_t, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - _MIN_LOG_MEL)), hz)


def mel(*, sr: float, n_fft: int, n_mels: int = 128, fmin: float = 0.0, fmax: float | None = None,
        htk: bool = False, norm: str | None = "slaney", dtype: type = np.float32) -> np.ndarray:
    """Mel filterbank, shape (n_mels, 1 + n_fft // 2), as librosa.filters.mel with its defaults."""
    if htk or norm != "slaney":
        raise NotImplementedError("only the Slaney mel scale and norm are provided")
    fmax = float(sr) / 2 if fmax is None else float(fmax)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float64)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    return weights.astype(dtype)


def resample(y: np.ndarray, *, orig_sr: float, target_sr: float, **_: object) -> np.ndarray:
    from timbre_common.audio import resample as _resample

    return _resample(np.asarray(y, dtype=np.float32), int(orig_sr), int(target_sr))


def load(path: str, sr: float | None = None, mono: bool = True, **_: object) -> tuple[np.ndarray, float]:
    import soundfile as sf

    audio, rate = sf.read(path, dtype="float32", always_2d=False)
    if mono and audio.ndim > 1:
        audio = audio.mean(axis=1)
    if sr is not None and int(sr) != int(rate):
        audio, rate = resample(audio, orig_sr=rate, target_sr=sr), sr
    return audio, rate

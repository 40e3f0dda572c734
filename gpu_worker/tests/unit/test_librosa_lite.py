"""librosa_lite (librosa's stand-in on machines without it) against the real librosa."""
from __future__ import annotations

import numpy as np
import pytest

from timbre_gpu_worker.backends import librosa_lite

librosa = pytest.importorskip("librosa")


@pytest.mark.parametrize(("sr", "n_fft", "n_mels", "fmin", "fmax"),
                         [(24000, 1024, 128, 0, 12000), (16000, 400, 80, 0, None), (24000, 1024, 80, 50, 8000)])
def test_mel_filterbank_matches_librosa(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> None:
    ours = librosa_lite.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-8)


def test_resample_keeps_a_tone() -> None:
    t = np.arange(16000) / 16000
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = librosa_lite.resample(tone, orig_sr=16000, target_sr=24000)
    assert abs(out.size - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(out[2000:-2000]))
    peak_hz = np.argmax(spectrum) * 24000 / (out.size - 4000)
    assert abs(peak_hz - 440) < 5


_WITHOUT_OPTIONAL_PACKAGES = r"""
import importlib.abc, io, sys, tempfile
from pathlib import Path

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"librosa", "sox", "onnxruntime"}:
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, Hide())
import numpy as np, soundfile as sf
import importlib.util
spec = importlib.util.spec_from_file_location("qwen_tiny", sys.argv[1])
tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
from timbre_gpu_worker.backends.base import SynthesisRequest
from timbre_gpu_worker.backends.qwen3 import Qwen3Backend
model_dir = tiny.build_tiny_model(Path(tempfile.mkdtemp()))
assert sys.modules["librosa"].__name__ == "librosa" and getattr(sys.modules["librosa"], "__timbre_stub__", False)
b = Qwen3Backend("qwen3-0.6b", model_dir, device="cpu", min_new_tokens=6, tokens_per_char=0.2)
buf = io.BytesIO()
t = np.arange(32000) / 16000
sf.write(buf, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000, format="WAV")
[r] = b.synthesize_batch([SynthesisRequest("j", "Hello there.", "en", "v", reference_wav=buf.getvalue())])
assert r.samples.size > 0, r
print("ok", r.samples.size)
"""


def test_qwen3_runs_without_librosa_sox_or_onnxruntime(tmp_path) -> None:
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("qwen_tts") is None:
        pytest.skip("qwen-tts not installed (requirements/qwen-nodeps.txt)")
    tiny = Path(__file__).resolve().parents[1] / "qwen_tiny.py"
    script = tmp_path / "run.py"
    script.write_text(_WITHOUT_OPTIONAL_PACKAGES)
    done = subprocess.run([sys.executable, str(script), str(tiny)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("ok"), done.stdout[-2000:]

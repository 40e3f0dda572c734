"""Stand-in for `torchaudio` where the installed build cannot load, and for other imports qwen-tts makes
at module level that the 12 Hz models never need.

qwen-tts imports `torchaudio.compliance.kaldi` at module level, but only its 25 Hz tokenizer uses it;
the 12 Hz models Timbre serves never touch it. PyPI's torchaudio wheels fail to load their C++
library against some torch builds (CPU dev machines), so there we register an inert package tree
before importing qwen_tts. On a GPU image with a matching torch/torchaudio pair the real one loads
and this does nothing. Likewise `sox` and `onnxruntime` (25 Hz tokenizer only) get inert stubs and
`librosa` gets `librosa_lite` where they are not installed (the GPU benchmark machine, whose wheels
travel in a size-limited folder); where they are installed, the real ones are used.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

_STUB_FLAG = "__timbre_stub__"


def _stub_module(name: str, is_package: bool) -> types.ModuleType:
    # A real ModuleSpec keeps importlib.util.find_spec() and transformers' availability probes from
    # raising "__spec__ is None" on the stub.
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
    module = importlib.util.module_from_spec(spec)
    if is_package:
        module.__path__ = []
    setattr(module, _STUB_FLAG, True)
    module.__version__ = "0.0.0+timbre-stub"

    def _unavailable(attr: str) -> object:
        raise AttributeError(f"{name}.{attr} is unavailable: torchaudio is stubbed on this machine")

    module.__getattr__ = _unavailable  # type: ignore[method-assign]
    return module


def real_torchaudio_loads() -> bool:
    """True when the installed torchaudio imports cleanly against this torch."""
    if "torchaudio" in sys.modules:
        return not getattr(sys.modules["torchaudio"], _STUB_FLAG, False)
    if importlib.util.find_spec("torchaudio") is None:
        return False
    try:
        import torchaudio  # noqa: F401
    except Exception:  # OSError/ImportError from its C++ extension, RuntimeError from version checks
        for mod in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[mod]
        return False
    return True


def _missing(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _ensure_optional_imports() -> None:
    """Inert `sox` and `onnxruntime`, and `librosa_lite` as `librosa`, where they are not installed."""
    for name in ("sox", "onnxruntime"):
        if _missing(name):
            sys.modules[name] = _stub_module(name, False)
    if _missing("librosa"):
        from . import librosa_lite

        package = _stub_module("librosa", True)
        filters = _stub_module("librosa.filters", False)
        filters.mel = librosa_lite.mel  # type: ignore[attr-defined]
        package.filters = filters  # type: ignore[attr-defined]
        package.resample = librosa_lite.resample  # type: ignore[attr-defined]
        package.load = librosa_lite.load  # type: ignore[attr-defined]
        sys.modules["librosa"] = package
        sys.modules["librosa.filters"] = filters


def ensure_torchaudio_importable() -> bool:
    """Register the stub unless a working torchaudio exists; returns True when the stub is in use."""
    _ensure_optional_imports()
    if real_torchaudio_loads():
        return False
    if getattr(sys.modules.get("torchaudio"), _STUB_FLAG, False):
        return True
    for name, is_package in (
        ("torchaudio", True),
        ("torchaudio.compliance", True),
        ("torchaudio.compliance.kaldi", False),
    ):
        sys.modules[name] = _stub_module(name, is_package)
    sys.modules["torchaudio"].compliance = sys.modules["torchaudio.compliance"]  # type: ignore[attr-defined]
    sys.modules["torchaudio.compliance"].kaldi = sys.modules["torchaudio.compliance.kaldi"]  # type: ignore[attr-defined]
    return True

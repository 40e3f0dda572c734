"""The CUDA decode path of the Qwen3 backends: captured CUDA graphs, static KV caches, continuous batching.

Imported by `Qwen3Backend.load` only when the model is on CUDA (never on CPU, never by the tests there).
It builds on two kept libraries rather than a copy of their code:

- `faster-qwen3-tts` 0.3.x (MIT): CUDA graphs of the talker's decode step and of the code predictor's
  15 steps, static KV caches; it works with `qwen-tts` 0.1.1 and transformers < 5, which we pin.
- `faster-qwen3-tts-batch` 0.2.0: the same graphs captured at a fixed batch size, and a decode loop with
  slot replacement: when one sequence ends, a waiting request takes its slot at the next step
  (iteration-level batching), and the finished one is handed over at once (`on_slot_done`).

One scheduler thread owns the GPU. Requests (whole texts and streams alike) queue for it; a run starts
with up to `max_batch` of them and takes new ones into freed slots while it lasts. Around the library's
loop, `_RunView` adds what the worker needs: each request's own frame bound (the loop has one for the
whole run; past its bound a slot is made to say end-of-speech), per-step frames for streams, and the
rotary offset of a replacement slot, which must account for the left padding it is placed behind.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from faster_qwen3_tts import FasterQwen3TTS
from faster_qwen3_tts.predictor_graph import PredictorGraph
from faster_qwen3_tts.talker_graph import TalkerGraph
from faster_qwen3_tts_batch import BatchedFasterQwen3TTS, SlotReplacement
from faster_qwen3_tts_batch.batched_sampling import batched_sample_logits
from faster_qwen3_tts_batch.continuous_generate import continuous_batched_generate

log = logging.getLogger(__name__)

# How long the scheduler waits for company before starting a run with fewer than max_batch requests.
GATHER_S = 0.005


@dataclass(eq=False)
class _Job:
    work: Any  # qwen3._Work
    on_codes: Callable[[Any, bool], None]  # (codes frames x 16 on CPU, truncated)
    sink: Callable[[Any], None] | None = None  # per-step frame (1 x 16) of a stream
    cancel: threading.Event | None = None
    inputs: tuple | None = None  # talker inputs, built once
    steps: int = 0
    forced: bool = False
    error: BaseException | None = None
    codes: Any = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def bound(self) -> int:
        return int(self.work.max_new_tokens)

    def finish(self, codes: Any, truncated: bool) -> None:
        self.codes = codes
        try:
            self.on_codes(codes, truncated)
        except BaseException as exc:  # the receiver failed: the waiting caller sees it
            self.error = exc
        self.done.set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


class GraphDecoder:
    """Codes for Qwen3Backend from the CUDA graphs; `run` and `stream` block the calling thread only."""

    def __init__(self, model: Any, *, max_batch: int = 8, max_seq_len: int = 4096) -> None:
        m = model.model
        talker = m.talker
        cfg = m.config.talker_config
        predictor = talker.code_predictor
        dtype = next(talker.parameters()).dtype
        device = str(next(talker.parameters()).device)
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.config = cfg
        self.sampling = model._merge_generate_kwargs()
        self.base = FasterQwen3TTS(
            base_model=model,
            predictor_graph=PredictorGraph(predictor, predictor.model.config, cfg.hidden_size, device=device,
                                           dtype=dtype, do_sample=True, top_k=50, temperature=0.9),
            talker_graph=TalkerGraph(talker.model, cfg, device=device, dtype=dtype, max_seq_len=max_seq_len),
            device=device, dtype=dtype, max_seq_len=max_seq_len)
        self.batched = BatchedFasterQwen3TTS(self.base, max_batch_size=max_batch, max_seq_len=max_seq_len)
        started = time.perf_counter()
        self.batched.warmup(prefill_len=100)  # capture now, at load, not on the first job
        log.info("cuda graphs captured for batch %d in %.1fs", max_batch, time.perf_counter() - started)
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self.runs = 0
        self.replacements = 0
        self._thread = threading.Thread(target=self._loop, name="qwen3-cuda-graphs", daemon=True)
        self._thread.start()

    # -- the backend's side --------------------------------------------------------------------

    def run(self, batch: list[Any], on_row: Callable[[int, Any, bool], None]) -> None:
        """Generate the codes of each work item; on_row(index, codes, truncated) as each one ends."""
        jobs = [_Job(work=w, on_codes=(lambda codes, cut, b=b: on_row(b, codes, cut))) for b, w in enumerate(batch)]
        self._submit(jobs)
        for job in jobs:
            job.done.wait()
        for job in jobs:
            if job.error is not None:
                raise job.error

    def stream(self, work: Any, sink: Callable[[Any], None], cancel: threading.Event) -> Any:
        """Generate one item, handing each step's frame (1 x 16, CPU) to sink; returns its codes."""
        job = _Job(work=work, on_codes=lambda codes, cut: None, sink=sink, cancel=cancel)
        self._submit([job])
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.codes

    def _submit(self, jobs: list[_Job]) -> None:
        with self._wake:
            self._pending.extend(jobs)
            self._wake.notify()

    # -- the scheduler thread ------------------------------------------------------------------

    def _take(self, block: bool) -> _Job | None:
        with self._wake:
            while block and not self._pending:
                self._wake.wait()
            return self._pending.popleft() if self._pending else None

    def _loop(self) -> None:
        while True:
            batch = [self._take(block=True)]
            deadline = time.monotonic() + GATHER_S
            while len(batch) < self.max_batch and time.monotonic() < deadline:
                job = self._take(block=False)
                if job is None:
                    time.sleep(0.0005)
                    continue
                batch.append(job)
            live: list[_Job] = []
            try:
                self._run(batch, live)
            except BaseException as exc:  # one broken run must not stop the scheduler
                log.exception("cuda graph run of %d requests failed", len(live) or len(batch))
                for job in [*batch, *live]:
                    job.fail(exc)

    def _inputs(self, job: _Job) -> tuple:
        if job.inputs is None:
            w = job.work
            item = w.prompt.item
            _, _, _, tie, tam, tth, tpe, _ = self.base._prepare_generation(
                text=w.text, language=w.language, ref_text=item.ref_text or "", voice_clone_prompt=[item],
                non_streaming_mode=False)
            job.inputs = (tie, tam, tth, tpe)
        return job.inputs

    @torch.inference_mode()
    def _run(self, batch: list[_Job], live: list[_Job]) -> None:
        talker = self.model.model.talker
        inputs = []
        for job in batch:
            try:
                inputs.append((job, self._inputs(job)))
            except BaseException as exc:
                job.fail(exc)
        if not inputs:
            return
        batch = [job for job, _ in inputs]
        live.extend(batch)
        view = _RunView(self, talker, batch, max(i[0].shape[1] for _, i in inputs))
        s = self.sampling
        self.runs += 1
        continuous_batched_generate(
            talker=view,
            talker_input_embeds_list=[i[0] for _, i in inputs],
            attention_mask_list=[i[1] for _, i in inputs],
            trailing_text_hiddens_list=[i[2] for _, i in inputs],
            request_tags=batch,
            tts_pad_embed=inputs[0][1][3],
            config=self.config,
            predictor_graph=view.predictor_graph(self.batched.batched_predictor_graph),
            talker_graph=self.batched.batched_talker_graph,
            try_get_replacement=lambda: view.replacement(live),
            on_slot_done=view.slot_done,
            max_new_tokens=self.max_seq_len,
            min_new_tokens=2,
            temperature=s.get("temperature", 0.9),
            top_k=s.get("top_k", 50),
            top_p=s.get("top_p", 1.0),
            do_sample=s.get("do_sample", True),
            repetition_penalty=s.get("repetition_penalty", 1.05),
        )
        for job in live:  # anything the loop did not hand back (it should hand back every slot)
            job.fail(RuntimeError("the graph run ended without this request's codes"))


class _RunView:
    """The talker and predictor graph as one run of `continuous_batched_generate` sees them."""

    def __init__(self, decoder: GraphDecoder, talker: Any, batch: list[_Job], prefill_len: int) -> None:
        self._decoder = decoder
        self._talker = talker
        self.slots: list[_Job | None] = [*batch, *([None] * (decoder.max_batch - len(batch)))]
        self.prefill_len = prefill_len  # the run's shared prefill length: its first decode position
        self.steps = 0  # decode steps so far
        self.exhausted = False
        self._freed: int | None = None
        self._tokens: Any = None
        self.eos = int(decoder.config.codec_eos_token_id)
        self.codec_head = self._head
        vocab = int(decoder.config.vocab_size)
        self._suppress = torch.zeros(vocab, dtype=torch.bool, device=talker.device)
        self._suppress[max(0, vocab - 1024):] = True
        self._suppress[self.eos] = False

    # The loop reads these off the talker; everything else goes to the real one.
    def __getattr__(self, name: str) -> Any:
        return getattr(self._talker, name)

    def get_input_embeddings(self) -> Callable[[Any], Any]:
        embed = self._talker.get_input_embeddings()

        def embed_tokens(tokens: Any) -> Any:
            self._tokens = tokens  # the first codebook of this step's frames, one per slot
            return embed(tokens)

        return embed_tokens

    def predictor_graph(self, graph: Any) -> Any:
        view = self

        class _Predictor:
            def __getattr__(self, name: str) -> Any:
                return getattr(graph, name)

            def run(self, pred_input: Any) -> Any:
                ids = graph.run(pred_input)
                view._step(ids)
                return ids

        return _Predictor()

    def _step(self, codebook_ids: Any) -> None:
        """One decode step: count each slot's frames and hand streams their frame."""
        position = self.prefill_len + self.steps
        if position >= self._decoder.max_seq_len - 2:
            self.exhausted = True
        self.steps += 1
        frames = None
        for b, job in enumerate(self.slots):
            if job is None:
                continue
            job.steps += 1
            if job.sink is not None:
                if frames is None:
                    frames = torch.cat([self._tokens.reshape(-1, 1), codebook_ids], dim=1).to("cpu")
                job.sink(frames[b : b + 1])

    def _head(self, hidden: Any) -> Any:
        logits = self._talker.codec_head(hidden)
        if logits.dim() != 2:
            return logits
        for b, job in enumerate(self.slots):
            if job is None:
                continue
            cancelled = job.cancel is not None and job.cancel.is_set()
            if job.steps >= job.bound or cancelled:
                # Past its own bound (or abandoned): make this slot say end-of-speech now.
                job.forced = job.forced or not cancelled
                logits[b] = float("-inf")
                logits[b, self.eos] = 0.0
        return logits

    def slot_done(self, tag: _Job, codec_ids: Any, timing: dict) -> None:
        b = next(i for i, job in enumerate(self.slots) if job is tag)
        self.slots[b] = None
        self._freed = b
        codes = codec_ids.to("cpu") if codec_ids is not None else torch.zeros((0, 16), dtype=torch.long)
        codes = codes[: tag.bound]
        tag.finish(codes, tag.forced or self.exhausted)

    def replacement(self, live: list[_Job]) -> SlotReplacement | None:
        """The next waiting request, prefilled into the slot just freed, if it fits in this run."""
        decoder = self._decoder
        if self._freed is None:
            return None
        job = decoder._take(block=False)
        if job is None:
            return None
        position = self.prefill_len + self.steps
        try:
            tie, tam, tth, tpe = decoder._inputs(job)
        except BaseException as exc:
            job.fail(exc)
            return None
        prefill_len = int(tie.shape[1])
        if prefill_len > position or position + job.bound + 2 >= decoder.max_seq_len:
            with decoder._wake:  # does not fit behind this run's position: first in the next run
                decoder._pending.appendleft(job)
            return None
        out = self._talker.forward(inputs_embeds=tie, attention_mask=tam, use_cache=True, output_hidden_states=True,
                                   return_dict=True, trailing_text_hidden=None, tts_pad_embed=tpe,
                                   generation_step=None, past_hidden=None, past_key_values=None)
        s = decoder.sampling
        first = batched_sample_logits(out.logits[:, -1, :], temperature=s.get("temperature", 0.9),
                                      top_k=s.get("top_k", 50), top_p=s.get("top_p", 1.0),
                                      do_sample=s.get("do_sample", True), suppress_mask=self._suppress,
                                      suppress_eos_mask=torch.ones(1, dtype=torch.bool, device=tie.device),
                                      eos_id=self.eos)[0]
        rope = getattr(self._talker, "rope_deltas", None)
        delta = float(rope[0, 0]) if rope is not None else 0.0
        # The slot's keys sit at [position - prefill_len, position): like a left-padded row of the
        # batched prefill, its rotary positions are offset by minus that padding.
        delta -= position - prefill_len
        self.slots[self._freed] = job
        live.append(job)
        decoder.replacements += 1
        return SlotReplacement(past_key_values=out.past_key_values, prefill_len=prefill_len, first_token=first,
                               past_hidden=out.past_hidden, trailing_text_hiddens=tth, text_len=int(tth.shape[1]),
                               rope_delta=delta, tag=job)

"""Many streams, one model: continuous batching of cache-aware streaming recognition.

An `Engine` holds one loaded model and any number of streams that join and
leave at any time. Each `step` takes every stream that has a whole chunk of
mel frames (or its final partial chunk), runs one batched encoder step and one
batched greedy decoding step per attention context (`step_streams`), and hands
each stream its own states back. A stream's tokens are exactly those it gets
when it runs alone: batched rows never mix, and ragged chunks are masked. A
batch whose step raises fails only its own streams; the engine goes on serving.

Streams with different chunk sizes have different attention contexts: their
chunk lengths and attention masks differ, so they are stepped in one batch per
context. One padded batch for all contexts (per-row masks) would rarely pay:
short-chunk streams are ready several times per long chunk, and measured on the
tiny model (CPU), a padded 80+1120 ms batch of 8+8 streams cost 1.5-2x the two
separate batches; only batches of about 2+2 streams, where per-call overhead
dominates, came out slightly faster.

State: per attention context, the open streams' encoder and decoder states are
rows (slots) of preallocated batch-first tensors on the model's device, grown by
doubling. A step reads its streams' rows (as views when their slots are
consecutive, else gathered by index), runs, and writes the new rows back in
place, so no state is stacked or split per stream (measured on the CPU, full
preset, int8: a step of 16 streams took 12-16% less CPU time than stacking and
splitting). A stream gets its slot at its first step and gives it back when it
is done or closed. Mel frames
are computed on the host, in the feeding thread, so feeding never waits on the
device; each step uploads its chunks at once (through pinned memory on CUDA).

On CUDA, steady steps (every stream past its first chunk) run at fixed shapes as
captured CUDA graphs (`caster.graphs`, the `graphs` option). A stream's tokens
are then exactly those of the same engine path run alone only up to the GPU's
rounding: kernels may differ with the batch size, and mel frames computed on the
host round differently from the GPU's.

Threads: any thread may open, feed, end, save or close streams; the batched
compute runs in one place at a time, either in the caller of `step` or in the
background worker that `start` launches. Per-stream state lives in the engine's
stream records, never on the model. Results arrive as `Segment` events, read
with `events`, by iterating a `StreamHandle`, or with `async for`. A stream's
state and its saved bytes (`save`/`restore`) are defined in `caster.stream_state`.

Lock order (never taken the other way round): a stream's feed lock, then the
compute lock, then the registry lock.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from caster.audio import as_audio
from caster.decoding import DecoderState, Hypothesis, initial_decoder_state
from caster.encoder import EncoderCache
from caster.endpoint import EndpointConfig, EndpointError, segment_cuts, trailing_silence_ends
from caster.graphs import EncoderGraphs
from caster.languages import canonical_locale
from caster.mel import MelState, mel_flush, mel_step
from caster.model import Model
from caster.results import Lexicon, Segment, StreamResult
from caster.state import batch_size, grow_state, select_state, stack_states, write_state_
from caster.stream_state import (
    StreamState,
    StreamStateError,
    deserialize_stream,
    model_fingerprint,
    serialize_stream,
)
from caster.streaming import step_streams
from caster.vad import VAD_SAMPLE_RATE, SileroVad, VadState, vad_step

# StreamStateError is raised by `Engine.restore`, so callers catch it from here too.
__all__ = ["Engine", "EngineError", "StreamHandle", "StreamStateError", "UnknownStreamError"]


class EngineError(RuntimeError):
    """The engine cannot do what was asked (stream ended, worker failed, ...)."""


class UnknownStreamError(LookupError):
    """No open stream has this id (never opened, or closed)."""


@dataclass(eq=False)
class _Record(StreamState):
    """One stream: its state, and the engine's bookkeeping of it. Guarded by the
    engine's registry lock, except `mel_state`/`vad_state`, which only holders
    of `feed_lock` replace."""

    # The initial or restored states until the stream's first step; from then on
    # they live in the engine's slot pool, in row `slot`, and these are None.
    encoder_cache: EncoderCache | None = None
    decoder_state: DecoderState | None = None
    slot: int | None = None
    mel_cached: int = 0  # host copy of the encoder cache's mel_len (steady steps need it full)
    id: int = -1
    finals: list[Segment] = field(default_factory=list)
    events: deque[Segment] = field(default_factory=deque)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list)
    in_flight: bool = False  # its chunk is being computed
    ending: bool = False  # no more audio will come
    done: bool = False  # every frame decoded, last segment final
    closed: bool = False
    error: Exception | None = None  # its step failed: the stream cannot go on
    feed_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def resume(cls, state: StreamState) -> _Record:
        """A record that continues a restored stream's state."""
        record = cls(**{f.name: getattr(state, f.name) for f in fields(StreamState)})
        record.mel_cached = int(state.encoder_cache.mel_len[0])
        return record


@dataclass(eq=False)
class _Slots:
    """One attention context's stream states: batch-first tensors, one row (slot) per stream."""

    encoder: EncoderCache
    decoder: DecoderState
    free: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return batch_size(self.encoder)

    def take(self, n: int) -> list[int]:
        """n free slots; the tensors double in rows until that many are free."""
        old = capacity = self.capacity
        while len(self.free) + capacity - old < n:
            capacity = max(1, 2 * capacity)
        if capacity > old:
            self.encoder = grow_state(self.encoder, capacity)
            self.decoder = grow_state(self.decoder, capacity)
            self.free += range(capacity - 1, old - 1, -1)  # pop() hands out the lowest first
        return [self.free.pop() for _ in range(n)]


@dataclass(frozen=True)
class _Batch:
    """Streams of one context stepped together, with the chunks cut for them."""

    context: tuple[int, int]
    steady: bool  # every stream's mel cache is full: a fixed-shape step
    slots: _Slots
    index: list[int]  # the streams' slots (taken when the batch was cut)
    records: list[_Record]
    chunks: list[Tensor]


class StreamHandle:
    """A stream of an `Engine`: the engine's per-stream methods, bound.

    Iterating it (`for event in handle`, or `async for` under asyncio) yields
    its `Segment` events until the stream is done; both need the engine's
    background worker (`Engine.start`).
    """

    def __init__(self, engine: Engine, stream_id: int) -> None:
        self.engine = engine
        self.id = stream_id

    def __repr__(self) -> str:
        return f"StreamHandle(id={self.id})"

    def feed(self, samples: np.ndarray | Sequence[float] | Tensor) -> None:
        self.engine.feed(self.id, samples)

    def end(self) -> None:
        self.engine.end(self.id)

    def finish(self, timeout: float | None = None) -> StreamResult:
        return self.engine.finish(self.id, timeout)

    def events(self) -> list[Segment]:
        return self.engine.events(self.id)

    def save(self) -> bytes:
        return self.engine.save(self.id)

    def close(self) -> None:
        self.engine.close(self.id)

    def __iter__(self) -> Iterator[Segment]:
        return self.engine._iterate(self.id)

    def __aiter__(self) -> AsyncIterator[Segment]:
        return _AsyncEvents(self.engine, self.engine._record(self.id))


class Engine:
    """Serve many streams with one model.

    Args:
        model: the loaded model (shared, never modified).
        max_batch: most streams in one batched step; more ready streams are
            split into several batches of the same step.
        graphs: run steady steps (every stream past its first chunk) at fixed
            shapes, batches padded to a power of two and chunks to full length,
            captured as CUDA graphs (`caster.graphs`). None: on for a CUDA
            model, off elsewhere. True on the CPU pads without capturing, which
            only costs there (tests use it to check the padding).

    Synchronous use: `open`, `feed`, call `step()` (or let `finish` step), and
    `finish`. Threaded or asyncio use: `start()` a background worker (or use
    the engine as a context manager), then feed from anywhere.
    """

    def __init__(self, model: Model, max_batch: int = 32, graphs: bool | None = None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.model = model
        self.max_batch = max_batch
        self._lexicon = Lexicon(model.tokenizer, model.config.encoder_frame_ms)
        self._fingerprint = model_fingerprint(model)
        cuda = model.device.type == "cuda"
        # Mel frames are computed on the host (see the module notes): a host copy of the front end.
        featurizer = model.net.preprocessor.featurizer
        on_host = model.device.type == "cpu"
        self._featurizer = featurizer if on_host else copy.deepcopy(featurizer).cpu()
        self._pin = cuda  # stage uploads in pinned memory
        encoder = model.net.encoder
        use_graphs = cuda if graphs is None else graphs
        self._graphs = EncoderGraphs(encoder, capture=cuda) if use_graphs else None
        self._initial_caches: dict[tuple[int, int], EncoderCache] = {}
        self._initial_decoder = initial_decoder_state(model.net, 1)
        self._slots: dict[tuple[int, int], _Slots] = {}  # per attention context
        self._vad: SileroVad | None = None
        self._ids = itertools.count()
        self._streams: dict[int, _Record] = {}
        self._lock = threading.Lock()  # the registry and every record
        self._changed = threading.Condition(self._lock)
        self._compute = threading.Lock()  # one batched step at a time
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    # ----------------------------------------------------------------- streams

    def open(
        self,
        language: str | None = None,
        chunk_ms: int | None = None,
        endpointing: EndpointConfig | None = None,
    ) -> StreamHandle:
        """Start a stream.

        Args:
            language: as for `Model.transcribe` (a locale, "auto", or None).
            chunk_ms: the latency whose attention context to use; None for the
                model's default context.
            endpointing: when segments become final (default `EndpointConfig()`).
        """
        prompt = self.model.prompt_index(language)
        context = self.model.config.context_for_chunk_ms(chunk_ms)
        endpointing = EndpointConfig() if endpointing is None else endpointing
        if not isinstance(endpointing, EndpointConfig):
            raise TypeError(f"endpointing must be an EndpointConfig, not {type(endpointing)}")
        if endpointing.vad and self.model.config.mel.sample_rate != VAD_SAMPLE_RATE:
            raise EndpointError(
                f"the VAD needs {VAD_SAMPLE_RATE} Hz audio, the model takes "
                f"{self.model.config.mel.sample_rate} Hz"
            )
        record = _Record(
            language=language,
            prompt=prompt,
            context=context,
            endpointing=endpointing,
            mel_state=MelState.initial(self.model.config.mel),
            pending=torch.zeros(self.model.config.mel.n_mels, 0),
            encoder_cache=self._initial_cache(context),
            decoder_state=self._initial_decoder,
            vad_state=VadState.initial() if endpointing.vad else None,
        )
        return self._register(record)

    def feed(
        self, stream: StreamHandle | int, samples: np.ndarray | Sequence[float] | Tensor
    ) -> None:
        """Add 16 kHz mono audio of any length to a stream (computes its mel frames here)."""
        record = self._record(stream)
        if len(samples) == 0:
            return
        audio = torch.from_numpy(as_audio(samples))
        with record.feed_lock:
            with self._lock:
                self._check_can_feed(record)
            with torch.inference_mode():
                frames, mel_state = mel_step(self._featurizer, audio, record.mel_state)
                vad_state = record.vad_state
                if vad_state is not None:
                    vad = self._silero()
                    vad_state = vad_step(vad, audio, vad_state, record.endpointing.vad_threshold)
            with self._lock:
                self._check_can_feed(record)
                record.mel_state, record.vad_state = mel_state, vad_state
                record.pending = torch.cat([record.pending, frames], dim=1)
                if self._ready(record):
                    self._changed.notify_all()

    def end(self, stream: StreamHandle | int) -> None:
        """Declare that no more audio comes; the rest is decoded by the next steps."""
        record = self._record(stream)
        with record.feed_lock:
            with self._lock:
                self._raise_if_failed(record)
                if record.ending or record.closed:
                    return
            with torch.inference_mode():
                last = mel_flush(self._featurizer, record.mel_state)
            with self._lock:
                record.pending = torch.cat([record.pending, last], dim=1)
                record.ending = True
                if record.pending.shape[1] == 0 and not record.in_flight:
                    self._complete(record)
                self._changed.notify_all()

    def finish(self, stream: StreamHandle | int, timeout: float | None = None) -> StreamResult:
        """End a stream, wait until it is decoded, close it and return its result.

        Without a running worker the calling thread does the steps (stepping
        every other ready stream too).

        Raises:
            TimeoutError: the worker did not finish the stream within `timeout` s.
        """
        record = self._record(stream)
        self.end(record.id)
        with self._lock:
            if self._worker is not None and not self._changed.wait_for(
                lambda: (
                    record.done
                    or record.closed
                    or record.error is not None
                    or self._error is not None
                    or self._worker is None
                ),
                timeout,
            ):
                raise TimeoutError(f"stream {record.id} was not finished in {timeout} s")
        while not (record.done or record.closed):  # no worker (any more): step here
            with self._lock:
                self._raise_if_failed(record)
            self.step()
        if record.closed and not record.done:
            raise EngineError(f"stream {record.id} was closed before it finished")
        result = StreamResult(
            self.model.make_transcript(
                record.token_ids, record.frames, record.scores, record.prompt
            ),
            tuple(record.finals),
        )
        self.close(record.id)
        return result

    def close(self, stream: StreamHandle | int) -> None:
        """Drop a stream at once, finished or not (unknown ids are ignored)."""
        stream_id = stream.id if isinstance(stream, StreamHandle) else stream
        with self._lock:
            record = self._streams.pop(stream_id, None)
            if record is not None:
                record.closed = True
                self._release(record)
                self._wake(record)

    def events(self, stream: StreamHandle | int) -> list[Segment]:
        """Take the stream's events so far (never blocks).

        Interim segments are coalesced: of consecutive interim events of one
        segment only the newest is kept.
        """
        record = self._record(stream)
        with self._lock:
            taken = list(record.events)
            record.events.clear()
            return taken

    @property
    def streams(self) -> list[int]:
        """Ids of the open streams."""
        with self._lock:
            return list(self._streams)

    # ----------------------------------------------------------------- compute

    def step(self) -> int:
        """Advance every stream that has a whole chunk (or its final remainder) by one chunk.

        Ready streams are grouped by attention context and batched up to
        `max_batch`; each batch is one encoder step and one greedy decoding step.
        A batch whose step raises fails its own streams (their callers get an
        `EngineError`); the other batches and streams go on.

        Returns:
            the number of streams advanced.
        """
        with self._compute:
            with self._lock:
                self._raise_if_failed()
                batches = self._take_chunks()
            try:
                computed = [self._try_batch(batch) for batch in batches]
            except BaseException as e:  # an interrupt, not a failed batch: the engine stops
                with self._lock:
                    self._error = e
                    for record in self._streams.values():
                        self._wake(record)
                raise
            with self._lock:
                for batch, outcome in zip(batches, computed, strict=True):
                    if isinstance(outcome, Exception):
                        for record in batch.records:
                            self._fail(record, outcome)
                        continue
                    hyps, decoded = outcome
                    for record, chunk, hyp, frames in zip(
                        batch.records, batch.chunks, hyps, decoded, strict=True
                    ):
                        self._scatter(record, hyp, frames, chunk.shape[1])
                self._changed.notify_all()
        return sum(len(batch.records) for batch in batches)

    def start(self) -> Engine:
        """Run a background worker that steps whenever any stream has a chunk ready."""
        with self._lock:
            if self._worker is not None:
                return self
            self._stopping = False
            self._worker = threading.Thread(target=self._work, name="caster-engine", daemon=True)
            self._worker.start()
        return self

    def stop(self) -> None:
        """Stop the background worker (after its current step); streams stay open."""
        with self._lock:
            worker, self._stopping = self._worker, True
            self._changed.notify_all()
        if worker is not None:
            worker.join()
        with self._lock:
            self._worker = None
            for record in self._streams.values():  # waiting iterators must notice
                self._wake(record)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ save/restore

    def save(self, stream: StreamHandle | int) -> bytes:
        """The stream's whole state as bytes (safetensors with a JSON header).

        Events not yet taken are not part of the state. Saving does not change
        the stream; `restore` in any process with the same model continues it
        with identical results.
        """
        record = self._record(stream)
        with record.feed_lock, self._compute, self._lock:
            self._raise_if_failed(record)
            if record.ending or record.closed:
                raise EngineError(f"stream {record.id} has ended: only live streams can be saved")
            return serialize_stream(self._snapshot(record), self._fingerprint)

    def restore(self, data: bytes) -> StreamHandle:
        """Open a stream from `save`'s bytes; it continues exactly where the saved one was.

        Raises:
            StreamStateError: the bytes are not a stream state, or one for another model.
        """
        record = _Record.resume(deserialize_stream(data, self.model, self._fingerprint))
        if record.vad_state is not None:
            self._silero()
        # Final segments are saved as token spans; their `Segment`s are rebuilt here.
        for (start, end), language in zip(record.final_spans, record.final_languages, strict=True):
            segment = self._segment(record, start, end, is_final=True)
            record.finals.append(replace(segment, language=language))
        return self._register(record)

    # ------------------------------------------------------------------ inside

    def _register(self, record: _Record) -> StreamHandle:
        with self._lock:
            self._raise_if_failed()
            record.id = next(self._ids)
            self._streams[record.id] = record
            self._changed.notify_all()
        return StreamHandle(self, record.id)

    def _record(self, stream: StreamHandle | int) -> _Record:
        stream_id = stream.id if isinstance(stream, StreamHandle) else stream
        with self._lock:
            record = self._streams.get(stream_id)
        if record is None:
            raise UnknownStreamError(f"no open stream with id {stream_id!r}")
        return record

    def _silero(self) -> SileroVad:
        with self._lock:
            if self._vad is None:
                self._vad = SileroVad.from_package()
            return self._vad

    def _raise_if_failed(self, record: _Record | None = None) -> None:
        if self._error is not None:
            raise EngineError("the engine's worker failed; open new streams") from self._error
        if record is not None and record.error is not None:
            raise EngineError(f"stream {record.id} failed: {record.error}") from record.error

    def _check_can_feed(self, record: _Record) -> None:
        self._raise_if_failed(record)
        if record.closed:
            raise UnknownStreamError(f"stream {record.id} is closed")
        if record.ending:
            raise EngineError(f"stream {record.id} has ended: no more audio can be fed")

    def _initial_cache(self, context: tuple[int, int]) -> EncoderCache:
        """A new stream's encoder cache (one per context, shared: states are never modified)."""
        cache = self._initial_caches.get(context)
        if cache is None:
            cache = self.model.net.encoder.initial_cache(1, context, self.model.device)
            self._initial_caches[context] = cache
        return cache

    def _snapshot(self, record: _Record) -> StreamState:
        """The stream's whole state, its encoder and decoder rows read from its slot."""
        encoder_cache, decoder_state = record.encoder_cache, record.decoder_state
        if record.slot is not None:
            slots = self._slots[record.context]
            index = torch.tensor([record.slot], device=self.model.device)
            encoder_cache = select_state(slots.encoder, index)
            decoder_state = select_state(slots.decoder, index)
        state = {f.name: getattr(record, f.name) for f in fields(StreamState)}
        state.update(encoder_cache=encoder_cache, decoder_state=decoder_state)
        return StreamState(**state)

    def _place(self, context: tuple[int, int], records: list[_Record]) -> _Slots:
        """The context's slot pool, after giving each record without a slot one (its
        initial or restored states written into the slot's row)."""
        slots = self._slots.get(context)
        if slots is None:
            empty = torch.zeros(0, dtype=torch.long, device=self.model.device)
            initial = (self._initial_cache(context), self._initial_decoder)
            slots = _Slots(*(select_state(state, empty) for state in initial))
            self._slots[context] = slots
        new = [r for r in records if r.slot is None]
        for record, slot in zip(new, slots.take(len(new)), strict=True):
            record.slot = slot
        initial = self._initial_cache(context)
        fresh = [r for r in new if r.encoder_cache is initial]
        if fresh:  # one write of the shared initial states to every new stream's row
            index = self._upload([r.slot for r in fresh])
            write_state_(slots.encoder, index, initial)
            write_state_(slots.decoder, index, self._initial_decoder)
        restored = [r for r in new if r.encoder_cache is not initial]
        if restored:
            index = self._upload([r.slot for r in restored])
            write_state_(slots.encoder, index, stack_states([r.encoder_cache for r in restored]))
            write_state_(slots.decoder, index, stack_states([r.decoder_state for r in restored]))
        for record in new:
            record.encoder_cache, record.decoder_state = None, None
        return slots

    def _release(self, record: _Record) -> None:
        """Give the record's slot back; a pool with no stream left is dropped."""
        if record.slot is None:
            return
        slots = self._slots[record.context]
        slots.free.append(record.slot)
        record.slot = None
        if len(slots.free) == slots.capacity:
            del self._slots[record.context]

    def _need(self, record: _Record) -> int:
        return self.model.net.encoder.chunk_frames(record.context, record.first_chunk)

    def _ready(self, record: _Record) -> bool:
        if record.done or record.in_flight or record.error is not None:
            return False
        have = record.pending.shape[1]
        return have >= self._need(record) or (record.ending and have > 0)

    def _take_chunks(self) -> list[_Batch]:
        """Cut the next chunk off every ready stream, grouped by context (and by whether
        the step can have fixed shapes), in batches; give new streams their slots."""
        full = self.model.net.encoder.mel_cache_frames
        groups: dict[tuple[tuple[int, int], bool], list[_Record]] = defaultdict(list)
        for record in self._streams.values():
            if self._ready(record):
                steady = self._graphs is not None and record.mel_cached == full
                groups[record.context, steady].append(record)
        batches = []
        for (context, steady), records in groups.items():
            slots = self._place(context, records)
            for i in range(0, len(records), self.max_batch):
                batch = records[i : i + self.max_batch]
                chunks = []
                for record in batch:
                    need = self._need(record)
                    chunks.append(record.pending[:, :need])
                    record.pending = record.pending[:, need:]
                    record.in_flight = True
                index = [r.slot for r in batch]
                batches.append(_Batch(context, steady, slots, index, batch, chunks))
        return batches

    def _upload(self, values: list[int]) -> Tensor:
        """Integers as a tensor on the model's device."""
        return torch.tensor(values, pin_memory=self._pin).to(self.model.device, non_blocking=True)

    def _try_batch(self, batch: _Batch) -> tuple[list[Hypothesis], list[int]] | Exception:
        """`_compute_batch`'s result, or the error that stopped it."""
        try:
            return self._compute_batch(batch)
        except Exception as e:  # reported to this batch's streams only, by `step`
            return e

    def _compute_batch(self, batch: _Batch) -> tuple[list[Hypothesis], list[int]]:
        """One batched step of streams sharing a context: their new labels and the
        encoder frames each has decoded. Their new states are written to their slots."""
        chunks = batch.chunks
        mel = torch.zeros(
            len(chunks), chunks[0].shape[0], max(c.shape[1] for c in chunks), pin_memory=self._pin
        )
        for b, chunk in enumerate(chunks):
            mel[b, :, : chunk.shape[1]] = chunk  # (B, F, T), zero padded
        # Streams that started together hold consecutive slots: their rows are read as
        # views (a step never writes to its input states), not gathered into a copy.
        first, rows = batch.index[0], len(batch.index)
        if batch.index == list(range(first, first + rows)):
            at: Tensor | slice = slice(first, first + rows)
        else:
            at = self._upload(batch.index)
        prompts = None
        if batch.records[0].prompt is not None:
            prompts = self._upload([r.prompt for r in batch.records])
        slots = batch.slots
        hyps, encoder_cache, decoder_state = step_streams(
            self.model.net,
            mel.to(self.model.device, non_blocking=True),
            self._upload([c.shape[1] for c in chunks]),
            prompts,
            select_state(slots.encoder, at),
            select_state(slots.decoder, at),
            batch.context,
            self._graphs.step if batch.steady else None,
        )
        write_state_(slots.encoder, at, encoder_cache)
        write_state_(slots.decoder, at, decoder_state)
        return hyps, decoder_state.frames.tolist()

    def _scatter(self, record: _Record, hyp: Hypothesis, decoded: int, consumed: int) -> None:
        """Take a step's result for a stream that advanced by `consumed` mel frames."""
        record.in_flight = False
        if record.closed:
            return
        record.first_chunk = False
        full = self.model.net.encoder.mel_cache_frames
        record.mel_cached = min(record.mel_cached + consumed, full)
        record.decoded_frames = decoded
        first_new = len(record.token_ids)
        record.token_ids += hyp.token_ids
        record.frames += hyp.frames
        record.scores += hyp.scores
        self._endpoint(record, first_new)
        if record.ending and record.pending.shape[1] == 0:
            self._complete(record)

    def _endpoint(self, record: _Record, first_new: int) -> None:
        """Cut final segments out of the new tokens, then report the open one."""
        tokens = record.token_ids
        cuts = segment_cuts(
            record.endpointing,
            self._lexicon.frame_ms,
            tokens,
            record.frames,
            self._lexicon.starts_word,
            record.open_start,
            first_new,
        )
        for cut in cuts:
            self._finalize(record, cut)
        if record.open_start < len(tokens) and trailing_silence_ends(
            record.endpointing,
            self._lexicon.frame_ms,
            record.frames[-1],
            record.decoded_frames,
            record.vad_state,
        ):
            self._finalize(record, len(tokens))
        if record.open_start < len(tokens) and len(tokens) > first_new:
            self._push(record, self._segment(record, record.open_start, len(tokens), False))

    def _finalize(self, record: _Record, end: int) -> None:
        """Make tokens [open_start, end) a final segment."""
        segment = self._segment(record, record.open_start, end, is_final=True)
        record.finals.append(segment)
        record.final_spans.append((record.open_start, end))
        record.final_languages.append(segment.language)
        record.open_start = end
        if record.prompt is not None and segment.language is not None:
            record.language_seen = segment.language
        self._push(record, segment)

    def _segment(self, record: _Record, start: int, end: int, is_final: bool) -> Segment:
        ids = record.token_ids[start:end]
        language = None
        if record.prompt is not None:
            language = canonical_locale(record.prompt, self.model.config.prompt)
            if language is None:  # auto: the model's own tags, else the last one it used
                language = self._lexicon.last_language(ids) or record.language_seen
        return self._lexicon.segment(
            index=len(record.finals),
            token_ids=ids,
            frames=record.frames[start:end],
            scores=record.scores[start:end],
            language=language,
            is_final=is_final,
            duration=record.mel_state.samples_seen / self.model.config.mel.sample_rate,
        )

    def _fail(self, record: _Record, error: Exception) -> None:
        """A stream whose step raised: its chunk is consumed and its states may be half
        written, so it cannot go on; its slot goes back (rows are rewritten when reused)."""
        record.in_flight = False
        record.error = error
        self._release(record)
        self._wake(record)

    def _complete(self, record: _Record) -> None:
        if record.open_start < len(record.token_ids):
            self._finalize(record, len(record.token_ids))
        record.done = True
        self._release(record)
        self._wake(record)

    def _push(self, record: _Record, segment: Segment) -> None:
        events = record.events
        if events and not events[-1].is_final and events[-1].index == segment.index:
            events.pop()  # a newer hypothesis of the same open segment replaces it
        events.append(segment)
        self._wake(record)

    def _wake(self, record: _Record) -> None:
        for loop, future in record.waiters:
            loop.call_soon_threadsafe(_resolve, future)
        record.waiters.clear()
        self._changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._changed.wait_for(
                    lambda: self._stopping or any(map(self._ready, self._streams.values()))
                )
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException:  # step() kept it for every caller to see
                return

    def _iterate(self, stream: StreamHandle | int) -> Iterator[Segment]:
        record = self._record(stream)
        while True:
            with self._lock:
                self._changed.wait_for(
                    lambda: (
                        record.events
                        or record.done
                        or record.closed
                        or record.error is not None
                        or self._error is not None
                        or self._worker is None
                    )
                )
                if record.events:
                    event = record.events.popleft()
                elif record.done or record.closed:
                    return
                else:
                    self._raise_if_failed(record)
                    raise EngineError("iterating a stream's events needs the worker: start()")
            yield event


class _AsyncEvents:
    """`async for event in handle`: waits on the event loop, never blocks it."""

    def __init__(self, engine: Engine, record: _Record) -> None:
        self._engine = engine
        self._record = record

    def __aiter__(self) -> _AsyncEvents:
        return self

    async def __anext__(self) -> Segment:
        engine, record = self._engine, self._record
        loop = asyncio.get_running_loop()
        while True:
            with engine._lock:
                if record.events:
                    return record.events.popleft()
                if record.done or record.closed:
                    raise StopAsyncIteration
                engine._raise_if_failed(record)
                if engine._worker is None:
                    raise EngineError("iterating a stream's events needs the worker: start()")
                future = loop.create_future()
                record.waiters.append((loop, future))
            await future


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)

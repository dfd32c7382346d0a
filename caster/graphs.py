"""Fixed-shape encoder steps for many streams: power-of-two batch buckets, CUDA graphs on CUDA.

A GPU step of a few hundred streams launches thousands of small kernels; replaying
them as one captured CUDA graph removes the launch cost, but a graph has fixed
shapes and cannot synchronise with the host. `EncoderGraphs` therefore runs only
steady steps (`ConformerEncoder.step(..., steady=True)`: every stream's mel cache
full, so no host-side grouping) at fixed sizes: a batch of B streams runs in the
bucket of the next power of two rows, with T fixed at a whole chunk. Its inputs
are copied into the bucket's static buffers; rows past B get length 0 and rows
shorter than T (a stream's final chunk) are masked as in any step, so padding
never reaches a real row. Each (context, bucket) is captured once, on first use;
greedy decoding stays eager.

With `capture=False` the same padded buffers are stepped eagerly: that is how the
CPU tests check the padding, and nothing else differs from the captured path
except the warm-up, capture and replay in `_Bucket._capture` and `_Bucket.run`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caster.encoder import ConformerEncoder, EncoderCache
from caster.state import select_state, write_state_


def bucket_size(rows: int) -> int:
    """The power of two a batch of `rows` streams is padded to."""
    if rows < 1:
        raise ValueError(f"a batch has at least one row, not {rows}")
    return 1 << (rows - 1).bit_length()


class _Bucket:
    """Static inputs and outputs of the steady step of `rows` streams at one context."""

    def __init__(
        self,
        encoder: ConformerEncoder,
        context: tuple[int, int],
        rows: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        self.encoder, self.context = encoder, context
        frames = encoder.chunk_frames(context, first=False)
        self.chunk = torch.zeros(rows, encoder.cfg.feat_in, frames, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.cache = encoder.initial_cache(rows, context, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture(device)

    def _step(self) -> tuple[Tensor, Tensor, EncoderCache]:
        return self.encoder.step(self.chunk, self.lengths, self.cache, self.context, steady=True)

    def _capture(self, device: torch.device) -> None:
        # Warm up on a side stream first, as PyTorch's CUDA graph notes ask: lazy
        # initialisation (cuBLAS handles, kernel choice) must not happen in the capture.
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (feeding, opening streams) may use CUDA meanwhile.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self._step()

    def load(self, chunk: Tensor, lengths: Tensor, cache: EncoderCache) -> None:
        """Copy a batch of at most `rows` streams into the static inputs (the rest: length 0)."""
        rows, frames = chunk.shape[0], chunk.shape[2]
        self.chunk.zero_()
        self.chunk[:rows, :, :frames] = chunk
        self.lengths.zero_()
        self.lengths[:rows] = lengths
        write_state_(self.cache, slice(0, rows), cache)

    def run(self) -> tuple[Tensor, Tensor, EncoderCache]:
        """Step the loaded inputs; the outputs stay valid until the next `run`."""
        if self.graph is None:
            return self._step()
        with torch.cuda.device(self.chunk.device):
            self.graph.replay()
        return self.outputs


class EncoderGraphs:
    """Steady encoder steps in power-of-two buckets; captured as CUDA graphs when `capture`.

    Not thread-safe: one caller at a time (the engine's compute lock).
    """

    def __init__(self, encoder: ConformerEncoder, capture: bool) -> None:
        self.encoder = encoder
        self.capture = capture
        self._buckets: dict[tuple[tuple[int, int], int], _Bucket] = {}

    @property
    def buckets(self) -> list[tuple[tuple[int, int], int]]:
        """The (context, rows) buckets made so far."""
        return list(self._buckets)

    def step(
        self, chunk: Tensor, lengths: Tensor, cache: EncoderCache, context: tuple[int, int]
    ) -> tuple[Tensor, Tensor, EncoderCache]:
        """`encoder.step(chunk, lengths, cache, context, steady=True)` at a padded size.

        The caller guarantees what `steady` needs (every cache full) and chunks of
        at most `chunk_frames(context, first=False)` frames. The results are views
        of the bucket's static outputs, valid until the next call: copy what must
        live longer.
        """
        rows = chunk.shape[0]
        key = (context, bucket_size(rows))
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.encoder, context, key[1], chunk.device, self.capture)
            self._buckets[key] = bucket
        bucket.load(chunk, lengths, cache)
        x, x_len, new_cache = bucket.run()
        return x[:rows], x_len[:rows], select_state(new_cache, slice(0, rows))

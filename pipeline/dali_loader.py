"""The DALI multi-crop loader: one graph built once per run, fed by index, overlapped with the step.

Per step a producer thread (the trainer only takes finished batches from a queue of `prefetch`):
  1. takes this rank's B dataset indices for (epoch, step) from sharding.py and reads their bytes itself
     (a read error, a file over MAX_IMAGE_PIXELS or a JPEG without its end marker is named at once);
  2. draws every random choice on the host from (seed, epoch, global sample position) (draws.py);
  3. runs the one DALI graph (dali_graph.py: decode once; on the GPU one resize per crop, on the CPU the
     same windows are cut in torch, dali_batch.py);
  4. applies the weak/strong recipes as batched torch ops (recipes.py), on its own CUDA stream on a GPU.
So an epoch boundary or a resume builds nothing: resume is a position (loader_base.py), and a sample's
crops depend only on (seed, epoch, position), not on the rank layout. With `skip_unreadable`, an image
that cannot be read or decoded is replaced by the next readable one of the index (logged); every other
sample, and the order, stay as they were.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import io
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.errors import DataError, UndecodableBatch, UnreadableImage
from .augment_config import AugmentConfig
from .batch import MultiCropBatch
from .dali_batch import debug_windows, make_batch, recipe_crops, run_graph
from .draws import draw_batch
from .files import MAX_IMAGE_PIXELS, FileIndex
from .loader_base import MultiCropLoader, unreadable_advice

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

# check_image reasons that also stop DALI's decoder (it converts CMYK, palette and RGBA images and
# decodes by content, so "cmyk", "mode" and "format_mismatch" files are read fine)
_UNDECODABLE = frozenset({"non_image", "unreadable", "corrupt", "truncated"})


def read_image_bytes(path: str) -> tuple[np.ndarray, int, int]:
    """(bytes, height, width) of an image file, checked before DALI sees it: readable, a format PIL can
    identify from its header, at most MAX_IMAGE_PIXELS pixels, and a JPEG with its end-of-image marker."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImage(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise UnreadableImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise UnreadableImage(f"more than {MAX_IMAGE_PIXELS} pixels") from None
    except Exception as e:  # PIL raises many types for bad headers
        raise UnreadableImage(f"not an image PIL can identify ({type(e).__name__})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f"{w}x{h} is more than {MAX_IMAGE_PIXELS} pixels")
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise UnreadableImage("truncated: no JPEG end-of-image marker")
    return np.frombuffer(data, dtype=np.uint8), h, w


_LIVE: weakref.WeakSet[DaliLoader] = weakref.WeakSet()  # loaders whose producer may run: stopped at exit


@atexit.register
def _stop_all() -> None:
    for loader in list(_LIVE):
        loader.close()
        loader._pipe = None


class DaliLoader(MultiCropLoader):
    backend = "dali"

    def __init__(
        self,
        index: FileIndex,
        aug: AugmentConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: Any = "cpu",
        num_threads: int = 4,
        dtype: torch.dtype = torch.float32,
        device_id: int | None = None,
        prefetch: int = 2,
        debug: bool = False,
        skip_unreadable: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        super().__init__(index, aug, batch_size, rank, world_size, seed, device, dtype)
        self.num_threads, self.prefetch, self.debug = max(1, num_threads), max(1, prefetch), debug
        self.skip_unreadable = skip_unreadable
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        if self.device.type == "cuda":
            self.device_id: int | None = (
                device_id
                if device_id is not None
                else (self.device.index if self.device.index is not None else torch.cuda.current_device())
            )
            self.device = torch.device("cuda", self.device_id)
        else:
            self.device_id = None
        self.num_global = 2 if aug.vanilla_weak_augmentation else 4
        self.builds = 0  # DALI pipeline builds (1 per run; another only after a decode failure when skipping)
        self.replaced: dict[int, int] = {}  # unreadable dataset index -> the one read in its place
        self._bad: dict[int, str] = {}
        self._pipe: Pipeline | None = None  # built below; None again at exit (_stop_all)
        self._stream: torch.cuda.Stream | None = None  # the producer's, on a GPU
        self._orders: dict[int, np.ndarray] = {}
        self._producer: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._head: tuple[int, int] = (-1, -1)  # (epoch, step) of the next batch in the queue
        self._spent: collections.deque = collections.deque()  # batches handed out (CPU), freed by the producer
        self._build()
        _LIVE.add(self)

    # -- the graph, built once -----------------------------------------------------------------------
    def _build(self) -> None:
        from .dali_graph import multicrop_graph

        gpu = self.device.type == "cuda"
        aug = self.aug
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sides = [aug.global_size] * self.num_global + [aug.local_size] * aug.local_crops_number
            sides = sides if gpu else []  # CPU: decode only, crops cut in torch (dali_batch.py)
            pipe = multicrop_graph(
                sides,
                "mixed" if gpu else "cpu",
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=self.device_id,
                prefetch_queue_depth=1,
                seed=0,
            )  # the graph draws nothing: every random choice is an input
            pipe.build()
        self._pipe = pipe
        self.builds += 1
        if gpu and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)

    # -- iteration: a producer thread, a bounded queue ------------------------------------------------
    def _iterate(self, epoch: int, start: int, extra: Any) -> Iterator[MultiCropBatch]:
        """Batches (epoch, start) ... (epoch, len - 1) from the producer. The producer runs on past the end of
        the epoch into the next one (as far as the queue allows), so the first batch of epoch + 1 is ready
        when the trainer asks for it; one started elsewhere (a seek) is stopped and a new one started."""
        if start >= len(self):
            return
        if self._producer is None or self._head != (epoch, start):
            self.close()
            self._start_producer(epoch, start)
        q = self._queue
        assert q is not None  # set with the producer (_start_producer), never unset
        for step in range(start, len(self)):
            kind, item = q.get()
            if kind == "error":
                self.close()
                raise item
            self._head = (epoch, step + 1) if step + 1 < len(self) else (epoch + 1, 0)
            batch = self._handoff(item)
            if self.device.type == "cpu":  # freeing a batch (~225 MB at 64 x 14 crops) takes tens of ms:
                self._spent.append(batch)  # the producer drops it once the trainer has (see _produce)
            del item
            yield batch
            del batch

    def _start_producer(self, epoch: int, start: int) -> None:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            """False once the loader is closed (the item is dropped)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            if self.device.type == "cpu":  # this thread's torch ops (OpenMP's setting is per thread): DALI
                torch.set_num_threads(1)  # has its own threads, and the trainer keeps the others
            e, step = epoch, start
            try:
                while put(("batch", self._produce(e, step))):
                    e, step = (e, step + 1) if step + 1 < len(self) else (e + 1, 0)
            except BaseException as err:  # handed to the consumer, raised there
                put(("error", err))

        self._queue, self._stop, self._head = q, stop, (epoch, start)
        self._producer = threading.Thread(target=produce, name=f"mugs-loader-rank{self.rank}", daemon=True)
        self._producer.start()

    def close(self) -> None:
        """Stop the producer (a seek elsewhere, an error, or the end of the run)."""
        self._stop.set()
        t, self._producer = self._producer, None
        if t is not None and t is not threading.current_thread():
            t.join()

    def _handoff(self, item) -> MultiCropBatch:
        batch, event = item
        if event is not None:  # the step's stream waits for the producer's work; memory stays valid for it
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(event)
            for t in set(batch.teacher + batch.student):
                t.record_stream(cur)
            batch.weak_flags.record_stream(cur)
        return batch

    # -- one batch ------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.rank_order(epoch)}
        return self._orders[epoch]

    def _read(self, idx: int, epoch: int, pos: int) -> tuple[np.ndarray, int, int, int]:
        """Bytes and size of dataset image `idx`, or with skip_unreadable of the one read in its place."""
        n = len(self.index)
        for k in range(n):
            j = (idx + k) % n
            if j not in self._bad:
                try:
                    data, h, w = read_image_bytes(self.index.paths[j])
                except UnreadableImage as e:
                    self._bad[j] = str(e)
                else:
                    if k:
                        self._note_replacement(idx, j, epoch, pos)
                    return data, h, w, j
            if not self.skip_unreadable:
                raise DataError(self._unreadable_message([j], epoch, pos))
        raise DataError(f"no readable image in {self.index.source} (rank {self.rank})")

    def _note_replacement(self, idx: int, j: int, epoch: int, pos: int) -> None:
        if self.replaced.get(idx) != j:
            self.replaced[idx] = j
            self.log(
                f"mugs: rank {self.rank}: skipped unreadable {self.index.paths[idx]} ({self._bad[idx]}); "
                f"read {self.index.paths[j]} in its place (epoch {epoch}, sample {pos}; --skip_unreadable)"
            )

    def _unreadable_message(self, idxs: list[int], epoch: int, pos: int) -> str:
        what = "; ".join(f"{self.index.paths[i]} ({self._bad[i]})" for i in idxs)
        return (
            f"DALI could not decode an image at sample {pos} of epoch {epoch} (rank {self.rank}): {what}. "
            + unreadable_advice(self.index.source)
        )

    def _produce(self, epoch: int, step: int):
        while len(self._spent) > 2:  # batches the trainer has moved past: their memory is freed here
            self._spent.popleft()
        B, W = self.batch_size, self.world_size
        order = self._order(epoch)
        local = np.arange(step * B, (step + 1) * B)
        positions = local * W + self.rank  # global positions in the epoch's permutation (layout-free)
        while True:
            samples = [self._read(int(order[p]), epoch, int(g)) for p, g in zip(local, positions)]
            try:
                return self._assemble(samples, epoch, positions)
            except UndecodableBatch as e:
                bad = self._find_undecodable([s[3] for s in samples])
                if not bad:
                    raise DataError(
                        f"DALI could not decode an image at step {step} of epoch {epoch} (rank {self.rank}): one of "
                        f"{self.index.paths[samples[0][3]]} ... ({B} files; the scan check finds nothing wrong with "
                        f"them). DALI said: {e}"
                    ) from None
                if not self.skip_unreadable:
                    raise DataError(self._unreadable_message(bad, epoch, int(positions[0]))) from None
                self._build()  # DALI's pipeline is not usable after a failed run: the next try needs a new one

    def _find_undecodable(self, idxs: list[int]) -> list[int]:
        from .scan import check_image

        bad = []
        for i in idxs:
            reason, detail = check_image(self.index.paths[i], min_size=1, keep_grayscale=True)
            if reason in _UNDECODABLE:
                self._bad[i] = f"{reason}: {detail}"
                bad.append(i)
        return bad

    def _assemble(self, samples, epoch: int, positions: np.ndarray):
        """The batch of `samples` (bytes, height, width, dataset index) at global `positions` of `epoch`, and
        on the GPU the event its tensors are ready at (on the producer's stream)."""
        aug, gpu = self.aug, self.device.type == "cuda"
        heights = np.array([s[1] for s in samples], dtype=np.int64)
        widths = np.array([s[2] for s in samples], dtype=np.int64)
        d = draw_batch(aug, self.seed, epoch, positions, heights, widths)
        outs = run_graph(self._pipe, samples, d, gpu)
        stream = self._stream
        with torch.cuda.stream(stream) if gpu else contextlib.nullcontext():
            crops = recipe_crops(outs, d, aug, self.device, stream, self.dtype)
            weak = torch.as_tensor(d.weak).to(self.device, non_blocking=True)
            event = None
            if gpu:
                event = torch.cuda.Event()
                event.record(stream)
        debug = debug_windows(d, aug, heights, widths) if self.debug else None
        return make_batch(crops, weak, aug, [s[3] for s in samples], self.index, debug), event

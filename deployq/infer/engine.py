"""An onnxruntime session over a packed-raw image model, run on whole frames or blended tiles.

A model exported with ``--dynamic-hw`` takes a whole frame in one call (padded to the multiple its
down-sampling needs), so there are no seams. A fixed-size model, or a frame too large for one call,
is cut into tiles that overlap by ``overlap`` packed pixels; each tile's output is weighted by a
window that ramps up from its edges, and the weighted outputs are summed and normalised, so seams
vanish and memory stays bounded by one batch of tiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnxruntime as ort

from deployq.core.runtime import ORT_ERRORS, is_ort_format, load_onnx, ort_format_session, ort_message, session


class RunError(ValueError):
    """Inputs or a model that ``deployq run`` cannot use; the message names the file."""


WHOLE_FRAME_PIXELS = 2048 * 2048  # packed pixels a dynamic model takes in one call before tiling
DEFAULT_TILE = 1024  # tile side (packed pixels) for dynamic models, when a frame is larger
MULTIPLES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Engine:
    """An onnxruntime session for a packed-raw model (N, 4, H, W) with a dynamic batch.

    `tile` is the model's fixed (h, w), or None when height and width are dynamic; then `multiple`
    is what every side must be a multiple of (the model's down-sampling)."""

    session: ort.InferenceSession
    input_name: str
    tile: Optional[tuple[int, int]]  # (h, w) of a fixed-size model input, packed pixels
    scale: int  # output pixels per packed pixel
    channels: int  # output channels
    multiple: int = 1
    path: str = "the model"
    fixed_batch: Optional[int] = None  # the model's batch size, when its batch dimension is fixed

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.fixed_batch is not None and len(batch) != self.fixed_batch:  # e.g. an export with batch 1
            return np.concatenate([self.run(batch[i:i + self.fixed_batch]) for i in range(0, len(batch), self.fixed_batch)])
        try:
            return self.session.run(None, {self.input_name: batch})[0]
        except ORT_ERRORS as err:
            raise RunError(f"onnxruntime could not run {self.path} on a ({', '.join(map(str, batch.shape))}) "
                           f"input: {ort_message(err)}") from None


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # a probe that fails is an answer, not an error for the log


def _probe(sess: ort.InferenceSession, name: str, h: int, w: int) -> Optional[np.ndarray]:
    try:
        return sess.run(None, {name: np.zeros((1, 4, h, w), np.float32)}, _QUIET)[0]
    except ORT_ERRORS:  # a size the model refuses
        return None


def load_engine(model_path: str, threads: Optional[int] = None) -> Engine:
    """An engine for an ONNX file, or an ORT-format file (``.ort``, what ORT Mobile loads)."""
    if is_ort_format(model_path):
        sess = ort_format_session(model_path, threads=threads or 0)
    else:
        sess = session(load_onnx(model_path, runtime=False), optimize=True, threads=threads or 0, label=model_path)
    inputs = sess.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 4:
        shapes = [tuple(i.shape) for i in inputs]
        raise RunError(f"{model_path}: deployq run feeds packed raw (N, 4, H, W); the model takes {shapes}")
    dims = [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape]
    dynamic = None in dims[2:]
    fixed_batch = dims[0]
    if fixed_batch is not None and fixed_batch != 1:
        raise RunError(f"{model_path}: its batch dimension is fixed at {fixed_batch}; deployq run needs 1 or a dynamic batch")
    multiple = 1
    if dynamic:  # the smallest power-of-two multiple the model's down-sampling accepts
        multiple = next((m for m in MULTIPLES if _probe(sess, inputs[0].name, 128 + m, 128 + m) is not None), 0)
        h = w = 128 + multiple
        if not multiple:
            raise RunError(f"{model_path}: its input height and width are dynamic, but it runs on no size "
                           f"128 + m (m in {MULTIPLES})")
    else:
        _, _, h, w = dims
    probe = _probe(sess, inputs[0].name, h, w)
    if probe is None or probe.ndim != 4 or probe.shape[2] % h or probe.shape[3] % w or probe.shape[2] // h != probe.shape[3] // w:
        found = "an error" if probe is None else str(probe.shape)
        raise RunError(f"{model_path}: its first output ({found}) is not an image scaled from the input {(h, w)}")
    return Engine(sess, inputs[0].name, None if dynamic else (h, w), probe.shape[2] // h, probe.shape[1], multiple,
                  model_path, fixed_batch)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def positions(size: int, tile: int, step: int) -> list[int]:
    """Tile origins covering [0, size): every `step`, plus one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def window(height: int, width: int, ramp: int) -> np.ndarray:
    """A separable weight that rises linearly over `ramp` pixels from each edge (never zero)."""

    def profile(n: int) -> np.ndarray:
        if ramp <= 0:
            return np.ones(n, np.float32)
        i = np.arange(n, dtype=np.float32)
        return np.minimum(1.0, (np.minimum(i, n - 1 - i) + 1) / (ramp + 1))

    return np.outer(profile(height), profile(width)).astype(np.float32)


def infer(engine: Engine, packed: np.ndarray, tile: Optional[int] = None, overlap: Optional[int] = None,
          batch: int = 4) -> np.ndarray:
    """The model's output for a whole (4, H, W) packed frame.

    A model with dynamic height and width takes the frame in one call (padded to its size
    multiple) unless `tile` is given or the frame exceeds WHOLE_FRAME_PIXELS; a fixed-size model,
    or a tiled run, goes tile by tile (:func:`infer_tiled`)."""
    if engine.tile is not None:
        if tile is not None and (tile, tile) != engine.tile:
            raise RunError(f"--tile {tile}: the model's input size is fixed at {engine.tile[0]}x{engine.tile[1]}")
        return infer_tiled(engine, packed, engine.tile, overlap, batch)
    _, height, width = packed.shape
    if tile is None and height * width <= WHOLE_FRAME_PIXELS:
        ph, pw = _round_up(height, engine.multiple), _round_up(width, engine.multiple)
        padded = _pad_to(packed, ph, pw)
        return engine.run(padded[None].astype(np.float32))[0][:, : height * engine.scale, : width * engine.scale]
    side = _round_up(tile or DEFAULT_TILE, engine.multiple)
    return infer_tiled(engine, packed, (side, side), overlap, batch)


def _pad_to(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """`packed` extended to (height, width) by reflection (edge copies for a 1-pixel frame)."""
    _, h, w = packed.shape
    pad_h, pad_w = max(0, height - h), max(0, width - w)
    if not (pad_h or pad_w):
        return packed
    if min(h, w) > 1 and pad_h < h and pad_w < w:
        return np.pad(packed, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    return np.pad(packed, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")


def infer_tiled(engine: Engine, packed: np.ndarray, tile: tuple[int, int], overlap: Optional[int] = None,
                batch: int = 4) -> np.ndarray:
    """The model's output for a (4, H, W) packed frame, tile by tile, blending overlaps. `overlap`
    defaults to a quarter of the tile, at most 16 packed pixels (32 for tiles of 512 and more)."""
    th, tw = tile
    if overlap is None:
        overlap = min(32 if min(th, tw) >= 512 else 16, min(th, tw) // 4)
    if overlap < 0 or overlap >= min(th, tw):
        raise RunError(f"--overlap must be from 0 to {min(th, tw) - 1} packed pixels, got {overlap}")
    _, height, width = packed.shape
    packed = _pad_to(packed, max(th, height), max(tw, width))
    _, ph, pw = packed.shape
    s = engine.scale
    out = np.zeros((engine.channels, ph * s, pw * s), np.float32)
    weight = np.zeros((ph * s, pw * s), np.float32)
    w_tile = window(th * s, tw * s, overlap * s)
    origins = [(y, x) for y in positions(ph, th, th - overlap) for x in positions(pw, tw, tw - overlap)]
    for start in range(0, len(origins), batch):
        chunk = origins[start:start + batch]
        result = engine.run(np.stack([packed[:, y:y + th, x:x + tw] for y, x in chunk]).astype(np.float32))
        for (y, x), tile_out in zip(chunk, result):
            out[:, y * s:(y + th) * s, x * s:(x + tw) * s] += tile_out * w_tile
            weight[y * s:(y + th) * s, x * s:(x + tw) * s] += w_tile
    out /= weight
    return out[:, : height * s, : width * s]


@dataclass
class Bench:
    tiles_per_call: int
    size: tuple[int, int] = (0, 0)  # (h, w) of each timed input, packed pixels
    latencies_ms: list[float] = field(default_factory=list)

    def percentiles(self) -> dict[str, float]:
        a = np.asarray(self.latencies_ms)
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


BENCH_SIZE = 256  # packed input side that a dynamic-size model is timed at


def bench(engine: Engine, runs: int, batch: int = 1, warmup: int = 3) -> Bench:
    """Latency of `runs` calls on one batch of tiles (after `warmup` calls); a dynamic-size model
    is timed on BENCH_SIZE x BENCH_SIZE packed inputs."""
    th, tw = engine.tile or (_round_up(BENCH_SIZE, engine.multiple),) * 2
    x = np.random.default_rng(0).uniform(0, 1, (batch, 4, th, tw)).astype(np.float32)
    for _ in range(warmup):
        engine.run(x)
    result = Bench(batch, (th, tw))
    for _ in range(runs):
        start = time.perf_counter()
        engine.run(x)
        result.latencies_ms.append(1000 * (time.perf_counter() - start))
    return result


"""Loading images and videos into RGB PIL images.

Everything a user can get wrong here (a missing file, a text file named `.png`, a truncated download, a
decompression bomb, an empty frame folder) becomes a `MediaError` naming the file and the problem; no PIL,
PyAV or numpy exception escapes. Images are converted exactly like `PIL.Image.open(p).convert("RGB")` so
pixel values match the reference implementation bit for bit. Videos are decoded with PyAV, and frames are
picked with the reference rule `round(linspace(0, N - 1, num_frames))` over the frames that actually decode.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from nvila.base.errors import MediaError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"})
# Same number as PIL's hard limit (2 * Image.MAX_IMAGE_PIXELS): anything larger is treated as a bomb.
DEFAULT_MAX_PIXELS: int = 178_956_970
# A video is refused when fewer than 1/4 of the frames its container declares decode (mostly missing).
MIN_DECODED_FRACTION_DENOMINATOR = 4

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BYTES_NAME = "<bytes>"


def _accepted() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))


def media_kind(path: str | os.PathLike) -> Literal["image", "video"]:
    """Classify a path as "image" or "video": a directory is a frame folder (video), otherwise the extension decides."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise MediaError(f"Media file {name!r} does not exist.")
    if os.path.isdir(name):
        return "video"
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    raise MediaError(
        f"Media file {name!r} has an unsupported extension {ext or '(none)'!r}; accepted extensions: {_accepted()} "
        "(or a folder of frame images)."
    )


def media_part(path: str | os.PathLike) -> dict[str, Any]:
    """The message content part for a media path: ``{"type": kind, kind: path}``, kind by :func:`media_kind`."""
    kind = media_kind(path)
    return {"type": kind, kind: os.fspath(path)}


def _check_dims(width: int, height: int, name: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{name!r} has a zero width or height ({width}x{height}).")
    if width * height > max_pixels:
        raise MediaError(
            f"{name!r} is {width}x{height} = {width * height} pixels, which exceeds the limit of {max_pixels} pixels "
            "(possible decompression bomb); shrink it or raise max_pixels."
        )


def _check_max_pixels(max_pixels: int) -> None:
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise MediaError(f"max_pixels must be a positive integer, got {max_pixels!r}.")


def _png_zero_size(head: bytes) -> tuple[int, int] | None:
    """Return (width, height) when `head` is a PNG whose IHDR declares a zero dimension, else None.

    PIL refuses such files as "cannot identify image", which would hide the real problem from the user.
    """
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return (width, height) if width == 0 or height == 0 else None


def _decode_open_file(fh: io.BufferedIOBase, name: str, max_pixels: int) -> Image.Image:
    """Open, size-check and convert an image from an open binary file object that the caller closes."""
    # Our own max_pixels check below is the policy; PIL's warning (at half its hard limit) would only leak a
    # RuntimeWarning to the user, so it is silenced for this call only (the global PIL limits stay untouched).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fh)
        except UnidentifiedImageError as e:
            fh.seek(0)
            zero = _png_zero_size(fh.read(24))
            if zero is not None:
                raise MediaError(f"{name!r} has a zero width or height ({zero[0]}x{zero[1]}).") from e
            raise MediaError(f"{name!r} is not a recognised image file (unknown or unsupported format).") from e
        except Image.DecompressionBombError as e:
            raise MediaError(f"{name!r} is too large to decode safely (possible decompression bomb): {e}") from e
        except Exception as e:  # PIL plugins raise assorted types (struct.error, EOFError, ...) on garbage headers
            raise MediaError(f"{name!r} could not be opened as an image: {e}") from e
        with im:
            _check_dims(im.width, im.height, name, max_pixels)
            try:
                # convert() loads the current frame, which right after open() is the first one of an animation.
                return im.convert("RGB")
            except Exception as e:  # truncated data raises OSError, corrupt streams zlib/struct/SyntaxError
                raise MediaError(f"{name!r} is truncated or corrupt and could not be decoded: {e}") from e


def load_image(
    source: str | os.PathLike | bytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Load an image as a fully decoded RGB PIL image, exactly like `PIL.Image.open(p).convert("RGB")`.

    `source` is a path, the encoded bytes of an image file, or a PIL image (converted, never mutated; its
    current frame is used). Alpha is dropped without compositing, palettes are expanded, grayscale is
    replicated; EXIF orientation is NOT applied (the reference does not either). Animated files give their
    first frame. Raises MediaError for missing/unreadable files, non-images, truncated or corrupt data, a zero
    dimension, or width*height > max_pixels (checked from the header, before pixels are decoded).
    """
    _check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        _check_dims(source.width, source.height, "<PIL image>", max_pixels)
        try:
            return source.convert("RGB")
        except Exception as e:
            raise MediaError(f"The given PIL image could not be decoded: {e}") from e
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError("The image bytes are empty.")
        return _decode_open_file(io.BytesIO(bytes(source)), _BYTES_NAME, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image expects a path, bytes or a PIL image, got {type(source).__name__}.")
    name = os.fspath(source)
    if not os.path.exists(name):
        raise MediaError(f"Image file {name!r} does not exist.")
    if os.path.isdir(name):
        raise MediaError(f"Image path {name!r} is a directory, not an image file.")
    try:
        fh = open(name, "rb")
    except OSError as e:
        raise MediaError(f"Image file {name!r} cannot be read: {e}") from e
    # We own the handle (rather than letting PIL open the path) so it is closed on every error path too.
    with fh:
        return _decode_open_file(fh, name, max_pixels)


def sample_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """Reference frame choice: `round(linspace(0, num_total - 1, num_frames))`; duplicates are kept."""
    if num_total < 1:
        raise MediaError(f"Cannot sample frames from a video with {num_total} frames.")
    if num_frames < 1:
        raise MediaError(f"The number of frames to sample must be at least 1, got {num_frames}.")
    return [int(i) for i in np.round(np.linspace(0, num_total - 1, num_frames)).astype(int)]


def fps_frame_indices(num_total: int, native_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """Sample at `fps` frames per second over the whole clip (duration = num_total / native_fps).

    Timestamps are k / fps for k = 0, 1, ... while below the duration; each maps to the nearest frame. When
    that gives more than `max_frames` frames, fall back to `max_frames` uniformly spread frames over the whole
    clip (never just its beginning). Always returns at least one index.
    """
    if num_total < 1:
        raise MediaError(f"Cannot sample frames from a video with {num_total} frames.")
    if not native_fps > 0 or not math.isfinite(native_fps):
        raise MediaError(f"The video frame rate must be positive, got {native_fps}.")
    if not fps > 0 or not math.isfinite(fps):
        raise MediaError(f"The sampling rate fps must be positive, got {fps}.")
    if max_frames is not None and max_frames < 1:
        raise MediaError(f"max_frames must be at least 1, got {max_frames}.")
    # k / fps < num_total / native_fps, rearranged to avoid dividing twice; the ceil is only a starting guess
    # that is then corrected against the exact comparison, so float rounding cannot add or drop a timestamp.
    count = max(1, math.ceil(num_total * fps / native_fps))
    while count > 1 and (count - 1) * native_fps >= num_total * fps:
        count -= 1
    while count * native_fps < num_total * fps:
        count += 1
    if max_frames is not None and count > max_frames:
        return sample_frame_indices(num_total, max_frames)
    return [min(num_total - 1, int(round(k / fps * native_fps))) for k in range(count)]


@dataclass(frozen=True)
class Video:
    """Frames sampled from a video file or a frame folder."""

    frames: list[Image.Image]  # RGB, one per entry of `indices` (a repeated index gives a copy of that frame)
    indices: list[int]  # positions of the frames among all decodable frames, non-decreasing
    num_total_frames: int  # the number of frames that actually decode (or image files in the folder)
    native_fps: float | None  # None for a frame folder or a stream without rate information
    source: str  # the path, or "<bytes>"
    duration: float | None = None  # seconds: container metadata, else frames / rate; None when unknown


def _choose_indices(
    num_total: int, native_fps: float | None, num_frames: int, fps: float | None, max_frames: int | None
) -> list[int]:
    # Without a known frame rate (frame folders) fps sampling is impossible; like the reference, which ignored
    # its fps option entirely, fall back to uniform sampling instead of failing.
    if fps and native_fps:
        return fps_frame_indices(num_total, native_fps, fps, max_frames if max_frames is not None else num_frames)
    return sample_frame_indices(num_total, num_frames)


def _pick(loaded: dict[int, Image.Image], indices: list[int]) -> list[Image.Image]:
    """Arrange loaded frames in `indices` order; repeats are copies so callers never see aliased images."""
    out: list[Image.Image] = []
    seen: set[int] = set()
    for i in indices:
        out.append(loaded[i].copy() if i in seen else loaded[i])
        seen.add(i)
    return out


def _load_frame_folder(
    folder: str, num_frames: int, fps: float | None, max_frames: int | None, max_pixels: int,
    frame_rate: float | None = None,
) -> Video:
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise MediaError(f"Frame folder {folder!r} cannot be listed: {e}") from e
    if not names:
        raise MediaError(f"Frame folder {folder!r} is empty.")
    files = [
        n
        for n in names
        if not n.startswith(".")
        and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(folder, n))
    ]
    if not files:
        raise MediaError(
            f"Frame folder {folder!r} contains no image files (accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    indices = _choose_indices(len(files), None, num_frames, fps, max_frames)
    loaded = {i: load_image(os.path.join(folder, files[i]), max_pixels=max_pixels) for i in sorted(set(indices))}
    duration = len(files) / frame_rate if frame_rate else None
    return Video(_pick(loaded, indices), indices, len(files), frame_rate, folder, duration)


def _open_container(opener: Callable[[], object], name: str) -> av.container.InputContainer:
    try:
        container = av.open(opener(), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{name!r} is not a video or cannot be opened: {e}") from e
    if not container.streams.video:
        container.close()
        raise MediaError(f"{name!r} has no video stream.")
    return container


def _iter_decoded(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """Yield decoded frames in order, ending quietly at the first demux/decode error.

    A truncated or damaged tail therefore shortens the video to the frames that really decode, which is what
    the reference's "walk back until the last frame decodes" amounts to.
    """
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except av.FFmpegError:
        return


def _probe(opener: Callable[[], object], name: str, max_pixels: int) -> tuple[int, float | None, int, float | None]:
    """Cheap first look: demuxed video packets (a frame-count guess, no decoding), the fps, the frame count
    the container declares (0 when unknown) and the duration in seconds it declares (None when unknown)."""
    with _open_container(opener, name) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        native_fps = float(rate) if rate and rate > 0 else None
        ctx = stream.codec_context
        if ctx.width and ctx.height:  # 0 means "unknown until decoded"; the per-frame check covers that case
            _check_dims(ctx.width, ctx.height, name, max_pixels)
        count = 0
        try:
            for packet in container.demux(stream):
                count += packet.size > 0  # the final flush packet is empty
        except av.FFmpegError:
            pass  # a damaged tail: the decode pass establishes the real count
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        return count, native_fps, max(int(stream.frames or 0), 0), duration


def _decode_pass(
    opener: Callable[[], object], name: str, wanted: set[int], max_pixels: int
) -> tuple[dict[int, Image.Image], int]:
    """Decode the whole stream, keeping only the `wanted` frames as RGB images; also return the decoded count."""
    loaded: dict[int, Image.Image] = {}
    count = 0
    with _open_container(opener, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading changes speed only, never the decoded pixels
        for frame in _iter_decoded(container, stream):
            _check_dims(frame.width, frame.height, f"{name} (frame {count})", max_pixels)
            if count in wanted:
                try:
                    loaded[count] = frame.to_image()  # rgb24
                except (av.FFmpegError, ValueError) as e:
                    raise MediaError(f"{name!r}: frame {count} cannot be converted to RGB: {e}") from e
            count += 1
    return loaded, count


def _load_video_file(
    opener: Callable[[], object], name: str, num_frames: int, fps: float | None, max_frames: int | None, max_pixels: int
) -> Video:
    hint, native_fps, declared, duration = _probe(opener, name, max_pixels)
    guess = _choose_indices(hint, native_fps, num_frames, fps, max_frames) if hint else []
    loaded, total = _decode_pass(opener, name, set(guess), max_pixels)
    if total == 0:
        raise MediaError(f"{name!r} contains no decodable video frames (empty, truncated or corrupt).")
    if declared and total * MIN_DECODED_FRACTION_DENOMINATOR < declared:
        raise MediaError(f"{name!r} is truncated or corrupt: only {total} of its {declared} frames decode.")
    # The packet count is usually exact. If decoding disagrees, the indices follow the true count (as in the
    # reference), and a second pass fetches any frame the first one did not keep.
    indices = _choose_indices(total, native_fps, num_frames, fps, max_frames)
    if not set(indices) <= loaded.keys():
        loaded, again = _decode_pass(opener, name, set(indices), max_pixels)
        if again != total:
            raise MediaError(f"{name!r} decodes inconsistently ({total} then {again} frames); it may be corrupt.")
    if duration is None and native_fps:
        duration = total / native_fps
    return Video(_pick(loaded, indices), indices, total, native_fps, name, duration)


def load_video(
    source: str | os.PathLike | bytes,
    *,
    num_frames: int,
    fps: float | None = None,
    max_frames: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    frame_rate: float | None = None,
) -> Video:
    """Sample RGB frames from a video file, the bytes of a video file, or a folder of frame images.

    ``frame_rate``: the frames per second of a frame folder (its duration, for timestamps, and fps sampling);
    a video file's own rate and duration come from its container.

    By default (`fps` None or 0) the frames are `sample_frame_indices(N, num_frames)`, N being the number of
    frames that really decode (image files, for a folder). With `fps` > 0 they are `fps_frame_indices(N,
    native_fps, fps, max_frames or num_frames)`; a frame folder has no frame rate and is sampled uniformly.
    A damaged file yields the frames that do decode (N shrinks accordingly, like the reference's walk back
    to the last readable frame); none at all, or fewer than a quarter of the frames the container declares,
    is a MediaError.
    Only the wanted frames are kept in memory while decoding.
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise MediaError(f"num_frames must be a positive integer, got {num_frames!r}.")
    if fps is not None and (not math.isfinite(fps) or fps < 0):
        raise MediaError(f"fps must be a non-negative number, got {fps!r}.")
    if max_frames is not None and max_frames < 1:
        raise MediaError(f"max_frames must be at least 1, got {max_frames!r}.")
    _check_max_pixels(max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError("The video bytes are empty.")
        return _load_video_file(lambda: io.BytesIO(data), _BYTES_NAME, num_frames, fps, max_frames, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_video expects a path or bytes, got {type(source).__name__}.")
    name = os.fspath(source)
    if not os.path.exists(name):
        raise MediaError(f"Video {name!r} does not exist.")
    if frame_rate is not None and (not math.isfinite(frame_rate) or frame_rate <= 0):
        raise MediaError(f"frame_rate must be a positive number, got {frame_rate!r}.")
    if os.path.isdir(name):
        return _load_frame_folder(name, num_frames, fps, max_frames, max_pixels, frame_rate)
    return _load_video_file(lambda: name, name, num_frames, fps, max_frames, max_pixels)

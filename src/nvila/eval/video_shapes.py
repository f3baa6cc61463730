"""Synthetic video questions for NVILA-Nano: flat coloured shapes that move, change colour or flash.

Every clip carries one question, and its question type decides what happens in it:

| question type                 | clip                                                      |
|-------------------------------|-----------------------------------------------------------|
| colour, shape, direction      | one shape of one colour moving                            |
| start_colour, end_colour      | the moving shape changes colour once                      |
| change_count                  | the moving shape changes colour 0-3 times (uniform)       |
| flash_colour                  | one colour; a second shape appears for 5-10 % of the clip |

Design (S: the frame side, N: the clip's frames):

- Square frames of S px, S even (yuv420p needs it); a plain light background (each channel 230-255, like
  easy-VQA's); easy-VQA's 8 colours at its exact RGB values, drawn without anti-aliasing, so every pixel of a
  PNG frame is either the background or one palette colour.
- The primary shape (circle, rectangle with sides 1 : 0.5-0.85, or upward triangle) spans 20-30 % of S and
  always moves, in a straight line at constant speed from the first frame to the last, over 45-65 % of S
  (left, right, up or down): between two of 8 uniformly sampled frames it moves at least 6 % of S.
- Colour changes happen at frame boundaries chosen so that every colour holds at least ceil(N / 10) frames;
  the rest of the frames are split at random. Consecutive colours differ, so each change is visible.
- A flash shows a second shape (random kind and size, another colour, never overlapping the primary shape)
  for L frames, L / N in [5 %, 10 %], starting at a random frame; it never touches the first or the last
  frame, which every round(linspace) sample contains. 8 sampled frames then miss it about half the time and
  32 frames almost never (:func:`seen_by`, recorded per clip for the frame-count ablation).

Records are OpenAI-style training records (a video part, the question, the one-word answer) with a
``metadata`` object holding the question type, the accepted answers and all ground truth. Each clip is drawn
from its own random stream, ``nano-video/<seed>/<split>/<index>``, so a split's clips do not depend on the
size of the other split, and train and test never share a stream.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from nvila.base.errors import NvilaError
from nvila.base.files import atomic_dir
from nvila.base.progress import ProgressBar
from nvila.eval.datasets import ONE_WORD
from nvila.processing.media import sample_frame_indices

# easy-VQA's colours (its answers), at the RGB values its images use
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
    "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0)}
SHAPES = ("circle", "rectangle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
ONE_NUMBER = "Answer with one number."
NUMBER_WORDS = ("zero", "one", "two", "three")
QUESTIONS: dict[str, str] = {
    "colour": f"What color is the moving shape? {ONE_WORD}",
    "shape": f"What shape is moving? {ONE_WORD}",
    "direction": f"Which way does the shape move? {ONE_WORD}",
    "start_colour": f"What color is the shape at the start of the video? {ONE_WORD}",
    "end_colour": f"What color is the shape at the end of the video? {ONE_WORD}",
    "flash_colour": f"A second shape appears briefly. What color is it? {ONE_WORD}",
    "change_count": f"How many times does the shape change color? {ONE_NUMBER}",
}
QUESTION_TYPES = tuple(QUESTIONS)

BACKGROUND = (230, 255)          # each channel
SHAPE_SIZE = (0.20, 0.30)        # of the frame side
RECTANGLE_ASPECT = (0.50, 0.85)  # short side / long side
TRAVEL = (0.45, 0.65)            # of the frame side, first frame to last
MIN_SEGMENT_PCT = 10             # each colour holds at least this share of the frames
MAX_CHANGES = 3
FLASH_PCT = (5, 10)              # the flash's share of the frames
PROBE_FRAMES = (8, 32)           # uniform samples checked for seeing every change and the flash
MIN_FRAMES = 10
MIN_SIZE = 32
FORMATS = ("mp4", "frames")


@dataclass(frozen=True)
class Ranges:
    """What clips may be, inclusive: frame side (px), frames per second, duration (seconds)."""

    size: tuple[int, int] = (64, 448)
    fps: tuple[int, int] = (8, 30)
    duration: tuple[float, float] = (2.0, 10.0)

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("size", self.size), ("fps", self.fps), ("duration", self.duration)):
            if not 0 < lo <= hi:
                raise NvilaError(f"the {name} range must be 0 < LOW <= HIGH, got {lo},{hi}")
        if self.size[0] < MIN_SIZE or -(-self.size[0] // 2) * 2 > self.size[1]:
            raise NvilaError(f"the size range {self.size} must start at {MIN_SIZE} px or more and hold an even size")
        if self.duration[0] * self.fps[0] < MIN_FRAMES:
            raise NvilaError(f"the shortest clip ({self.duration[0]} s at {self.fps[0]} fps) must have at least "
                             f"{MIN_FRAMES} frames")


@dataclass(frozen=True)
class Sprite:
    shape: str
    width: int
    height: int


@dataclass(frozen=True)
class Flash:
    """A second shape shown at (x, y) (top left) from frame ``start`` for ``frames`` frames."""

    sprite: Sprite
    colour: str
    x: int
    y: int
    start: int
    frames: int

    def shows(self, t: int) -> bool:
        return self.start <= t < self.start + self.frames


@dataclass(frozen=True)
class Clip:
    """One clip: the moving shape goes from ``start`` to ``end`` (top-left corners, frame 0 and N - 1);
    ``segments`` are (colour, first frame) in order."""

    question_type: str
    size: int
    fps: int
    frames: int
    background: tuple[int, int, int]
    sprite: Sprite
    direction: str
    start: tuple[int, int]
    end: tuple[int, int]
    segments: tuple[tuple[str, int], ...]
    flash: Flash | None = None

    def position(self, t: int) -> tuple[int, int]:
        f = t / (self.frames - 1)
        return (round(self.start[0] + (self.end[0] - self.start[0]) * f),
                round(self.start[1] + (self.end[1] - self.start[1]) * f))

    def colour(self, t: int) -> str:
        return [c for c, first in self.segments if first <= t][-1]

    def box(self, t: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the moving shape at frame t, x1 and y1 exclusive."""
        x, y = self.position(t)
        return x, y, x + self.sprite.width, y + self.sprite.height


def _sprite(rng: random.Random, size: int) -> Sprite:
    shape = rng.choice(SHAPES)
    side = round(rng.uniform(*SHAPE_SIZE) * size)
    if shape != "rectangle":
        return Sprite(shape, side, side)
    short = round(side * rng.uniform(*RECTANGLE_ASPECT))
    return Sprite(shape, side, short) if rng.random() < 0.5 else Sprite(shape, short, side)


def _path(rng: random.Random, size: int, sprite: Sprite) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """A direction and the first and last top-left corners of a straight path of 45-65 % of the side."""
    direction = rng.choice(tuple(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    travel = round(rng.uniform(*TRAVEL) * size)
    along, across = (sprite.width, sprite.height) if dx else (sprite.height, sprite.width)
    lo = rng.randint(0, size - along - travel)
    first, last = (lo, lo + travel) if dx + dy > 0 else (lo + travel, lo)
    other = rng.randint(0, size - across)
    return (direction, (first, other), (last, other)) if dx else (direction, (other, first), (other, last))


def _segments(rng: random.Random, frames: int, changes: int) -> tuple[tuple[str, int], ...]:
    """``changes`` + 1 colours, each held for at least ceil(frames / 10) frames, consecutive ones different."""
    least = -(-frames * MIN_SEGMENT_PCT // 100)
    spare = frames - least * (changes + 1)
    cuts = [0, *sorted(rng.randint(0, spare) for _ in range(changes))]
    colours = [rng.choice(tuple(COLOURS))]
    for _ in range(changes):
        colours.append(rng.choice([c for c in COLOURS if c != colours[-1]]))
    return tuple((c, k * least + cut) for k, (c, cut) in enumerate(zip(colours, cuts)))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _flash(rng: random.Random, clip: Clip) -> Flash:
    """A shape of another colour for 5-10 % of the frames, away from the first and last frame and clear of
    the moving shape (a gap of 5 % of the side) while it shows."""
    n = clip.frames
    length = rng.randint(max(1, -(-n * FLASH_PCT[0] // 100)), max(1, n * FLASH_PCT[1] // 100))
    start = rng.randint(1, n - length - 1)
    colour = rng.choice([c for c in COLOURS if c != clip.colour(start)])
    sprite = _sprite(rng, clip.size)
    boxes = [clip.box(t) for t in range(start, start + length)]
    gap = clip.size // 20
    for _ in range(1000):   # the free area is at least half the frame: the first few tries succeed
        x, y = rng.randint(0, clip.size - sprite.width), rng.randint(0, clip.size - sprite.height)
        if all(_apart((x, y, x + sprite.width, y + sprite.height), b, gap) for b in boxes):
            return Flash(sprite, colour, x, y, start, length)
    raise NvilaError(f"no room for a flash in a {clip.size} px clip")   # unreachable with the sizes above


def sample_clip(rng: random.Random, question_type: str, ranges: Ranges = Ranges()) -> Clip:
    """Draw a clip whose content answers ``question_type`` (see the module's table)."""
    if question_type not in QUESTIONS:
        raise NvilaError(f"unknown question type {question_type!r}; known: {list(QUESTIONS)}")
    size = 2 * rng.randint(-(-ranges.size[0] // 2), ranges.size[1] // 2)
    fps = rng.randint(*ranges.fps)
    frames = round(rng.uniform(*ranges.duration) * fps)
    background = (rng.randint(*BACKGROUND), rng.randint(*BACKGROUND), rng.randint(*BACKGROUND))
    sprite = _sprite(rng, size)
    direction, start, end = _path(rng, size, sprite)
    changes = 0
    if question_type in ("start_colour", "end_colour"):
        changes = 1
    elif question_type == "change_count":
        changes = rng.randint(0, MAX_CHANGES)
    clip = Clip(question_type, size, fps, frames, background, sprite, direction, start, end,
                _segments(rng, frames, changes))
    return replace(clip, flash=_flash(rng, clip)) if question_type == "flash_colour" else clip


def clips(seed: int, split: str, count: int, ranges: Ranges = Ranges()) -> list[Clip]:
    """The clips of one split: question types in turn, each clip from its own random stream."""
    return [sample_clip(random.Random(f"nano-video/{seed}/{split}/{i}"), QUESTION_TYPES[i % len(QUESTION_TYPES)],
                        ranges) for i in range(count)]


def render(clip: Clip, t: int) -> Image.Image:
    """Frame ``t`` of the clip, (S, S) RGB."""
    img = Image.new("RGB", (clip.size, clip.size), clip.background)
    draw = ImageDraw.Draw(img)
    _draw(draw, clip.sprite, clip.position(t), COLOURS[clip.colour(t)])
    if clip.flash is not None and clip.flash.shows(t):
        _draw(draw, clip.flash.sprite, (clip.flash.x, clip.flash.y), COLOURS[clip.flash.colour])
    return img


def _draw(draw: ImageDraw.ImageDraw, sprite: Sprite, xy: tuple[int, int], rgb: tuple[int, int, int]) -> None:
    x0, y0 = xy
    x1, y1 = x0 + sprite.width - 1, y0 + sprite.height - 1
    if sprite.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif sprite.shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)


def seen_by(clip: Clip, num_frames: int) -> tuple[int, bool | None]:
    """What ``num_frames`` uniformly sampled frames (round(linspace), as the processor samples) show: the
    colour changes between them, and whether one shows the flash (None without a flash)."""
    idx = sample_frame_indices(clip.frames, num_frames)
    colours = [clip.colour(t) for t in idx]
    changes = sum(a != b for a, b in pairwise(colours))
    return changes, (any(clip.flash.shows(t) for t in idx) if clip.flash is not None else None)


def answers(clip: Clip) -> list[str]:
    """The accepted answers; the first is the training answer."""
    q = clip.question_type
    if q == "change_count":
        return [str(len(clip.segments) - 1), NUMBER_WORDS[len(clip.segments) - 1]]
    if q == "flash_colour":
        assert clip.flash is not None
        return [clip.flash.colour]
    return [{"colour": clip.segments[0][0], "start_colour": clip.segments[0][0], "end_colour": clip.segments[-1][0],
             "shape": clip.sprite.shape, "direction": clip.direction}[q]]


def ground_truth(clip: Clip) -> dict[str, Any]:
    """Everything a clip shows, for the record's ``metadata`` (frame ranges end-exclusive, times in seconds)."""
    fps = clip.fps
    bounds = [first for _, first in clip.segments[1:]] + [clip.frames]
    segments = [{"colour": c, "start_frame": first, "end_frame": end, "start_s": round(first / fps, 4),
                 "end_s": round(end / fps, 4)} for (c, first), end in zip(clip.segments, bounds)]
    seen = {n: seen_by(clip, n) for n in PROBE_FRAMES}
    flash = None
    if clip.flash is not None:
        f = clip.flash
        flash = {"colour": f.colour, "shape": f.sprite.shape, "shape_size": [f.sprite.width, f.sprite.height],
                 "xy": [f.x, f.y], "start_frame": f.start, "end_frame": f.start + f.frames,
                 "start_s": round(f.start / fps, 4), "duration_s": round(f.frames / fps, 4),
                 "share": round(f.frames / clip.frames, 4), "seen": {str(n): s[1] for n, s in seen.items()}}
    return {"question_type": clip.question_type, "answers": answers(clip), "size": clip.size, "fps": fps,
            "frames": clip.frames, "duration": round(clip.frames / fps, 4), "background": list(clip.background),
            "shape": clip.sprite.shape, "shape_size": [clip.sprite.width, clip.sprite.height],
            "direction": clip.direction, "start_xy": list(clip.start), "end_xy": list(clip.end),
            "segments": segments, "colour_changes": len(clip.segments) - 1,
            "changes_seen": {str(n): s[0] for n, s in seen.items()}, "flash": flash}


def answerable(meta: dict[str, Any]) -> dict[str, list[str]]:
    """Every question type a clip answers, from its record's ground truth: its own, plus the moving shape's
    shape and direction, its colour when it never changes, its first and last colour when it does.

    The count of colour changes is asked only of clips made for it (as the flash is), whose counts are
    balanced over 0-3: every other clip changes colour 0 or 1 times, and asking them too taught a prior.
    Training on all of them (``train-all.jsonl``, one conversation of independent questions per clip) gives
    each clip several answers for the price of one video prefix."""
    segments = meta["segments"]
    out = {"shape": [meta["shape"]], "direction": [meta["direction"]]}
    if len(segments) == 1:
        out["colour"] = [segments[0]["colour"]]
    else:
        out |= {"start_colour": [segments[0]["colour"]], "end_colour": [segments[-1]["colour"]]}
    own = meta["question_type"]
    return {own: list(meta["answers"]), **{k: v for k, v in out.items() if k != own}}


def all_questions_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A training record asking every question :func:`answerable` finds for the record's clip."""
    return _questions_record(rec, answerable(rec["metadata"]), rec["id"])


def _questions_record(rec: dict[str, Any], asked: dict[str, list[str]], rid: str) -> dict[str, Any]:
    video = rec["messages"][0]["content"][0]
    messages: list[dict[str, Any]] = []
    for q, accepted in asked.items():
        content: Any = [video, {"type": "text", "text": QUESTIONS[q]}] if not messages else QUESTIONS[q]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": accepted[0]}]
    return {"id": rid, "messages": messages, "metadata": {**rec["metadata"], "asked": list(asked)}}


# Focus files (train-<name>.jsonl: one question type alone, on the train clips whose answer is one of the
# listed answers, or on every clip for None) that let a recipe weight a skill up: the direction of motion is
# the slowest type to learn, and sideways motion the slowest direction (a frame's tokens go in row order, so
# a shape moving sideways shifts by one token position where one moving up or down shifts by a whole row).
FOCUS_SETS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "direction": ("direction", None),
    "horizontal": ("direction", ("left", "right")),
}


def training_sets(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The training files made from the train split's records: ``train-all`` and one ``train-<name>`` per
    :data:`FOCUS_SETS` entry."""
    sets = {"train-all": [all_questions_record(r) for r in records]}
    for name, (q, only) in FOCUS_SETS.items():
        rows = []
        for r in records:
            accepted = answerable(r["metadata"])[q]
            if only is None or accepted[0] in only:
                rows.append(_questions_record(r, {q: accepted}, f"{r['id']}-{name}"))
        sets[f"train-{name}"] = rows
    return sets


def write_training_sets(folder: str | Path) -> dict[str, Path]:
    """(Re)write the :func:`training_sets` files next to an existing ``train.jsonl`` (clips untouched)."""
    folder = Path(folder)
    src = folder / "train.jsonl"
    if not src.is_file():
        raise NvilaError(f"{src} not found: write the clips first (nvila nano video-data --out {folder})")
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = {}
    for name, rows in training_sets(records).items():
        out[name] = folder / f"{name}.jsonl"
        _write_jsonl(out[name], rows)
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def record(clip: Clip, media: str, split: str, index: int, fmt: str, codec: str | None) -> dict[str, Any]:
    """The OpenAI-style training record of a clip written at ``media`` (relative to the JSONL's folder)."""
    part: dict[str, Any] = {"type": "video", "video": media}
    if fmt == "frames":
        part["frame_rate"] = clip.fps       # a frame folder does not know its rate
    return {"id": f"nano-video-{split}-{index:06d}",
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTIONS[clip.question_type]}]},
                         {"role": "assistant", "content": answers(clip)[0]}],
            "metadata": {**ground_truth(clip), "format": fmt, "codec": codec}}


def mp4_codec() -> str:
    """H.264 when this PyAV can encode it, else MPEG-4 part 2 (recorded in every record's metadata)."""
    import av

    for name in ("h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):   # an unknown encoder
            continue
    raise NvilaError("this PyAV build encodes neither H.264 nor MPEG-4; use --format frames")


def write_clip(clip: Clip, path: Path, fmt: str, codec: str | None = None) -> None:
    """Write the clip as an MP4 file (``codec``) or a folder of PNG frames 000000.png, 000001.png, ..."""
    if fmt == "frames":
        path.mkdir()
        for t in range(clip.frames):
            render(clip, t).save(path / f"{t:06d}.png")
        return
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec or mp4_codec(), rate=clip.fps)
        stream.width = stream.height = clip.size
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name in ("h264", "libx264"):
            stream.options = {"crf": "18"}                 # near-lossless flat colours
        else:
            stream.bit_rate = 40 * clip.size * clip.size   # ~0.3 bits per pixel per frame at 8 fps and up
        for t in range(clip.frames):
            for packet in stream.encode(av.VideoFrame.from_image(render(clip, t))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video_data(out: str | Path, train: int, test: int, seed: int = 0, fmt: str = "mp4",
                     ranges: Ranges = Ranges(), replace: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl``, ``info.json`` and ``clips/<split>/<index>(.mp4)`` under ``out``;
    returns a summary (files, clips per question type)."""
    if fmt not in FORMATS:
        raise NvilaError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    if train < 0 or test < 0:
        raise NvilaError(f"clip counts must not be negative, got --train {train} --test {test}")
    codec = mp4_codec() if fmt == "mp4" else None
    out = Path(out)
    summary: dict[str, Any] = {}
    with atomic_dir(out, replace=replace) as tmp, ProgressBar("video-data", train + test, "clips",
                                                               enabled=progress, stderr=True) as bar:
        for split, count in (("train", train), ("test", test)):
            (tmp / "clips" / split).mkdir(parents=True)
            records = []
            for i, clip in enumerate(clips(seed, split, count, ranges)):
                media = f"clips/{split}/{i:06d}" + (".mp4" if fmt == "mp4" else "")
                write_clip(clip, tmp / media, fmt, codec)
                records.append(record(clip, media, split, i, fmt, codec))
                bar.advance()
            _write_jsonl(tmp / f"{split}.jsonl", records)
            summary[split] = {"path": str(out / f"{split}.jsonl"), "clips": count,
                              "by_question_type": dict(Counter(r["metadata"]["question_type"] for r in records))}
            if split == "train" and records:
                for name, rows in training_sets(records).items():
                    _write_jsonl(tmp / f"{name}.jsonl", rows)
                    summary[name] = {"path": str(out / f"{name}.jsonl"), "clips": len(rows),
                                     "questions": sum(len(r["metadata"]["asked"]) for r in rows)}
        info = {"generator": __name__, "seed": seed, "format": fmt, "codec": codec, "ranges": asdict(ranges),
                "splits": summary, "question_types": QUESTIONS}
        (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return summary

"""NVILA-Nano's synthetic video data (`nvila nano video-data`, `nvila.eval.video_shapes`): reproducible, the
ground truth really in the pixels, MP4s that decode, disjoint splits, read by the eval dataset and the trainer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from nvila.base.errors import NvilaError
from nvila.cli.main import main
from nvila.eval.datasets import EvalItem, load_eval
from nvila.eval.run import evaluate
from nvila.eval.video_shapes import (
    COLOURS,
    DIRECTIONS,
    QUESTION_TYPES,
    QUESTIONS,
    Ranges,
    clips,
    sample_clip,
    seen_by,
    write_video_data,
)
from nvila.processing.media import load_video, sample_frame_indices

SMALL = ["--size-range", "64,96", "--fps-range", "8,12", "--duration-range", "2,3"]
SMALL_RANGES = Ranges((64, 96), (8, 12), (2.0, 3.0))


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 train and 7 test clips as PNG frame folders, written through the CLI."""
    out = tmp_path_factory.mktemp("video") / "frames"
    assert main(["nano", "video-data", "--out", str(out), "--train", "14", "--test", "7", "--seed", "3",
                 "--format", "frames", *SMALL]) == 0
    return out


def records(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def video_path(root: Path, rec: dict) -> Path:
    return root / rec["messages"][0]["content"][0]["video"]


def frames_of(root: Path, rec: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(video_path(root, rec).glob("*.png"))]


def observe(frame: np.ndarray) -> dict[str, tuple[int, int, int, int, int]]:
    """Palette colour -> (pixels, x0, y0, x1, y1) (exclusive ends) of the colours present in a frame."""
    out = {}
    for name, rgb in COLOURS.items():
        ys, xs = np.nonzero((frame == np.array(rgb, dtype=np.uint8)).all(-1))
        if len(xs):
            out[name] = (len(xs), int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return out


def shape_of(pixels: int, x0: int, y0: int, x1: int, y1: int) -> str:
    fill = pixels / ((x1 - x0) * (y1 - y0))   # rectangle 1, circle ~pi/4, triangle ~1/2
    return "rectangle" if fill > 0.97 else "circle" if fill > 0.68 else "triangle"


def read_pixels(frames: list[np.ndarray]) -> dict:
    """What the frames show: the moving shape's colour and box per frame, and the flash's frames and colour
    (a second palette colour next to the moving shape's of the frame before)."""
    primary, boxes, flash_frames, flash_colour = [], [], [], None
    for t, frame in enumerate(frames):
        seen = observe(frame)
        if len(seen) == 2:
            assert primary, "a flash on the first frame"
            flash_frames.append(t)
            (flash_colour,) = set(seen) - {primary[-1]}
            colour = primary[-1]
        else:
            (colour,) = seen
        primary.append(colour)
        boxes.append(seen[colour])
    return {"colours": primary, "boxes": boxes, "flash_frames": flash_frames, "flash_colour": flash_colour}


def answer_from_pixels(qtype: str, seen: dict, size: int) -> str:
    colours, boxes = seen["colours"], seen["boxes"]
    changes = sum(a != b for a, b in zip(colours, colours[1:]))
    (_, ax0, ay0, ax1, ay1), (_, bx0, by0, bx1, by1) = boxes[0], boxes[-1]
    dx, dy = (bx0 + bx1 - ax0 - ax1) / 2, (by0 + by1 - ay0 - ay1) / 2
    assert max(abs(dx), abs(dy)) >= 0.44 * size and min(abs(dx), abs(dy)) == 0   # straight, far enough
    direction = {v: k for k, v in DIRECTIONS.items()}[(int(np.sign(dx)), int(np.sign(dy)))]
    return {"colour": colours[0], "start_colour": colours[0], "end_colour": colours[-1], "change_count": str(changes),
            "shape": shape_of(*boxes[0]), "direction": direction, "flash_colour": seen["flash_colour"]}[qtype]


def test_ground_truth_is_in_the_pixels(frames_dir: Path) -> None:
    recs = records(frames_dir, "train") + records(frames_dir, "test")
    assert {r["metadata"]["question_type"] for r in recs} == set(QUESTION_TYPES)
    for rec in recs:
        meta, frames = rec["metadata"], frames_of(frames_dir, rec)
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        assert user[1]["text"] == QUESTIONS[meta["question_type"]] and answer == meta["answers"][0]
        assert len(frames) == meta["frames"] and frames[0].shape == (meta["size"], meta["size"], 3)
        assert meta["duration"] == round(meta["frames"] / meta["fps"], 4) and 2 <= meta["duration"] <= 3
        assert (frames[0][0, 0] >= 230).all()                                   # a light plain background
        seen = read_pixels(frames)
        assert answer_from_pixels(meta["question_type"], seen, meta["size"]) == answer, rec["id"]
        # every recorded value, from the pixels
        assert list(seen["boxes"][0][1:3]) == meta["start_xy"] and list(seen["boxes"][-1][1:3]) == meta["end_xy"]
        assert shape_of(*seen["boxes"][0]) == meta["shape"]
        _, x0, y0, x1, y1 = seen["boxes"][0]
        assert [x1 - x0, y1 - y0] == meta["shape_size"]
        runs = [(c, t) for t, c in enumerate(seen["colours"]) if t == 0 or seen["colours"][t - 1] != c]
        assert [(s["colour"], s["start_frame"]) for s in meta["segments"]] == runs
        ends = [t for _, t in runs[1:]] + [meta["frames"]]
        assert min(e - s for (_, s), e in zip(runs, ends)) >= meta["frames"] / 10   # each colour >= 10 %
        assert meta["colour_changes"] == len(runs) - 1 <= 3
        if meta["question_type"] in ("start_colour", "end_colour"):
            assert meta["colour_changes"] == 1
        flash = meta["flash"]
        assert (flash is not None) == (meta["question_type"] == "flash_colour")
        if flash is None:
            assert seen["flash_frames"] == []
            continue
        assert seen["flash_frames"] == list(range(flash["start_frame"], flash["end_frame"]))
        assert seen["flash_colour"] == flash["colour"] != seen["colours"][0]
        assert 0 < flash["start_frame"] and flash["end_frame"] < meta["frames"]       # never the first/last frame
        assert 0.05 <= len(seen["flash_frames"]) / meta["frames"] <= 0.10
        for n in (8, 32):
            hit = any(t in seen["flash_frames"] for t in sample_frame_indices(meta["frames"], n))
            assert flash["seen"][str(n)] == hit


def test_train_all_asks_every_answerable_question_with_the_pixels_answer(frames_dir: Path) -> None:
    """train-all.jsonl: each train clip once, as independent questions; every answer read back from the frames."""
    clips_ = records(frames_dir, "train")
    every = records(frames_dir, "train-all")
    assert [r["id"] for r in every] == [r["id"] for r in clips_]
    for one, rec in zip(clips_, every):
        meta, turns = rec["metadata"], rec["messages"]
        assert turns[0]["content"][0] == one["messages"][0]["content"][0]           # the same clip, once
        assert all(isinstance(t["content"], str) for t in turns[1:])                # later turns: text only
        asked = meta["asked"]
        assert asked[0] == meta["question_type"] and len(set(asked)) == len(asked)
        assert {"shape", "direction"} <= set(asked)
        assert ("change_count" in asked) == (meta["question_type"] == "change_count")
        assert ("colour" in asked) == (meta["colour_changes"] == 0)
        assert ("start_colour" in asked) == ("end_colour" in asked) == (meta["colour_changes"] > 0)
        assert ("flash_colour" in asked) == (meta["question_type"] == "flash_colour")
        seen = read_pixels(frames_of(frames_dir, one))
        for i, q in enumerate(asked):
            question = turns[2 * i]["content"]
            text = question[1]["text"] if isinstance(question, list) else question
            assert text == QUESTIONS[q]
            assert turns[2 * i + 1]["content"] == answer_from_pixels(q, seen, meta["size"]), (rec["id"], q)
    assert sum(len(r["metadata"]["asked"]) for r in every) > 3 * len(every)
    focus = records(frames_dir, "train-direction")                  # the direction question alone, every clip
    assert [r["id"] for r in focus] == [f"{r['id']}-direction" for r in clips_]
    for one, rec in zip(clips_, focus):
        assert rec["metadata"]["asked"] == ["direction"] and len(rec["messages"]) == 2
        assert rec["messages"][0]["content"] == [one["messages"][0]["content"][0],
                                                 {"type": "text", "text": QUESTIONS["direction"]}]
        assert rec["messages"][1]["content"] == one["metadata"]["direction"]
    sideways = records(frames_dir, "train-horizontal")              # the same question, left/right clips only
    expected = [(f"{r['id']}-horizontal", r["metadata"]["direction"]) for r in clips_
                if r["metadata"]["direction"] in ("left", "right")]
    assert [(r["id"], r["messages"][1]["content"]) for r in sideways] == expected and expected
    assert all(r["metadata"]["asked"] == ["direction"] for r in sideways)


def test_training_sets_rewritten_in_place(frames_dir: Path, tmp_path: Path, capsys) -> None:
    """`--training-sets` rewrites the files made from train.jsonl (a recipe's new focus file appears on an
    existing folder) without touching the clips; a folder without train.jsonl is named in the error."""
    copy = tmp_path / "copy"
    shutil.copytree(frames_dir, copy)
    made = {p.name: p.read_bytes() for p in copy.glob("train-*.jsonl")}
    clips_before = sorted((p, p.stat().st_mtime_ns) for p in (copy / "clips").rglob("*.png"))
    for p in copy.glob("train-*.jsonl"):
        p.unlink()
    assert main(["nano", "video-data", "--out", str(copy), "--training-sets"]) == 0
    assert {p.name: p.read_bytes() for p in copy.glob("train-*.jsonl")} == made
    assert set(made) == {"train-all.jsonl", "train-direction.jsonl", "train-horizontal.jsonl"}
    assert sorted((p, p.stat().st_mtime_ns) for p in (copy / "clips").rglob("*.png")) == clips_before
    assert main(["nano", "video-data", "--out", str(tmp_path / "nowhere"), "--training-sets"]) == 2
    assert "train.jsonl not found: write the clips first (nvila nano video-data --out" in capsys.readouterr().err


def test_same_seed_same_data_other_seed_other_data(frames_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_video_data(again, 14, 7, seed=3, fmt="frames", ranges=SMALL_RANGES, progress=False)
    for split in ("train", "test"):
        assert (again / f"{split}.jsonl").read_bytes() == (frames_dir / f"{split}.jsonl").read_bytes()
        for rec in records(frames_dir, split):
            a, b = frames_of(frames_dir, rec), frames_of(again, rec)
            assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    other = tmp_path / "other"
    write_video_data(other, 14, 0, seed=4, fmt="frames", ranges=SMALL_RANGES, progress=False)
    assert (other / "train.jsonl").read_bytes() != (frames_dir / "train.jsonl").read_bytes()


def test_train_and_test_are_disjoint(frames_dir: Path) -> None:
    train, test = records(frames_dir, "train"), records(frames_dir, "test")
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {video_path(frames_dir, r) for r in train} & {video_path(frames_dir, r) for r in test}
    assert not {json.dumps(r["metadata"]) for r in train} & {json.dumps(r["metadata"]) for r in test}
    # the splits' streams differ clip by clip, and a split does not depend on the other's size
    assert not set(clips(0, "train", 70)) & set(clips(0, "test", 70))
    assert clips(0, "test", 7) == clips(0, "test", 70)[:7]


def test_mp4_decodes_to_the_recorded_frames(tmp_path: Path) -> None:
    out = tmp_path / "mp4"
    write_video_data(out, 7, 0, seed=1, fmt="mp4", ranges=SMALL_RANGES, progress=False)
    for rec in records(out, "train"):
        meta = rec["metadata"]
        assert meta["codec"] in ("h264", "mpeg4") and video_path(out, rec).suffix == ".mp4"
        video = load_video(video_path(out, rec), num_frames=8)
        assert video.num_total_frames == meta["frames"] and video.native_fps == meta["fps"]
        assert video.frames[0].size == (meta["size"], meta["size"])
        w, h = meta["shape_size"]
        for frame, (x, y), segment in ((video.frames[0], meta["start_xy"], meta["segments"][0]),
                                       (video.frames[-1], meta["end_xy"], meta["segments"][-1])):
            inside = np.asarray(frame)[y + h // 2 + h // 4, x + w // 2].astype(int)   # inside every shape kind
            assert np.abs(inside - COLOURS[segment["colour"]]).max() <= 40, (rec["id"], inside, segment)


def test_flash_is_missed_by_8_frames_about_half_the_time() -> None:
    """The point of the flash questions: 8 uniform frames often miss it, 32 do not."""
    flashes = [sample_clip(random.Random(i), "flash_colour") for i in range(400)]
    hit8 = sum(seen_by(c, 8)[1] for c in flashes) / len(flashes)
    hit32 = sum(seen_by(c, 32)[1] for c in flashes) / len(flashes)
    assert 0.3 <= hit8 <= 0.7 and hit32 >= 0.98, (hit8, hit32)
    for c in flashes:   # 5-10 % of the clip, never on the first or last frame (which every sample holds)
        assert 0.05 <= c.flash.frames / c.frames <= 0.10 and 0 < c.flash.start < c.frames - c.flash.frames


def test_eval_dataset_reads_the_generated_split(frames_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    items = load_eval("nano-video", "test", frames_dir)
    recs = records(frames_dir, "test")
    assert [i.id for i in items] == [r["id"] for r in recs] and len(items) == 7
    assert all(i.kind == "video" and Path(i.image).is_dir() for i in items)
    assert {i.question_type for i in items} == set(QUESTION_TYPES)
    assert all(i.question == QUESTIONS[i.question_type] for i in items)
    count = next(i for i in items if i.question_type == "change_count")
    assert count.answers[0] in "0123" and count.answers[1] in ("zero", "one", "two", "three")

    with pytest.raises(NvilaError, match="nvila nano video-data --out"):
        load_eval("nano-video", "test", tmp_path / "nowhere")


def test_evaluate_sends_videos_and_reports_per_question_type(frames_dir: Path, monkeypatch) -> None:
    items = load_eval("nano-video", "test", frames_dir)
    sent = []

    class Pipe:                              # right on the shape question only
        def generate_batch(self, convs: list, max_new_tokens: int) -> list[SimpleNamespace]:
            sent.extend(convs)
            shape = next(i for i in items if i.question_type == "shape")
            return [SimpleNamespace(text=shape.answers[0] if c[0]["content"][1]["text"] == shape.question else "purple")
                    for c in convs]

    report = evaluate(Pipe(), items, progress=False)
    assert all(c[0]["content"][0] == {"type": "video", "video": i.image} for c, i in zip(sent, items))
    assert report["accuracy_by_question_type"] == {q: float(q == "shape") for q in sorted(QUESTION_TYPES)}
    image_report = evaluate(Pipe(), [EvalItem("a", "x.png", "What shape is moving?", ("circle",))], progress=False)
    assert "accuracy_by_question_type" not in image_report


def test_trainer_reads_the_jsonl(frames_dir: Path, tmp_path: Path) -> None:
    from conftest import fixture_pipeline

    from nvila.train.data import load_dataset, training_prompt

    samples = load_dataset(frames_dir / "train.jsonl")
    assert len(samples) == 14
    for sample, rec in zip(samples, records(frames_dir, "train")):
        video, text = sample.messages[0]["content"]
        assert Path(video["video"]).is_dir() and video["frame_rate"] == rec["metadata"]["fps"]
        assert sample.messages[1]["content"] == rec["metadata"]["answers"][0]
    out = tmp_path / "mp4"
    write_video_data(out, 1, 0, seed=2, fmt="mp4", ranges=SMALL_RANGES, progress=False)
    processor = fixture_pipeline("nvila-lite").processor
    for sample in (samples[0], load_dataset(out / "train.jsonl")[0]):
        prompt = training_prompt(processor, sample)
        assert [m.kind for m in prompt.media] == ["video"] and any(t >= 0 for t in prompt.labels)


@pytest.mark.parametrize("args, message", [
    (["--size-range", "64"], "--size-range takes LOW,HIGH"),
    (["--fps-range", "30,8"], "fps range"),
    (["--size-range", "16,32"], "size range"),
    (["--duration-range", "0.5,1", "--fps-range", "8,8"], "at least 10 frames"),
])
def test_bad_ranges_are_one_line_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["nano", "video-data", "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

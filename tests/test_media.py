"""Tests for nvila.processing.media: exact image conversion, reference frame sampling, video decoding, and bad input."""

from __future__ import annotations

import io
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import png_claiming
from PIL import Image

from nvila.base.errors import MediaError
from nvila.processing.media import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Video,
    fps_frame_indices,
    load_image,
    load_video,
    media_kind,
    sample_frame_indices,
)

# Leaked file handles surface as ResourceWarning (possibly via pytest's unraisable-exception hook), and PIL's
# decompression-bomb warning must not leak out of load_image either: make all of them failures.
pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning"),
]

MEDIA = Path(__file__).parent / "fixtures/official/media"
AVI = MEDIA / "clip_24f_12fps_176x144.avi"
FRAMES = MEDIA / "clip_frames_24"
PNGS = sorted(MEDIA.glob("*.png"))

REF_8 = [0, 3, 7, 10, 13, 16, 20, 23]
REF_16 = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23]


def _reference_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _frame_png(index: int) -> np.ndarray:
    return _reference_rgb(FRAMES / f"{index:04d}.png")




# ----------------------------------------------------------------------------------------------- images


def test_fixture_modes_cover_the_conversions() -> None:
    modes = set()
    for p in PNGS:
        with Image.open(p) as im:
            modes.add(im.mode)
    assert {"RGB", "L", "RGBA", "P"} <= modes


@pytest.mark.parametrize("path", PNGS, ids=lambda p: p.name)
def test_load_image_is_bit_identical_to_pil_convert(path: Path) -> None:
    img = load_image(path)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), _reference_rgb(path))


def test_rgba_alpha_is_dropped_not_composited() -> None:
    path = MEDIA / "flower_rgba_420x336.png"
    with Image.open(path) as im:
        rgba = np.asarray(im)
    assert (rgba[..., 3] < 255).any(), "fixture must have transparency for this test to mean anything"
    np.testing.assert_array_equal(np.asarray(load_image(path)), rgba[..., :3])


def test_transparent_pixels_keep_their_rgb() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(buf, "PNG")
    out = np.asarray(load_image(buf.getvalue()))
    assert out.shape == (3, 4, 3)
    assert (out == [10, 20, 30]).all()


def test_grayscale_is_replicated_and_palette_expanded() -> None:
    gray_path = MEDIA / "hopper_gray_320x480.png"
    with Image.open(gray_path) as im:
        gray = np.asarray(im)
    out = np.asarray(load_image(gray_path))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    pal_path = MEDIA / "china_palette_330x200.png"
    with Image.open(pal_path) as im:
        idx = np.asarray(im)
        palette = np.asarray(im.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(np.asarray(load_image(pal_path)), palette[idx])


def test_load_image_from_bytes_and_str_path() -> None:
    path = MEDIA / "hopper_64x64.png"
    expected = _reference_rgb(path)
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), expected)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), expected)


def test_pil_image_input_is_converted_without_mutation() -> None:
    src = Image.new("LA", (5, 4), (77, 10))
    out = load_image(src)
    assert out is not src and out.mode == "RGB" and src.mode == "LA"
    assert (np.asarray(out) == 77).all()


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    first, second = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    out = np.asarray(load_image(path))
    assert (out == [255, 0, 0]).all()


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_load_image_directory(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="is a directory"):
        load_image(tmp_path)


def test_load_image_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(MediaError, match="not a recognised image") as info:
        load_image(path)
    assert "notes.png" in str(info.value)


def test_load_image_truncated_png(tmp_path: Path) -> None:
    data = (MEDIA / "hopper_64x64.png").read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated or corrupt") as info:
        load_image(path)
    assert "half.png" in str(info.value)


def test_load_image_header_beyond_pil_hard_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(MediaError, match="too large|exceeds the limit"):
        load_image(path)


def test_load_image_size_is_checked_from_header_before_decoding(tmp_path: Path) -> None:
    # 20000x5000 is over PIL's warning level but under its hard limit. The file holds only 1 pixel of data, so
    # decoding would fail as "truncated": getting the size message proves the check ran before decoding, and the
    # module-level filter proves PIL's DecompressionBombWarning did not leak.
    path = tmp_path / "big.png"
    path.write_bytes(png_claiming(20_000, 5_000))
    with pytest.raises(MediaError, match="exceeds the limit of 50000000"):
        load_image(path, max_pixels=50_000_000)
    assert 20_000 * 5_000 <= DEFAULT_MAX_PIXELS


def test_load_image_max_pixels_on_real_image() -> None:
    with pytest.raises(MediaError, match="64x64 = 4096 pixels, which exceeds the limit of 100"):
        load_image(MEDIA / "hopper_64x64.png", max_pixels=100)
    assert load_image(MEDIA / "hopper_64x64.png", max_pixels=4096).size == (64, 64)


def test_load_image_zero_dimension_png(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    path.write_bytes(png_claiming(0, 5))
    with pytest.raises(MediaError, match=r"zero width or height \(0x5\)"):
        load_image(path)


def test_load_image_zero_dimension_pil_image() -> None:
    with pytest.raises(MediaError, match="zero width or height"):
        load_image(Image.new("RGB", (7, 0)))


# ------------------------------------------------------------------------------------------- media_kind


def test_media_kind(tmp_path: Path) -> None:
    assert media_kind(MEDIA / "hopper_64x64.png") == "image"
    assert media_kind(AVI) == "video"
    assert media_kind(FRAMES) == "video"
    upper = tmp_path / "CLIP.MP4"
    upper.write_bytes(b"x")
    assert media_kind(upper) == "video"
    assert ".webp" in IMAGE_EXTENSIONS and ".mkv" in VIDEO_EXTENSIONS


def test_media_kind_missing(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        media_kind(tmp_path / "gone.jpg")


def test_media_kind_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(b"%PDF")
    with pytest.raises(MediaError, match=r"unsupported extension '\.pdf'.*\.mp4.*\.png"):
        media_kind(path)


# ------------------------------------------------------------------------------------------- sampling


def test_sample_frame_indices_reference() -> None:
    assert sample_frame_indices(24, 8) == REF_8
    assert sample_frame_indices(24, 16) == REF_16
    assert sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]
    assert sample_frame_indices(1, 2) == [0, 0]


@pytest.mark.parametrize(("total", "frames"), [(0, 8), (24, 0), (-1, 3)])
def test_sample_frame_indices_rejects_bad_counts(total: int, frames: int) -> None:
    with pytest.raises(MediaError, match="at least 1|Cannot sample"):
        sample_frame_indices(total, frames)


def test_fps_frame_indices() -> None:
    assert fps_frame_indices(24, 12.0, 4.0, None) == [0, 3, 6, 9, 12, 15, 18, 21]
    # 100 frames at 30 fps last 3.33 s; at 2 fps the timestamps are 0, 0.5, ..., 3.0.
    assert fps_frame_indices(100, 30.0, 2.0, None) == [0, 15, 30, 45, 60, 75, 90]
    # Too many timestamps: uniform over the whole clip, not the first seconds.
    assert fps_frame_indices(24, 12.0, 4.0, 5) == [0, 6, 12, 17, 23]
    assert fps_frame_indices(24, 12.0, 4.0, 8) == [0, 3, 6, 9, 12, 15, 18, 21]
    # A clip shorter than one sampling period still gives one frame; sampling above the native rate clamps.
    assert fps_frame_indices(10, 29.97, 1.0, None) == [0]
    assert fps_frame_indices(2, 1.0, 3.0, None) == [0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- videos


def _assert_frames_match_pngs(video: Video) -> None:
    assert len(video.frames) == len(video.indices)
    for frame, index in zip(video.frames, video.indices):
        assert frame.mode == "RGB" and frame.size == (176, 144)
        np.testing.assert_array_equal(np.asarray(frame), _frame_png(index))


@pytest.mark.parametrize(("num_frames", "expected"), [(8, REF_8), (16, REF_16)])
def test_load_video_file(num_frames: int, expected: list[int]) -> None:
    video = load_video(AVI, num_frames=num_frames)
    assert video.indices == expected
    assert video.num_total_frames == 24
    assert video.native_fps == 12.0
    assert video.source == str(AVI)
    _assert_frames_match_pngs(video)


@pytest.mark.parametrize(("num_frames", "expected"), [(8, REF_8), (16, REF_16)])
def test_load_frame_folder(num_frames: int, expected: list[int]) -> None:
    video = load_video(FRAMES, num_frames=num_frames)
    assert video.indices == expected
    assert video.num_total_frames == 24
    assert video.native_fps is None
    _assert_frames_match_pngs(video)


def test_load_video_fps() -> None:
    video = load_video(AVI, num_frames=32, fps=4)
    assert video.indices == [0, 3, 6, 9, 12, 15, 18, 21]
    _assert_frames_match_pngs(video)
    capped = load_video(AVI, num_frames=32, fps=4, max_frames=5)
    assert capped.indices == [0, 6, 12, 17, 23]
    _assert_frames_match_pngs(capped)
    # Without max_frames, num_frames is the cap.
    assert load_video(AVI, num_frames=5, fps=4).indices == [0, 6, 12, 17, 23]
    # A frame folder has no frame rate: fps falls back to uniform sampling.
    assert load_video(FRAMES, num_frames=8, fps=4).indices == REF_8


def test_load_video_from_bytes() -> None:
    video = load_video(AVI.read_bytes(), num_frames=8)
    assert video.indices == REF_8 and video.num_total_frames == 24 and video.native_fps == 12.0
    _assert_frames_match_pngs(video)


def test_duplicate_indices_give_repeated_independent_frames(tmp_path: Path) -> None:
    for i in range(3):
        shutil.copy(FRAMES / f"{i:04d}.png", tmp_path / f"{i:04d}.png")
    video = load_video(tmp_path, num_frames=5)
    assert video.indices == [0, 0, 1, 2, 2]
    _assert_frames_match_pngs(video)
    assert video.frames[0] is not video.frames[1]
    file_video = load_video(AVI, num_frames=30)
    assert file_video.indices == sample_frame_indices(24, 30) and len(file_video.frames) == 30
    _assert_frames_match_pngs(file_video)


def test_frame_folder_ignores_non_images_and_hidden_files(tmp_path: Path) -> None:
    for i in (0, 5, 10):
        shutil.copy(FRAMES / f"{i:04d}.png", tmp_path / f"f{i:02d}.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0junk")
    (tmp_path / ".hidden.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub.png").mkdir()
    video = load_video(tmp_path, num_frames=3)
    assert video.num_total_frames == 3 and video.indices == [0, 1, 2]
    for frame, src in zip(video.frames, (0, 5, 10)):
        np.testing.assert_array_equal(np.asarray(frame), _frame_png(src))


def test_mostly_missing_video_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.avi"
    path.write_bytes(AVI.read_bytes()[: len(AVI.read_bytes()) // 5])   # 1 of 24 declared frames decodes
    with pytest.raises(MediaError, match="only 1 of its 24 frames decode"):
        load_video(path, num_frames=8)


@pytest.mark.parametrize("keep", [0.5, 0.7])
def test_truncated_video_keeps_only_real_frames(tmp_path: Path, keep: float) -> None:
    # At 50% the demuxer sees one more (partial) packet than frames that decode, and the indices for the true
    # count include frames the first pass did not keep: this exercises the second decode pass.
    data = AVI.read_bytes()
    path = tmp_path / "cut.avi"
    path.write_bytes(data[: int(len(data) * keep)])
    video = load_video(path, num_frames=8)
    # Documented behaviour: N becomes the number of frames that decode, and indices follow that N.
    assert 1 <= video.num_total_frames < 24
    assert video.indices == sample_frame_indices(video.num_total_frames, 8)
    _assert_frames_match_pngs(video)


def test_video_with_no_decodable_frames(tmp_path: Path) -> None:
    data = AVI.read_bytes()
    first_chunk = data.index(b"00dc", data.index(b"movi"))
    path = tmp_path / "headers_only.avi"
    path.write_bytes(data[: first_chunk + 18])
    with pytest.raises(MediaError, match="contains no decodable video frames") as info:
        load_video(path, num_frames=8)
    assert "headers_only.avi" in str(info.value)


def test_load_video_missing(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        load_video(tmp_path / "gone.mp4", num_frames=8)


def test_non_video_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "fake.mp4"
    path.write_text("definitely not a video\n" * 50)
    with pytest.raises(MediaError, match="not a video or cannot be opened") as info:
        load_video(path, num_frames=8)
    assert "fake.mp4" in str(info.value)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    with pytest.raises(MediaError, match="has no video stream"):
        load_video(path, num_frames=4)


def test_empty_frame_folder(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="is empty"):
        load_video(tmp_path, num_frames=8)


def test_frame_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no frames here")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(MediaError, match="contains no image files"):
        load_video(tmp_path, num_frames=8)


def test_video_frame_over_max_pixels() -> None:
    with pytest.raises(MediaError, match="exceeds the limit of 1000"):
        load_video(AVI, num_frames=8, max_pixels=1000)
    with pytest.raises(MediaError, match="exceeds the limit of 1000"):
        load_video(FRAMES, num_frames=8, max_pixels=1000)


@pytest.mark.parametrize(
    "kwargs", [{"num_frames": 0}, {"num_frames": 8, "fps": -1.0}, {"num_frames": 8, "max_frames": 0}]
)
def test_load_video_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(MediaError, match="num_frames|fps|max_frames"):
        load_video(AVI, **kwargs)


def test_media_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_image(b"garbage bytes")

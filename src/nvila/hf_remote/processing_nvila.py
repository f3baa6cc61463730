"""The processor of NVILA's "-hf" folders: chat text with media placeholders + images / videos -> token ids with
every placeholder expanded, and the pixels the model encodes.

Self-contained (stdlib, numpy, PIL, torch, transformers 4.5x and 5.x): ``nvila convert --to hf`` copies this
file into the folder (``processing_nvila.py``; ``processing_nvila_lite.py`` for NVILA-Lite), where
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` finds it through ``processor_config.json``'s
``auto_map``; the settings are that file's other entries. It reproduces nvila's own processing exactly, which
tests/test_hf_processor.py checks: the tile geometry of ``nvila.processing.tiling``, the pixel arithmetic of
``nvila.processing.image``, the message rendering of ``nvila.processing.chat`` and the embedding blocks of
``nvila.model.nvila``, written out as token ids.

Expansion: every embedding block becomes (its visual-token count x the media token id) + the end ids (the
tokenised "\\n"), so ``len(input_ids)`` is the length the LLM sees once the media embeddings are in place:

* ``dynamic_s2`` (NVILA), the only image of a prompt: one block of ``tokens_per_tile * rows * cols`` ids, the
  last scale's grid (``block_sizes``); its tiles: one per square scale (1, 2x2, ...), then the grid.
* ``dynamic`` (NVILA-Lite), the only image of a prompt: a grid of 1..12 tiles plus a thumbnail when there is
  more than one; every tile is a placeholder of its own with one block of ``tokens_per_tile``, and the tile
  placeholders are joined by a literal "\\n" in the text (nvila's prompt writes ``"<image>\\n"`` per tile and
  strips the message, so the last tile's "\\n" is the one ``apply_chat_template`` writes after the placeholder).
* any other image (``resize`` models, every image of a prompt with several): one tile, ``tokens_per_tile``.
* a video: basic encoder, one block of ``tokens_per_tile`` per frame; TSP, for each pool ``(t, h, w)``,
  ``frames / t`` blocks of ``(side / h) * (side / w)`` ids (``side`` = ``tile_token_side``).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_MODES = ("dynamic_s2", "dynamic", "resize")
VIDEO_ENCODERS = ("basic", "tsp")

Tile = tuple[tuple[int, int], tuple[int, int, int, int]]   # resize the image to (W, H), then crop (l, t, r, b)


# ---- tile geometry (nvila.processing.tiling) -------------------------------------------------------------
def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with ``min_num <= cols*rows <= max_num``, in the reference's tie-break order (a set
    filled n-major, i-major, j-minor, stably sorted by tile count)."""
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """The grid whose cols/rows is closest to the image's aspect; on an exact tie a later grid wins only if
    the image has more than half the pixels that grid would hold."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def grid_tiles(cols: int, rows: int, tile: int) -> list[Tile]:
    size = (tile * cols, tile * rows)
    return [(size, (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]


def sample_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """nvila's frame choice: ``round(linspace(0, num_total - 1, num_frames))``; duplicates are kept."""
    return [int(i) for i in np.round(np.linspace(0, num_total - 1, num_frames)).astype(int)]


# ---- media readers ---------------------------------------------------------------------------------------
def to_rgb(image: Any) -> Image.Image:
    """A PIL image, a path, encoded bytes or a uint8 array (H, W[, C] or C, H, W) as an RGB PIL image,
    converted like ``PIL.Image.open(path).convert("RGB")``."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if re.match(r"^[a-z]+://", name):
            raise ValueError(f"{name!r}: URLs are not fetched; pass a PIL image, a local path or the file's bytes")
        with Image.open(name) as im:
            return im.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)                                 # (C, H, W) -> (H, W, C)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"image arrays must be uint8 (H, W), (H, W, C) or (C, H, W); got {arr.dtype} "
                             f"{tuple(image.shape)}")
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"an image must be a PIL image, a path, bytes or a uint8 array, got {type(image).__name__}")


def frame_sources(video: Any) -> list[Any]:
    """The frames of one video, not yet decoded: a list of frames, a (T, H, W, C) / (T, C, H, W) array, or
    the image files of a frame folder in name order."""
    if isinstance(video, (str, os.PathLike)):
        folder = os.fspath(video)
        if not os.path.isdir(folder):
            raise ValueError(f"video {folder!r} is neither a video file nor a folder of frame images")
        files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                 if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                 and os.path.isfile(os.path.join(folder, n))]
        if not files:
            raise ValueError(f"frame folder {folder!r} contains no image files")
        return files
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4:
        return list(video)
    if isinstance(video, (list, tuple)) and video:
        return list(video)
    raise ValueError("a video must be a non-empty list of frames, a 4-D frame array or a folder of frame images")


def decode_video_file(path: str, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames of a video file, chosen as nvila chooses them (``round(linspace)`` over the frames
    that decode), as RGB images. Needs PyAV (optional: frames and frame folders need nothing)."""
    try:
        import av
    except ImportError:
        raise ValueError(f"decoding the video file {path!r} needs PyAV (pip install av); or pass its frames "
                         "(PIL images or uint8 arrays) or a folder of frame images") from None

    def decoded() -> Any:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            try:
                for packet in container.demux(stream):
                    yield from packet.decode()
            except av.FFmpegError:     # a damaged tail: the video is the frames that decode
                return

    total = sum(1 for _ in decoded())
    if total == 0:
        raise ValueError(f"{path!r} contains no decodable video frames")
    indices = sample_frame_indices(total, num_frames)
    wanted = set(indices)
    kept = {i: frame.to_image() for i, frame in enumerate(decoded()) if i in wanted}
    return [kept[i] for i in indices]


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


class NVILAProcessor(ProcessorMixin):
    """Tokenizer + NVILA's media geometry: ``processor(text=..., images=..., videos=...)`` returns

    * ``input_ids`` / ``attention_mask`` (B, L): placeholders expanded (module docstring);
    * ``pixel_values`` (N, 3, S, S) float32: every tile of every image of the batch, in order;
    * ``block_sizes``: one entry per image, ``[rows, cols]`` of the last S2 scale for a Dynamic-S2 single
      image, ``None`` otherwise (what SGLang's NVILA model reads);
    * ``pixel_values_videos`` (F, 3, S, S) float32: every frame of every video, in order, and
      ``video_num_frames`` (V,): each video's frame count, to regroup them.

    ``text`` holds one ``image_token`` per image and one ``video_token`` per video, in order, as
    :meth:`apply_chat_template` writes them.
    """

    attributes: ClassVar[list[str]] = ["tokenizer"]     # transformers 4.5x; 5.x reads the __init__ signature
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer: Any, image_mode: str, tile_size: int, s2_scales: Sequence[int], min_tiles: int,
                 max_tiles: int, tokens_per_tile: int, tile_token_side: int, video_encoder: str,
                 video_pool_sizes: Sequence[Sequence[int]], num_video_frames: int, image_mean: Sequence[float],
                 image_std: Sequence[float], rescale_factor: float, image_token: str, video_token: str,
                 chat_template: str | None = None) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode {image_mode!r} is not one of {IMAGE_MODES}")
        if image_mode == "dynamic_s2" and not s2_scales:
            raise ValueError("image_mode 'dynamic_s2' needs s2_scales")
        if tokens_per_tile != tile_token_side * tile_token_side:
            raise ValueError(f"tokens_per_tile {tokens_per_tile} is not tile_token_side**2 ({tile_token_side}**2)")
        if video_encoder not in VIDEO_ENCODERS:
            raise ValueError(f"video_encoder {video_encoder!r} is not one of {VIDEO_ENCODERS}")
        if video_encoder == "tsp" and not video_pool_sizes:
            raise ValueError("video_encoder 'tsp' needs video_pool_sizes [[t, h, w], ...]")
        self.image_mode, self.tile_size = image_mode, int(tile_size)
        self.s2_scales = [int(s) for s in s2_scales]
        self.min_tiles, self.max_tiles = int(min_tiles), int(max_tiles)
        self.tokens_per_tile, self.tile_token_side = int(tokens_per_tile), int(tile_token_side)
        self.video_encoder = video_encoder
        self.video_pool_sizes = [[int(v) for v in p] for p in video_pool_sizes]
        self.num_video_frames = int(num_video_frames)
        self.image_mean, self.image_std = [float(v) for v in image_mean], [float(v) for v in image_std]
        self.rescale_factor = float(rescale_factor)
        self.image_token, self.video_token = image_token, video_token
        super().__init__(tokenizer, chat_template=chat_template)
        self.image_token_id = self._token_id(image_token)
        self.video_token_id = self._token_id(video_token)
        self.end_ids = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        self._placeholder = re.compile(f"({re.escape(image_token)}|{re.escape(video_token)})")

    def _token_id(self, token: str) -> int:
        ids = list(self.tokenizer(token, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            raise ValueError(f"the tokenizer does not know the media token {token!r} as one token (got ids {ids})")
        return ids[0]

    # ---- images ------------------------------------------------------------------------------------------
    def plan_image(self, width: int, height: int, single: bool) -> tuple[str, list[Tile], tuple[int, int] | None]:
        """(kind, tiles, block) of one image; ``single``: it is the only image of its prompt."""
        tile = self.tile_size
        if single and self.image_mode == "dynamic_s2":
            tiles: list[Tile] = []
            for scale in self.s2_scales[:-1]:
                tiles += grid_tiles(scale // tile, scale // tile, tile)
            k_last = self.s2_scales[-1] // tile
            cols, rows = closest_grid(width, height, candidate_grids(k_last * k_last, self.max_tiles), tile)
            return "dynamic_s2", tiles + grid_tiles(cols, rows, tile), (rows, cols)
        if single and self.image_mode == "dynamic":
            cols, rows = closest_grid(width, height, candidate_grids(self.min_tiles, self.max_tiles), tile)
            tiles = grid_tiles(cols, rows, tile)
            if len(tiles) > 1:
                tiles.append(((tile, tile), (0, 0, tile, tile)))          # the thumbnail goes last
            return "dynamic", tiles, None
        return "single", [((tile, tile), (0, 0, tile, tile))], None

    def normalize(self, tiles: list[Image.Image]) -> torch.Tensor:
        """RGB tiles -> (N, 3, S, S) float32: ``float32(uint8 * rescale in float64)``, then (x - mean) / std."""
        arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])                   # (N, S, S, 3)
        x = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))          # (N, 3, S, S)

    def image_item(self, image: Any, single: bool) -> tuple[torch.Tensor, list[list[int]], list[int] | None]:
        """(pixels (N, 3, S, S), visual-token counts of each placeholder's blocks, block_sizes entry)."""
        rgb = to_rgb(image)
        kind, tiles, block = self.plan_image(rgb.width, rgb.height, single)
        resized: dict[tuple[int, int], Image.Image] = {}
        crops = []
        for size, box in tiles:
            if size not in resized:         # Pillow's default filter, one resize per target size, as nvila
                resized[size] = rgb.resize(size)
            crops.append(resized[size].crop(box))
        if kind == "dynamic_s2":
            return self.normalize(crops), [[self.tokens_per_tile * block[0] * block[1]]], list(block)
        return self.normalize(crops), [[self.tokens_per_tile] for _ in crops], None

    # ---- videos ------------------------------------------------------------------------------------------
    def video_item(self, video: Any, num_frames: int, sample: bool) -> tuple[torch.Tensor, list[int]]:
        """(frames (T, 3, S, S), visual-token counts of the video's blocks)."""
        if isinstance(video, (str, os.PathLike)) and os.path.isfile(video):
            sources, sample = decode_video_file(os.fspath(video), num_frames), False
        else:
            sources = frame_sources(video)
        if sample or len(sources) > num_frames:
            sources = [sources[i] for i in sample_frame_indices(len(sources), num_frames)]
        size = (self.tile_size, self.tile_size)
        pixels = self.normalize([to_rgb(f).resize(size) for f in sources])
        T = len(sources)
        if self.video_encoder == "basic":
            return pixels, [self.tokens_per_tile] * T
        side, blocks = self.tile_token_side, []
        for t, h, w in self.video_pool_sizes:
            if T % t or side % h or side % w:
                raise ValueError(f"temporal pooling {t}x{h}x{w} needs a frame count divisible by {t}, got {T} "
                                 "frames; pass num_frames (with do_sample_frames=True) as a multiple of it")
            blocks += [(side // h) * (side // w)] * (T // t)
        return pixels, blocks

    # ---- the call ----------------------------------------------------------------------------------------
    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, videos: Any = None,
                 audio: Any = None, *, num_frames: int | None = None, do_sample_frames: bool | None = None,
                 return_tensors: str | None = "pt", padding: bool | str = False, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None, add_special_tokens: bool = False, **kwargs: Any) -> BatchFeature:
        """Expand the placeholders of ``text`` (a prompt or a batch of them) and encode the media.

        ``images``: PIL images, paths, bytes or uint8 arrays, flat or one list per prompt, in placeholder order.
        ``videos``: one video (a list of frames, a 4-D array, a frame folder) or a list of them. A video is
        sampled to ``num_frames`` (default ``num_video_frames``) with nvila's ``round(linspace)`` rule when
        ``do_sample_frames`` is true or it has more frames than that; otherwise its frames are kept.
        """
        audio = kwargs.pop("audios", audio)            # SGLang's name
        if kwargs:
            raise TypeError(f"NVILAProcessor got unexpected arguments {sorted(kwargs)}")
        if audio is not None:
            raise ValueError("NVILA takes no audio")
        if text is None:
            raise ValueError("text is required: a prompt with one placeholder per image and video "
                             f"({self.image_token!r}, {self.video_token!r}), e.g. from apply_chat_template")
        texts = [text] if isinstance(text, str) else list(text)
        image_list, video_list = self._image_list(images), self._video_list(videos)
        n = self.num_video_frames if num_frames is None else int(num_frames)
        if n < 1:
            raise ValueError(f"num_frames must be >= 1, got {n}")
        counts = [(self._placeholder.findall(t).count(self.image_token),
                   self._placeholder.findall(t).count(self.video_token)) for t in texts]
        want = (sum(c[0] for c in counts), sum(c[1] for c in counts))
        if want != (len(image_list), len(video_list)):
            raise ValueError(f"the text has {want[0]} {self.image_token!r} and {want[1]} {self.video_token!r} "
                             f"placeholders but {len(image_list)} images and {len(video_list)} videos were given; "
                             "every image and video needs exactly one placeholder, in order")
        media: dict[str, list] = {"pixels": [], "block_sizes": [], "frames": [], "frame_counts": []}
        all_ids = []
        for t, (n_img, n_vid) in zip(texts, counts):
            its_images, image_list = image_list[:n_img], image_list[n_img:]
            its_videos, video_list = video_list[:n_vid], video_list[n_vid:]
            all_ids.append(self._prompt_ids(t, its_images, its_videos, n, bool(do_sample_frames), add_special_tokens,
                                            media))
        return self._batch(all_ids, media, isinstance(text, str), return_tensors, padding, pad_to_multiple_of,
                           max_length)

    def _prompt_ids(self, text: str, images: list[Any], videos: list[Any], num_frames: int, sample: bool,
                    add_special_tokens: bool, media: dict[str, list]) -> list[int]:
        """The expanded ids of one prompt; its media's pixels and geometry are appended to ``media``."""
        queues: dict[int, list[list[int]]] = {self.image_token_id: [], self.video_token_id: []}
        for image in images:
            pixels, blocks, block = self.image_item(image, single=len(images) == 1)
            media["pixels"].append(pixels)
            media["block_sizes"].append(block)
            queues[self.image_token_id] += blocks
        for video in videos:
            frames, blocks = self.video_item(video, num_frames, sample)
            media["frames"].append(frames)
            media["frame_counts"].append(frames.shape[0])
            queues[self.video_token_id].append(blocks)
        tiles = len(queues[self.image_token_id])
        if len(images) == 1 and tiles > 1:    # NVILA-Lite's tiling: one placeholder per tile, joined by "\n"
            text = text.replace(self.image_token, (self.image_token + "\n") * (tiles - 1) + self.image_token)
        return self._expand(list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), queues)

    def _expand(self, ids: list[int], queues: dict[int, list[list[int]]]) -> list[int]:
        out: list[int] = []
        for i in ids:
            if i not in queues:
                out.append(i)
                continue
            if not queues[i]:
                raise ValueError("the tokenised text has more media placeholders than media; does the text contain "
                                 "the placeholder tokens inside other text?")
            for count in queues[i].pop(0):
                out += [i] * count + self.end_ids
        if any(queues.values()):
            raise ValueError("the tokenised text has fewer media placeholders than media")
        return out

    def _batch(self, all_ids: list[list[int]], media: dict[str, list], unbatched: bool, return_tensors: str | None,
               padding: bool | str, pad_to_multiple_of: int | None, max_length: int | None) -> BatchFeature:
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        # transformers' advice to tokenise with padding instead does not apply: ids are expanded after tokenising
        getattr(self.tokenizer, "deprecation_warnings", {})["Asking-to-pad-a-fast-tokenizer"] = True
        enc = self.tokenizer.pad({"input_ids": all_ids}, padding=padding, max_length=max_length,
                                 pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors)
        data: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if return_tensors is None and unbatched:
            data = {k: v[0] for k, v in data.items()}
        as_array = (lambda x: x) if return_tensors == "pt" else (lambda x: x.numpy())
        if media["pixels"]:
            data["pixel_values"] = as_array(torch.cat(media["pixels"]))
            data["block_sizes"] = media["block_sizes"]
        if media["frames"]:
            data["pixel_values_videos"] = as_array(torch.cat(media["frames"]))
            data["video_num_frames"] = as_array(torch.tensor(media["frame_counts"], dtype=torch.long))
        return BatchFeature(data=data, tensor_type=None)

    @staticmethod
    def _image_list(images: Any) -> list[Any]:
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            return [images]
        flat: list[Any] = []
        for x in images:                # one list per prompt, or a flat list
            flat += list(x) if isinstance(x, (list, tuple)) else [x]
        return flat

    @staticmethod
    def _video_list(videos: Any) -> list[Any]:
        if videos is None:
            return []
        if isinstance(videos, (str, os.PathLike)) or (isinstance(videos, (np.ndarray, torch.Tensor))
                                                      and videos.ndim == 4):
            return [videos]
        videos = list(videos)
        return [videos] if videos and _is_frame(videos[0]) else videos

    # ---- chat --------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """Render messages as nvila does, then with the chat template.

        Content may be a string or a list of parts ``{"type": "text", "text": ...}``, ``{"type": "image",
        "image": ...}``, ``{"type": "video", "video": ...}``: media become placeholders concatenated with the
        text (no separator; NVILA-Lite's only image writes ``"<image>\\n"``), placeholders typed in text are
        removed, the content is stripped. ``tokenize=True`` also runs the processor on the parts' media
        (``return_dict=True`` returns all its outputs, else ``input_ids``).
        """
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(
            conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        tokenize, return_dict = kwargs.pop("tokenize", False), kwargs.pop("return_dict", False)
        call = {k: kwargs.pop(k) for k in ("return_tensors", "padding", "num_frames", "do_sample_frames",
                                            "pad_to_multiple_of") if k in kwargs}
        template = chat_template or self.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        texts, images, videos = [], [], []
        for conv in conversations:
            messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
            n_images = sum(1 for m in messages for p in _parts(m) if p.get("type") == "image")
            lite_single = self.image_mode == "dynamic" and n_images == 1
            rendered = []
            for m in messages:
                content, imgs, vids = self._render(m, lite_single)
                rendered.append({**m, "content": content})
                images += imgs
                videos += vids
            texts.append(self.tokenizer.apply_chat_template(rendered, chat_template=template, tokenize=False,
                                                            **kwargs))
        if not tokenize:
            return texts if batched else texts[0]
        out = self(text=texts, images=images or None, videos=videos or None, **call)
        return out if return_dict else out["input_ids"]

    def _render(self, message: dict[str, Any], lite_single: bool) -> tuple[Any, list[Any], list[Any]]:
        content = message.get("content")
        if content is None:
            return None, [], []
        text, images, videos = "", [], []
        for part in _parts(message):
            kind = part.get("type")
            if kind == "text":
                text += self._strip_placeholders(part.get("text", ""))
            elif kind == "image":
                images.append(_media(part, "image"))
                text += self.image_token + ("\n" if lite_single else "")
            elif kind == "video":
                videos.append(_media(part, "video"))
                text += self.video_token
            else:
                raise ValueError(f"unknown content part {part!r} (types: text, image, video)")
        return text.strip(), images, videos

    def _strip_placeholders(self, text: str) -> str:
        for token in (self.image_token, self.video_token):
            text = text.replace(token, "")
        return text


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "text", "text": p} if isinstance(p, str) else p for p in content]


def _media(part: dict[str, Any], kind: str) -> Any:
    for key in (kind, "path", "url"):
        if part.get(key) is not None:
            return part[key]
    raise ValueError(f"a {kind} part needs a {kind!r} (or 'path') entry: {part!r}")


class NVILALiteProcessor(NVILAProcessor):
    """NVILA-Lite's processor: the same code; the settings (image_mode 'dynamic') make the difference."""

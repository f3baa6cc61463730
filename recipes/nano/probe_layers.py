"""Which DINOv2 layer should NVILA-Nano read? Colour and shape signal per hidden layer on easy-VQA.

DINOv2 was trained with colour-jitter augmentation, so its later layers are partly colour-invariant, and
easy-VQA asks about colours. For each of the 13 hidden states (embeddings + 12 blocks) this measures, on
N easy-VQA train images (first 180 fit, rest held out):

  colour_var_frac   share of the variance of the shape's tokens (the 64 tokens farthest from the image's
                    median token, LayerNorm-ed as the projector sees them) explained by the shape's colour
  colour_ncm        nearest-class-mean colour accuracy on those tokens (no feature scaling: how directly a
                    freshly initialised projector can read colour)
  shape_ncm         nearest-class-mean shape accuracy on the 3x3-pooled 10x10 token grid

    python recipes/nano/probe_layers.py --data data/easy-vqa/train.jsonl --out docs/perf/nano-dinov2-layers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def labelled_images(data: Path, n: int) -> tuple[list[str], list[str], list[str]]:
    colour, shape = {}, {}
    for line in data.open():
        ex = json.loads(line)
        conv = ex["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            text = q["value"].lower().replace("<image>\n", "")
            if text.startswith("what color"):
                colour[ex["image"]] = a["value"]
            elif a["value"] in ("circle", "rectangle", "triangle") and text.startswith("what"):
                shape[ex["image"]] = a["value"]
    images = [k for k in colour if k in shape][:n]
    return images, [colour[k] for k in images], [shape[k] for k in images]


@torch.inference_mode()
def hidden_states(images: list[str], base: Path) -> torch.Tensor:
    """(N, 13, 1024, 384) patch tokens of every hidden layer, at 448 px as NVILA-Nano tiles them."""
    from transformers import Dinov2Model

    vt = Dinov2Model.from_pretrained(base / "vision_tower").eval()
    pre = json.loads((base / "vision_tower" / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(pre[k]).view(3, 1, 1) for k in ("image_mean", "image_std"))
    out = []
    for i in range(0, len(images), 8):
        x = torch.stack([(torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((448, 448), Image.BICUBIC)))
                          .permute(2, 0, 1).float() / 255 - mean) / std for p in images[i:i + 8]])
        hs = vt(pixel_values=x, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[:, 1:] for h in hs], 1).half())
    return torch.cat(out).float()


def ncm(x: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray) -> float:
    classes = sorted(set(y[fit]))
    centres = np.stack([x[fit][y[fit] == c].mean(0) for c in classes])
    pred = np.array(classes)[((x[held][:, None] - centres[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == y[held]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/easy-vqa/train.jsonl")
    ap.add_argument("--base", default=None, help="NVILA-Nano base folder (default: build it)")
    ap.add_argument("-n", type=int, default=240)
    ap.add_argument("--cache", default=None, help="save/reuse the hidden states here (.pt)")
    ap.add_argument("--out", default="docs/perf/nano-dinov2-layers.json")
    args = ap.parse_args()
    images, colour, shape = labelled_images(Path(args.data), args.n)
    if args.cache and Path(args.cache).is_file():
        feats = torch.load(args.cache)["F"]
    else:
        from nvila.builders.nano import build

        feats = hidden_states(images, Path(args.base) if args.base else build())
        if args.cache:
            torch.save({"F": feats}, args.cache)
    colour, shape = np.array(colour), np.array(shape)
    n = len(images)
    fit, held = np.arange(n) < 180, np.arange(n) >= 180
    rows = []
    for layer in range(feats.shape[1]):
        h = torch.nn.functional.layer_norm(feats[:, layer], (feats.shape[-1],))
        dev = (h - h.median(1, keepdim=True).values).norm(dim=-1)
        idx = dev.topk(64, dim=1).indices
        tok = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1])).mean(1).numpy()
        centred = tok - tok.mean(0)
        between = sum((centred[colour == c].mean(0) ** 2).sum() * (colour == c).sum() for c in set(colour))
        grid = h.view(n, 32, 32, -1)[:, :30, :30].reshape(n, 10, 3, 10, 3, -1).mean((2, 4)).reshape(n, -1).numpy()
        rows.append({"hidden_state": layer, "select_layer": layer - (feats.shape[1]),
                     "colour_var_frac": round(float(between / (centred ** 2).sum()), 3),
                     "colour_ncm": round(ncm(tok, colour, fit, held), 3),
                     "shape_ncm": round(ncm(grid, shape, fit, held), 3)})
        print(rows[-1])
    from nvila.base.files import write_json
    from nvila.base.provenance import provenance

    write_json(args.out, {"images": n, "fit": int(fit.sum()), "held_out": int(held.sum()), "layers": rows,
                          "provenance": provenance(model=str(args.base or "nvila:nano-base"), data=args.data)})


if __name__ == "__main__":
    main()

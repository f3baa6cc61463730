"""Writes the bundled sample data of recipes/examples (run from this folder; output is committed).

shapes.jsonl (LLaVA form): 12 images of a coloured square or circle, each asked "what shape" and "what
colour" in one two-turn conversation. motion.jsonl (OpenAI form): 4 clips (frame folders) of a square
moving left or right, asked which way it moves.
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220)}
root = Path("data")
(root / "images").mkdir(parents=True, exist_ok=True)
records = []
for i, (shape, (color, rgb)) in enumerate((s, c) for s in ("square", "circle") for c in COLORS.items()):
    for variant in range(2):
        img = Image.new("RGB", (48, 48), (245, 245, 245))
        d = ImageDraw.Draw(img)
        box = (8 + 6 * variant, 10, 36 + 6 * variant, 38)
        (d.rectangle if shape == "square" else d.ellipse)(box, fill=rgb)
        name = f"images/{color}_{shape}_{variant}.png"
        img.save(root / name, optimize=True)
        records.append({"id": f"shape-{len(records)}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"},
            {"from": "gpt", "value": f"A {shape}."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": f"It is {color}."}]})
(root / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

clips = []
for k, direction in enumerate(("left", "right", "left", "right")):
    folder = root / "clips" / f"{direction}_{k}"
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(8):
        img = Image.new("RGB", (32, 32), (250, 250, 250))
        x = 4 + 3 * t if direction == "right" else 25 - 3 * t
        ImageDraw.Draw(img).rectangle((x, 12, x + 6, 18), fill=(20, 20, 20) if k < 2 else (200, 40, 40))
        img.save(folder / f"{t:03d}.png", optimize=True)
    clips.append({"id": f"motion-{k}", "messages": [
        {"role": "user", "content": [{"type": "video", "video": f"clips/{direction}_{k}"},
                                     {"type": "text", "text": "Which way does the square move?"}]},
        {"role": "assistant", "content": f"It moves to the {direction}."}]})
(root / "motion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clips))

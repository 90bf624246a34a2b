"""Rebuild the demo photos from the scikit-image wheel (run once; the output is committed).

    pip download --no-deps scikit-image -d /tmp/ski && cd /tmp/ski && unzip -q *.whl 'skimage/data/*'
    python pipeline/demo_photos/build.py /tmp/ski/skimage/data

Each class is one public-domain/CC0 source photo (see README.txt); its samples are different random
crops (25-100 % of the area, aspect 3:4-4:3) resized to a short side of 160-256 px, JPEG quality 90.
"""

import random
import sys
from pathlib import Path

from PIL import Image

SOURCES = {  # class -> file in skimage/data
    "astronaut": "astronaut.png",
    "camera": "camera.png",  # greyscale: stays a greyscale JPEG
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "galaxy": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "tissue": "ihc.png",
}
PER_SPLIT = {"train": 8, "val": 2}


def crop(im: Image.Image, rng: random.Random) -> Image.Image:
    w, h = im.size
    area = rng.uniform(0.25, 1.0) * w * h
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    short = rng.randint(160, 256)
    scale = short / min(cw, ch)
    return im.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)


def main(data: Path, out: Path) -> None:
    rng = random.Random(0)
    for cls, name in SOURCES.items():
        im = Image.open(data / name)
        im = im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB")
        for split, n in PER_SPLIT.items():
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                crop(im, rng).save(folder / f"{cls}_{split}_{i:02d}.jpg", quality=90)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent)

"""Realistic inputs for the models bench_onnx_in quantizes, made offline.

* **Text lines** for PP-OCR's direction classifier: words in one of the DejaVu fonts, dark on a
  light patch of a photograph (scikit-image's sample images), half of them turned 180°, resized
  to height 48 and padded to 192 as rapidocr's classifier does; label 0 (upright) or 1 (turned).
* **Pages** for PP-OCR's text detector: a photograph with 2-6 text blocks printed on it, at
  ``size`` x ``size``; the mask of the printed text is the ground truth.

* **Photograph crops** for a YOLO detector: square crops of the photographs, in [0, 1].

The OCR inputs are normalized as rapidocr's config.yaml says ((x / 255 - 0.5) / 0.5, RGB, NCHW float32).
Different seeds give disjoint draws: calibrate on one, report on another.
"""

from __future__ import annotations

import glob
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("invoice total amount date paid order number customer address street city phone email "
         "shipping quantity price discount tax balance due account payment receipt station platform "
         "exit entrance north south open closed monday friday march april").split()


def fonts() -> list[str]:
    found = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf"))
    if not found:
        raise SystemExit("no DejaVu fonts under /usr/share/fonts/truetype/dejavu (apt-get install fonts-dejavu-core)")
    return found


def photographs() -> list[np.ndarray]:
    from skimage import data
    names = ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
    out = []
    for name in names:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(img[..., :3].astype(np.uint8))
    return out


def _phrase(rng: np.random.Generator) -> str:
    words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 4)))]
    if rng.random() < 0.5:
        words.append("".join(rng.choice(list(string.digits), int(rng.integers(2, 7)))))
    text = " ".join(words)
    return text.upper() if rng.random() < 0.3 else text.capitalize()


def _normalize(rgb: np.ndarray) -> np.ndarray:
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _patch(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    y = int(rng.integers(0, max(1, photo.shape[0] - h)))
    x = int(rng.integers(0, max(1, photo.shape[1] - w)))
    crop = Image.fromarray(photo[y:y + h, x:x + w]).resize((w, h))
    return crop


def photo_crops(count: int, seed: int, size: int) -> np.ndarray:
    """(count, 3, size, size) square crops of the photographs in [0, 1], as YOLO detectors take them."""
    rng = np.random.default_rng(seed)
    photos = photographs()
    out = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out.append((np.asarray(crop, np.float32) / 255.0).transpose(2, 0, 1))
    return np.stack(out)


def text_lines(count: int, seed: int, width: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """(count, 3, 48, width) text-line inputs (the classifier's width 192, the recognizer's 320) and
    their labels (1: turned 180°; only the classifier's lines are turned)."""
    rng = np.random.default_rng(seed)
    faces, photos = fonts(), photographs()
    images, labels = [], []
    for _ in range(count):
        text = _phrase(rng)
        font = ImageFont.truetype(faces[int(rng.integers(len(faces)))], int(rng.integers(24, 40)))
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left + 16, bottom - top + 12
        light = np.asarray(_patch(rng, photos, h, w), np.float32) * 0.35 + 255 * 0.65
        line = Image.fromarray(light.astype(np.uint8))
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        ImageDraw.Draw(line).text((8 - left, 6 - top), text, font=font, fill=ink)
        turned = bool(rng.random() < 0.5) and width == 192
        if turned:
            line = line.rotate(180)
        fit = min(width, max(8, int(round(48 * line.width / line.height))))
        padded = np.zeros((3, 48, width), np.float32)
        padded[:, :, :fit] = _normalize(np.asarray(line.resize((fit, 48), Image.BILINEAR)))
        images.append(padded)
        labels.append(int(turned))
    return np.stack(images), np.asarray(labels)


def pages(count: int, seed: int, size: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """(count, 3, size, size) detector inputs and the (count, size, size) masks of their text."""
    rng = np.random.default_rng(seed)
    faces, photos = fonts(), photographs()
    images, masks = [], []
    for _ in range(count):
        page = _patch(rng, photos, size, size)
        mask = Image.new("L", (size, size), 0)
        draw, mask_draw = ImageDraw.Draw(page), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(2, 7))):
            font = ImageFont.truetype(faces[int(rng.integers(len(faces)))], int(rng.integers(14, 36)))
            text = _phrase(rng)
            x, y = int(rng.integers(0, size // 2)), int(rng.integers(0, size - 40))
            box = draw.textbbox((x, y), text, font=font)
            backing = tuple(int(v) for v in rng.integers(200, 256, 3))
            if rng.random() < 0.6:
                draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=backing)
                ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            else:
                ink = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.text((x, y), text, font=font, fill=ink)
            mask_draw.text((x, y), text, font=font, fill=255)
        images.append(_normalize(np.asarray(page)))
        masks.append(np.asarray(mask) > 0)
    return np.stack(images), np.stack(masks)

"""Writes tests/fixtures/transforms.json: what PIL + torchvision make of a fixed image,
for tests/data.rs to check src/data/transforms.rs against (within one intensity level).

The 37x53 RGB image is a formula both sides can compute: pixel (x, y) =
((x*x + 3*y) % 256, (5*x + 2*y*y) % 256, (x*y + 7) % 256) -- smooth in places,
aliased in others, so rounding differences would show.

`resize` entries are raw PIL BILINEAR resizes (down, up, mixed; 50x17 and 20x5 take
Pillow 13's vertical-pass-first order). `eval` entries follow
torchvision's eval pipeline for PIL images, restated here so that torch is not needed:
Resize(int(size*256/224)) on the shorter side, long side int(new_short*long/short);
CenterCrop with offsets int(round((len - size) / 2.0)); ToTensor; Normalize with the
ImageNet mean/std, all in float32. Run: python3 scripts/make_transform_fixture.py
"""
import json
import os
import numpy as np
from PIL import Image

W, H = 37, 53
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def test_image():
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    rgb = np.stack([(x * x + 3 * y) % 256, (5 * x + 2 * y * y) % 256, (x * y + 7) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def eval_transform(img, size):
    short = int(size * 256 / 224)
    w, h = img.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img).astype(np.float32) / np.float32(255)
    x = (x - MEAN) / STD
    return x.transpose(2, 0, 1)


def main():
    img = test_image()
    out = {"width": W, "height": H, "pil_version": Image.__version__, "resize": [], "eval": []}
    for w, h in [(20, 31), (50, 17), (37, 90), (9, 5), (20, 5)]:
        r = np.asarray(img.resize((w, h), Image.BILINEAR))
        out["resize"].append({"width": w, "height": h, "hwc": r.reshape(-1).tolist()})
    for size in [16, 32]:
        x = eval_transform(img, size)
        out["eval"].append({"size": size, "chw": [round(float(v), 6) for v in x.reshape(-1)]})
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "transforms.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    main()

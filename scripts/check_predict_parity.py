#!/usr/bin/env python3
"""`distill predict --json` against PyTorch's eval-mode forward on the same PNG images.

    pip install torch torchvision safetensors pillow numpy
    cargo build --release
    python3 scripts/check_predict_parity.py            # torchvision resnet18, resnet34,
        # mobilenet_v2 (random weights, randomised BN statistics) on 256x256 PNGs
    python3 scripts/check_predict_parity.py --fixture  # writes tests/fixtures/predict/
        # (a CIFAR ResNet-8 and two small PNGs) for the committed test tests/predict.rs

Prints max |logit difference| per model and fails above 1e-3.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def smooth_image(w, h, seed):
    """A deterministic picture with structure at several scales (not noise, not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2), rng.uniform(0, 6.28)
            img[..., c] += np.sin(fx * x + fy * y + ph)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


def torch_logits(model, paths, size):
    tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model(x).numpy()


def ours(arch, classes, weights, paths, size, small_stem=False):
    exe = os.path.join(ROOT, "target", "release", "distill")
    cmd = [exe, "predict", "--arch", arch, "--num-classes", str(classes), "--weights", weights,
           "--image-size", str(size), "--json"] + (["--small-stem"] if small_stem else []) + paths
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return np.array([json.loads(l)["logits"] for l in out.splitlines()])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fixture", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.fixture:
        from make_model_fixtures import CifarResNet
        out = os.path.join(ROOT, "tests", "fixtures", "predict")
        os.makedirs(out, exist_ok=True)
        model = randomise(CifarResNet([1, 1, 1], 10), 1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "resnet8.safetensors"))
        paths = []
        for i, (w, h) in enumerate([(48, 40), (37, 53)]):
            path = os.path.join(out, f"image{i}.png")
            smooth_image(w, h, i).save(path)
            paths.append(path)
        logits = torch_logits(model, paths, 32)
        with open(os.path.join(out, "expected.json"), "w") as f:
            json.dump({"image_size": 32, "images": [os.path.basename(p) for p in paths], "logits": logits.tolist()}, f)
        print(f"wrote {out}")
        return
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(3):
            path = os.path.join(d, f"img{i}.png")
            smooth_image(256, 256, 100 + i).save(path)
            paths.append(path)
        for arch in ["resnet18", "resnet34", "mobilenet_v2"]:
            model = randomise(getattr(torchvision.models, arch)(num_classes=1000), 7)
            w = os.path.join(d, f"{arch}.safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, w)
            diff = np.abs(ours(arch, 1000, w, paths, 224) - torch_logits(model, paths, 224)).max()
            print(f"{arch}: max |logit diff| = {diff:.2e} over {len(paths)} images x 1000 classes")
            worst = max(worst, diff)
    sys.exit(0 if worst <= 1e-3 else 1)


if __name__ == "__main__":
    main()

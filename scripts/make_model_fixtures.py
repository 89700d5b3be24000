"""Writes the PyTorch-made fixtures that tests/checkpoint.rs compares against.

    pip install torch torchvision safetensors
    python scripts/make_model_fixtures.py            # tests/fixtures/models/ (~1.8 MB)
    python scripts/make_model_fixtures.py --full DIR # + torchvision resnet18/34 and
        # mobilenet_v2 (random weights) for the ignored test `torchvision_models_match`,
        # run with DFKD_TORCHVISION_FIXTURES=DIR (too large to commit)

Committed files:
- resnet8.safetensors: state_dict of a CIFAR ResNet-8 (10 classes), f32.
- wrn16_2_f16.safetensors: state_dict of a WRN-16-2 (10 classes) stored as float16, to
  test F16 loading; its logits are computed from the f16-rounded weights, so the
  comparison stays exact up to float32 rounding.
- sn_convt.safetensors: a spectral-normed ConvTranspose2d (PyTorch uses dim=1 for it):
  its state before and after one training forward, and both outputs.
- logits.safetensors: the input and eval-mode logits of both classifiers, and
  ResNet-8's training-mode logits with some of the running statistics they update.
- torch_shapes.json: state_dict keys, shapes and parameter counts of torchvision resnet18,
  resnet34, mobilenet_v2 (1000 classes) and of the CIFAR models above (10 classes).

Weights are random; BatchNorm affine parameters and running statistics are
randomised too, so that eval mode is not an identity.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (the CIFAR ResNet-8/20 of RepDistiller/CMI is the same)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, depths, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        c_in = 16
        for s, (width, depth) in enumerate(zip([16, 32, 64], depths)):
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(c_in, width, 2 if s > 0 and i == 0 else 1))
                c_in = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WrnBlock(nn.Module):
    """The DFAD/CMI wresnet.py BasicBlock (pre-activation)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WrnBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomise_bn(model, g):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) * 1.5 + 0.5
            m.num_batches_tracked.fill_(7)


def widen_logits(fc):
    """Scales the classifier so logits are O(1): a 1e-4 tolerance then means ~1e-4 relative."""
    fc.weight.data *= 20.0
    fc.bias.data *= 20.0


def state(model, dtype=torch.float32):
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def committed(out):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)

    r8 = CifarResNet([1, 1, 1], 10)
    randomise_bn(r8, g)
    widen_logits(r8.fc)
    r8.eval()
    save_file(state(r8), os.path.join(out, "resnet8.safetensors"))

    wrn = WideResNet(16, 2, 10)
    randomise_bn(wrn, g)
    widen_logits(wrn.fc)
    # round the weights to f16 first so that both sides compute with the same values
    wrn.load_state_dict({k: (v.half().float() if v.is_floating_point() else v) for k, v in wrn.state_dict().items()})
    wrn.eval()
    save_file(state(wrn, torch.float16), os.path.join(out, "wrn16_2_f16.safetensors"))

    io = {"input": x, "resnet8": r8(x), "wrn16_2": wrn(x)}
    # one training-mode forward: batch statistics, and the running ones it updates
    r8.train()
    io["resnet8.train"] = r8(x)
    for k in ["bn1.running_mean", "bn1.running_var", "layer3.0.bn2.running_mean", "layer3.0.bn2.running_var"]:
        io[f"resnet8.train.{k}"] = r8.state_dict()[k]
    save_file(io, os.path.join(out, "logits.safetensors"))

    # spectral norm on a transposed conv, as the generator uses it
    convt = nn.utils.spectral_norm(nn.ConvTranspose2d(6, 4, 3, stride=1, padding=1))
    xs = torch.randn(2, 6, 5, 5, generator=g)
    before = {k: v.clone() for k, v in convt.state_dict().items()}
    convt.train()
    y_train = convt(xs)
    after_u, after_v = convt.weight_u.clone(), convt.weight_v.clone()
    convt.eval()
    y_eval = convt(xs)
    tensors = {f"before.{k}": v for k, v in before.items()}
    tensors.update({"input": xs, "y_train": y_train, "y_eval": y_eval, "after.weight_u": after_u, "after.weight_v": after_v})
    save_file(tensors, os.path.join(out, "sn_convt.safetensors"))

    shapes = {}
    for name in ["resnet18", "resnet34", "mobilenet_v2"]:
        m = getattr(torchvision.models, name)(num_classes=1000)
        shapes[name] = {
            "keys": [[k, list(v.shape)] for k, v in m.state_dict().items()],
            "num_parameters": sum(p.numel() for p in m.parameters()),
        }
    for name, m in [("resnet8", CifarResNet([1, 1, 1], 10)), ("resnet20", CifarResNet([3, 3, 3], 10)),
                    ("wrn16_2", WideResNet(16, 2, 10)), ("wrn40_2", WideResNet(40, 2, 10))]:
        shapes[name] = {"keys": [[k, list(v.shape)] for k, v in m.state_dict().items()],
                        "num_parameters": sum(p.numel() for p in m.parameters())}
    with open(os.path.join(out, "torch_shapes.json"), "w") as f:
        json.dump(shapes, f, indent=0)


@torch.no_grad()
def full(out):
    """Random torchvision models at 64 px (ImageNet stem), for the ignored test."""
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    logits = {"input": x}
    for name in ["resnet18", "resnet34", "mobilenet_v2"]:
        m = getattr(torchvision.models, name)(num_classes=200)
        randomise_bn(m, g)
        widen_logits(m.fc if hasattr(m, "fc") else m.classifier[1])
        m.eval()
        save_file(state(m), os.path.join(out, f"{name}.safetensors"))
        logits[name] = m(x)
    save_file(logits, os.path.join(out, "logits.safetensors"))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models"))
    p.add_argument("--full", help="also write torchvision models to this directory")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    committed(a.out)
    if a.full:
        full(a.full)

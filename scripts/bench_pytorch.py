#!/usr/bin/env python3
"""Times the same training step as `distill bench` in PyTorch, for docs/PERF.md.

    python3 scripts/bench_pytorch.py --arch resnet18 --batch 32 --image-size 64 --num-classes 200 [--device cuda]

Prints images/s from the median step. Needs torch and torchvision (not needed by CI).
On CUDA the comparison with dfkd is FP32 for FP32: TF32 (PyTorch's default for cuDNN
convolutions on Ampere and later) is off unless --tf32, and cuDNN's autotuner is on
(PyTorch users turn it on for fixed shapes; the warmup steps absorb its search).
"""
import argparse
import time

import torch
import torchvision


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--tf32", action="store_true", help="allow TF32 tensor-core math on CUDA (off: plain FP32, as dfkd)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: PyTorch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.arch)(num_classes=a.num_classes).to(a.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=a.device)
    y = torch.randint(0, a.num_classes, (a.batch,), device=a.device)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()  # synchronises
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = sorted(times)[len(times) // 2]
    where = f"{torch.cuda.get_device_name(a.device)}, {'TF32' if a.tf32 else 'FP32'}" if cuda else f"{torch.get_num_threads()} threads"
    print(f"pytorch {torch.__version__} {a.arch} batch {a.batch} {a.image_size}px {a.num_classes} classes on {a.device} "
          f"({where}): {a.batch / med * 1e3:.1f} images/s (median step {med:.1f} ms)")


if __name__ == "__main__":
    main()

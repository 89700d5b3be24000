#!/usr/bin/env python3
"""The three attention computations of DFKD-FGVC in PyTorch, forward and forward +
backward, eager and torch.compile, at the shapes of benches/attention.rs: the numbers
to hold the fused kernels against, in one command on a GPU machine.

    python3 scripts/bench_attention_pytorch.py [--device cuda|cpu] [--shapes demo|paper|all] [--no-compile]

The device defaults to cuda when available. On the CPU the paper shapes run with 4
samples (as the Rust bench does); on a GPU with the paper's 64. GB/s uses the same
minimal byte counts as the Rust bench (inputs read once, outputs written once, f32;
see its header); with --peak-gbs the fraction of the card's bandwidth is printed too.
Needs only torch.
"""
import argparse
import time

import torch
import torch.nn.functional as F

ORDER, LAMBDA, TAU = 3, 0.05, 0.1

# (op, name, shape): [n, c, h, w], or [n, d] for the contrastive loss; n is the
# paper-scale batch (64), cut to 4 on the CPU for the *_b4 shapes
CASES = [
    ("spatial", "demo_gen_64x4x4", (64, 64, 4, 4)),
    ("spatial", "demo_gen_32x8x8", (64, 32, 8, 8)),
    ("spatial", "demo_gen_16x32x32", (64, 16, 32, 32)),
    ("spatial", "paper_gen_256x28x28", (64, 256, 28, 28)),
    ("spatial", "paper_gen_64x224x224", (64, 64, 224, 224)),
    ("high_order", "demo_stage_16x32x32", (64, 16, 32, 32)),
    ("high_order", "demo_stage_32x16x16", (64, 32, 16, 16)),
    ("high_order", "demo_stage_64x8x8", (64, 64, 8, 8)),
    ("high_order", "paper_stage_64x56x56", (64, 64, 56, 56)),
    ("high_order", "paper_stage_128x28x28", (64, 128, 28, 28)),
    ("high_order", "paper_stage_256x14x14", (64, 256, 14, 14)),
    ("high_order", "paper_stage_512x7x7", (64, 512, 7, 7)),
    ("contrastive", "demo_n64_d64", (64, 64)),
    ("contrastive", "paper_n64_d128", (64, 128)),
]


def spatial_attention(a, f):
    n, c, h, w = f.shape
    wts = torch.softmax(a.reshape(n, c, h * w), dim=2).reshape(n, c, h, w)
    return LAMBDA * (h * w) * wts * f + f


def high_order_attention(f, z, vw, vb):
    """After the 1x1 convs: z stacks the R(R+1)/2 W_{r,k} outputs, order-major."""
    parts = torch.chunk(z, ORDER * (ORDER + 1) // 2, dim=1)
    acc, k = 0, 0
    for r in range(1, ORDER + 1):
        p = parts[k]
        for j in range(1, r):
            p = p * parts[k + j]
        k += r
        acc = acc + torch.sigmoid(F.conv2d(torch.relu(p), vw[r - 1], vb[r - 1]))
    return acc / ORDER * f


def contrastive(t, s):
    n = t.shape[0]
    t, s = F.normalize(t, dim=1), F.normalize(s, dim=1)
    sim = t @ torch.cat([t, s]).T / TAU
    sim = sim.masked_fill(torch.eye(n, 2 * n, dtype=torch.bool, device=t.device), float("-inf"))
    return -torch.log_softmax(sim, dim=1)[torch.arange(n), n + torch.arange(n)].mean()


def make(op, shape, device):
    g = torch.Generator(device="cpu").manual_seed(7)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device).requires_grad_()
    if op == "spatial":
        return spatial_attention, [r(*shape, std=2.0), r(*shape)]
    if op == "high_order":
        n, c, h, w = shape
        cq = c // 4
        vw = [r(c, cq, 1, 1, std=0.3) for _ in range(ORDER)]
        vb = [r(c, std=0.1) for _ in range(ORDER)]
        return (lambda f, z, *v: high_order_attention(f, z, v[:ORDER], v[ORDER:])), [r(*shape), r(n, ORDER * (ORDER + 1) // 2 * cq, h, w), *vw, *vb]
    return contrastive, [r(*shape), r(*shape)]


def min_bytes(op, shape):
    """(forward, backward) minimal f32 bytes, as benches/attention.rs counts them."""
    n, c = shape[0], shape[1]
    hw = shape[2] * shape[3] if len(shape) == 4 else 1
    m = n * c * hw * 4
    if op == "spatial":
        return 3 * m, 5 * m
    if op == "high_order":
        z = m // 4 * (ORDER * (ORDER + 1) // 2)
        return z + 2 * m, 2 * z + 3 * m
    return 2 * m, 4 * m


def timed(fn, device, reps):
    """Median seconds of fn() over reps runs after two warm-ups, synchronising."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="all", choices=["demo", "paper", "all"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-gbs", type=float, default=0.0, help="the card's memory bandwidth, for the fraction column")
    a = p.parse_args()
    print(f"torch {torch.__version__} on {a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else f" ({torch.get_num_threads()} threads)"))
    modes = [("eager", lambda f: f)]
    if not a.no_compile:
        modes.append(("compile", torch.compile))
    for op, name, shape in CASES:
        if a.shapes != "all" and not name.startswith(a.shapes):
            continue
        if a.device == "cpu" and name.startswith("paper") and op != "contrastive":
            shape, name = (4, *shape[1:]), name + "_b4"
        fwd_b, bwd_b = min_bytes(op, shape)
        fn, xs = make(op, shape, a.device)
        for mode, wrap in modes:
            try:
                f = wrap(fn)
                out = []

                def fwd():
                    with torch.no_grad():
                        out[:] = [f(*xs)]

                def fwd_bwd():
                    for x in xs:
                        x.grad = None
                    y = f(*xs)
                    y.backward(torch.full_like(y, 0.5))

                tf, tb = timed(fwd, a.device, a.reps), timed(fwd_bwd, a.device, a.reps)
            except Exception as e:  # torch.compile needs a working C++/Triton toolchain
                print(f"{op:12} {name:28} {mode:8} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            gbs = lambda b, t: b / t / 1e9
            frac = lambda b, t: f" ({gbs(b, t) / a.peak_gbs:.0%} of peak)" if a.peak_gbs else ""
            print(f"{op:12} {name:28} {mode:8} fwd {tf * 1e3:8.3f} ms {gbs(fwd_b, tf):7.1f} GB/s{frac(fwd_b, tf)}   "
                  f"fwd+bwd {tb * 1e3:8.3f} ms {gbs(fwd_b + bwd_b, tb):7.1f} GB/s{frac(fwd_b + bwd_b, tb)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch twins of dfkd's timed workloads, for docs/PERF.md.

    python3 scripts/bench_pytorch.py [--workload train-step] --arch resnet18 --batch 32 --image-size 64 --num-classes 200 [--device cuda]
    OMP_WAIT_POLICY=ACTIVE python3 scripts/bench_pytorch.py --workload demo-iteration --threads 2 [--steps 3]
    python3 scripts/bench_pytorch.py --workload predict --threads 1

--workload train-step (the default) times the same training step as `distill bench`
(a torchvision model: forward, cross-entropy, backward, SGD) and prints images/s from
the median step. It needs torchvision. On CUDA the comparison with dfkd is FP32 for
FP32: TF32 (PyTorch's default for cuDNN convolutions on Ampere and later) is off
unless --tf32, and cuDNN's autotuner is on (PyTorch users turn it on for fixed shapes;
the warmup steps absorb its search).

--workload predict times batch-1 inference (benches/predict.rs): ResNet-18 at 224 px
and the demo's resnet8 at 32 px, evaluation mode, median of 30 after 5 warmup runs.

--workload demo-iteration times ONE distillation iteration of dfkd's default config
(`Config::cpu_demo()`, src/pipeline/config.rs) as `Distiller::iterate` runs it
(src/pipeline/distill.rs): 5 generator steps, then 15 student steps, batch 64 of
32x32 images, 10 classes. The modules are dfkd's, rebuilt here layer for layer with the
same shapes and parameter counts (checked against the counts read off the Rust code,
DFKD_PARAMS below): the CIFAR-style resnet20 teacher (frozen, eval mode) and resnet8
student (src/models/resnet.rs), the generator with spectral norm, block BN and SAM
(src/pipeline/generator.rs, attention.rs), MHAD's adapters and MHA modules and SFCL's
projection head (src/pipeline/losses.rs). The attention ops are the composition forms
of src/pipeline/attention.rs, imported from scripts/bench_attention_pytorch.py.
  generator step: x = G(z) (train mode); teacher (eval) and student (train mode, frozen)
    on x; loss = alpha * L_BN(teacher BN inputs) - KD(tau_gen); Adam on G.
  student step: x = G(z) under no_grad (train mode: BN and spectral-norm power
    iteration still update); teacher (eval) under no_grad; student (train);
    loss = KD(tau_kd) + beta * L_MHAD + gamma * L_SFCL; SGD (momentum, weight decay,
    dfkd's cosine learning rate) on the student, the adapters, the MHA modules and the
    projection head.
Weights are random (timing only). It warms up --warmup iterations (default 1), times
--steps (default 3), prints each iteration's seconds, the median, torch's version, the
thread count and OMP_WAIT_POLICY (set it in the environment: OpenMP reads it at start),
and ends with one line `pytorch demo-iteration: median X.XX s/iteration (...)`. Needs
only torch. Give it cores of its own: with OpenMP threads on busy cores (another
program running) each of its thousands of small ops waits out a scheduler slice, and
an iteration takes many times longer.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # src/data/transforms.rs

# Parameter counts of dfkd's demo modules (what `Module::parameters()` holds: weights,
# biases, BN affine; not running statistics or spectral norm's u, v), worked out from the
# Rust code (dfkd prints none of them):
#   teacher resnet20: stem 432 + bn 32; layer1 3 x (2 x 2304 + 64); layer2 (4608 + 9216
#     + 128 + downsample 512 + 64) + 2 x (2 x 9216 + 128); layer3 (18432 + 36864 + 256
#     + 2048 + 128) + 2 x (2 x 36864 + 256); fc 650
#   student resnet8: the same with one block a stage
#   generator: fc 256 -> 128*2*2 (131584), bn0 256; blocks 128->64->32->16->16, each
#     ConvT 3x3 + bias, BN, SAM (reduction 8): 86680 + 21772 + 5494 + 3190; head 435
#   MHAD: identity adapters 256 + 1024 + 4096; MHA on 16/32/64 channels: 624 + 2400 + 9408
#   projection head: fc1 64 -> 128 (8320), BN 256, fc2 128 -> 64 (8256)
DFKD_PARAMS = {"teacher": 272474, "student": 78042, "generator": 249411, "mhad": 17808, "projection head": 16832}


# --- src/models/resnet.rs: CIFAR-style ResNet (3x3 stem, no max pool), BasicBlocks,
# 1x1 conv + BN shortcut where the shape changes; kaiming fan-out convs, no bias
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)

class ResNet(nn.Module):
    """Returns (logits, stage outputs, penultimate features), as dfkd's `Features`."""

    def __init__(self, depths, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for s, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for i in range(d):
                blocks.append(BasicBlock(cin, w, 2 if s > 0 and i == 0 else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        stages = []
        for layer in self.layers:
            x = layer(x)
            stages.append(x)
        pen = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(pen), stages, pen


def train_step(a):
    import torchvision

    steps = 10 if a.steps is None else a.steps
    warmup = 2 if a.warmup is None else a.warmup
    cuda = a.device.startswith("cuda")
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.arch)(num_classes=a.num_classes).to(a.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=a.device)
    y = torch.randint(0, a.num_classes, (a.batch,), device=a.device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()  # synchronises
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = sorted(times)[len(times) // 2]
    where = f"{torch.cuda.get_device_name(a.device)}, {'TF32' if a.tf32 else 'FP32'}" if cuda else f"{torch.get_num_threads()} threads"
    print(f"pytorch {torch.__version__} {a.arch} batch {a.batch} {a.image_size}px {a.num_classes} classes on {a.device} "
          f"({where}): {a.batch / med * 1e3:.1f} images/s (median step {med:.1f} ms)")


def demo_iteration(a):
    import math

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_attention_pytorch as att  # spatial_attention, high_order_attention, contrastive

    # Config::cpu_demo()
    N, SIZE, CLASSES = 64, 32, 10
    Z_DIM, CHANNELS, SAM_REDUCTION, SAM_LAMBDA = 256, [128, 64, 32, 16, 16], 8, 0.05
    G_LR, BETAS = 1e-3, (0.5, 0.999)
    S_LR, MOMENTUM, WD = 0.01, 0.9, 5e-4
    ALPHA, BETA, GAMMA, TAU_KD, TAU_GEN, TAU_SFCL, MHA_ORDER = 0.3, 10.0, 8.0, 4.0, 1.0, 0.1, 3
    PROJ_HIDDEN, PROJ_DIM = 128, 64
    G_STEPS, S_STEPS, SCHEDULE_TOTAL = 5, 15, 10 * 4 * 15  # cosine over epochs * iterations_per_epoch * s_steps
    # the attention ops take these from bench_attention_pytorch's constants
    assert (att.ORDER, att.LAMBDA, att.TAU) == (MHA_ORDER, SAM_LAMBDA, TAU_SFCL)
    steps = 3 if a.steps is None else a.steps
    warmup = 1 if a.warmup is None else a.warmup
    dev = a.device

    # --- src/pipeline/attention.rs: SAM's encoder-decoder, then the spatial attention
    class SAM(nn.Module):
        def __init__(self, c, r):
            super().__init__()
            cr = max(c // r, 1)
            self.reduce = nn.Conv2d(c, cr, 1)
            self.enc1, self.bn1 = nn.Conv2d(cr, 2 * cr, 3, padding=1, bias=False), nn.BatchNorm2d(2 * cr)
            self.enc2, self.bn2 = nn.Conv2d(2 * cr, 4 * cr, 3, padding=1, bias=False), nn.BatchNorm2d(4 * cr)
            self.dec1, self.bn3 = nn.ConvTranspose2d(4 * cr, 2 * cr, 3, padding=1, bias=False), nn.BatchNorm2d(2 * cr)
            self.dec2, self.bn4 = nn.ConvTranspose2d(2 * cr, cr, 3, padding=1, bias=False), nn.BatchNorm2d(cr)
            self.expand = nn.Conv2d(cr, c, 1)

        def forward(self, f):
            h, w = f.shape[2:]
            p = F.relu(self.bn1(self.enc1(self.reduce(f))))
            p, idx = F.max_pool2d(p, 2, 2, return_indices=True)
            q = F.relu(self.bn2(self.enc2(p)))
            u = F.max_unpool2d(F.relu(self.bn3(self.dec1(q))), idx, 2, 2, output_size=(h, w))
            a_s = self.expand(F.relu(self.bn4(self.dec2(u))))
            return att.spatial_attention(a_s, f)  # lambda 0.05, softmax over H*W scaled by H*W

    # --- src/pipeline/generator.rs
    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.s0 = CHANNELS[0], SIZE >> 4
            self.fc = nn.Linear(Z_DIM, self.c0 * self.s0 * self.s0)
            self.bn0 = nn.BatchNorm2d(self.c0)
            self.blocks = nn.ModuleList()
            for ci, co in zip(CHANNELS[:-1], CHANNELS[1:]):
                b = nn.Module()
                # torch.nn.utils.spectral_norm: dim 1 for a transposed conv, one power
                # iteration per training forward, as src/nn/spectral_norm.rs
                b.deconv = nn.utils.spectral_norm(nn.ConvTranspose2d(ci, co, 3, padding=1))
                b.bn = nn.BatchNorm2d(co)
                b.sam = SAM(co, SAM_REDUCTION)
                self.blocks.append(b)
            self.head = nn.Conv2d(CHANNELS[-1], 3, 3, padding=1)
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("inv_std", 1 / torch.tensor(STD).view(1, 3, 1, 1))

        def forward(self, z):
            x = self.bn0(self.fc(z).view(z.shape[0], self.c0, self.s0, self.s0))
            for b in self.blocks:
                x = F.interpolate(b.deconv(x), scale_factor=2, mode="nearest")
                x = b.sam(F.leaky_relu(b.bn(x), 0.2))
            pixels = torch.tanh(self.head(x)) * 0.5 + 0.5
            return (pixels - self.mean) * self.inv_std

    # --- src/pipeline/attention.rs HighOrderAttention, losses.rs Mhad (stages match)
    class HighOrderAttention(nn.Module):
        def __init__(self, c, order):
            super().__init__()
            hidden = max(c // 4, 1)
            self.w = nn.Conv2d(c, order * (order + 1) // 2 * hidden, 1, bias=False)  # all W_{r,k} stacked
            self.v = nn.ModuleList(nn.Conv2d(hidden, c, 1) for _ in range(order))

        def forward(self, f):
            return att.high_order_attention(f, self.w(f), [v.weight for v in self.v], [v.bias for v in self.v])

    class Mhad(nn.Module):
        def __init__(self, t_channels, s_channels):
            super().__init__()
            self.adapters = nn.ModuleList(nn.Conv2d(cs, ct, 1, bias=False) for ct, cs in zip(t_channels, s_channels))
            with torch.no_grad():
                for a, ct, cs in zip(self.adapters, t_channels, s_channels):
                    if ct == cs:  # adapter_identity_init
                        a.weight.copy_(torch.eye(ct).view(ct, ct, 1, 1))
            self.mha = nn.ModuleList(HighOrderAttention(ct, MHA_ORDER) for ct in t_channels)

        def forward(self, t_stages, s_stages):
            total = 0
            for ft, fs, a, m in zip(t_stages, s_stages, self.adapters, self.mha):
                at, as_ = m(ft.detach()), m(a(fs))
                n, c = at.shape[:2]
                at, as_ = F.normalize(at.flatten(1), dim=1, eps=1e-12), F.normalize(as_.flatten(1), dim=1, eps=1e-12)  # mhad_normalize
                total = total + (at - as_).square().sum() / (n * c)
            return total

    # --- losses.rs ProjectionHead: fc1 shared (widths match: no teacher_in), BN, ReLU, fc2
    class ProjectionHead(nn.Module):
        def __init__(self, d, hidden, out):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, out)

        def project(self, h):
            return self.fc2(F.relu(self.bn(h)))  # each side normalised with its own batch statistics

        def forward(self, t_pen, s_pen):
            zt = self.project(self.fc1(t_pen.detach()))  # teacher features detached, the head learns from both sides
            zs = self.project(self.fc1(s_pen))
            return att.contrastive(zt, zs)  # NT-Xent, tau 0.1

    def kd_loss(s_logits, t_logits, tau):
        """tau^2 KL(softmax(t/tau) || softmax(s/tau)), batchmean; differentiable in both."""
        return F.kl_div(F.log_softmax(s_logits / tau, 1), F.log_softmax(t_logits / tau, 1),
                        reduction="batchmean", log_target=True) * (tau * tau)

    def bn_loss(records):
        total = 0
        for x, bn in records:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            total = total + (mean - bn.running_mean).square().sum().sqrt() + (var - bn.running_var).square().sum().sqrt()
        return total

    torch.manual_seed(0)
    teacher, student = ResNet((3, 3, 3)).to(dev), ResNet((1, 1, 1)).to(dev)
    generator = Generator().to(dev)
    mhad = Mhad((16, 32, 64), (16, 32, 64)).to(dev)
    head = ProjectionHead(64, PROJ_HIDDEN, PROJ_DIM).to(dev)
    teacher.eval().requires_grad_(False)
    student.train(), generator.train(), mhad.train(), head.train()
    # the input of every teacher BN layer, in forward order (dfkd's Ctx::recording)
    records = []
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, inp: records.append((inp[0], mod)))

    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in [("teacher", teacher), ("student", student), ("generator", generator), ("mhad", mhad), ("projection head", head)]}
    for name, c in counts.items():
        print(f"params {name:16} {c:8d}  (dfkd {DFKD_PARAMS[name]}{'' if c == DFKD_PARAMS[name] else ', MISMATCH'})")
    if counts != DFKD_PARAMS:
        raise SystemExit("parameter counts differ from dfkd's")

    opt_g = torch.optim.Adam(generator.parameters(), lr=G_LR, betas=BETAS, eps=1e-8)
    s_params = [*student.parameters(), *mhad.parameters(), *head.parameters()]
    opt_s = torch.optim.SGD(s_params, lr=S_LR, momentum=MOMENTUM, weight_decay=WD)
    s_step = [0]

    def iteration():
        # Distiller::generator_steps: student frozen (requires_grad off) but in train mode
        student.requires_grad_(False)
        for _ in range(G_STEPS):
            x = generator(torch.randn(N, Z_DIM, device=dev))
            records.clear()
            t_logits, _, _ = teacher(x)
            s_logits, _, _ = student(x)
            kd = kd_loss(s_logits, t_logits, TAU_GEN)
            bn = bn_loss(records)
            loss = ALPHA * bn - kd
            with torch.no_grad():  # the logged parts, as dfkd reads them
                p = F.softmax(t_logits, 1).mean(0)
                parts = [bn.item(), kd.item(), -(p * p.clamp_min(1e-30).log()).sum().item()]
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        student.requires_grad_(True)
        records.clear()
        # Distiller::student_steps
        for _ in range(S_STEPS):
            for g in opt_s.param_groups:
                g["lr"] = S_LR * 0.5 * (1 + math.cos(math.pi * min(s_step[0], SCHEDULE_TOTAL) / SCHEDULE_TOTAL))
            with torch.no_grad():
                x = generator(torch.randn(N, Z_DIM, device=dev))
                records.clear()
                t_logits, t_stages, t_pen = teacher(x)
                records.clear()
            s_logits, s_stages, s_pen = student(x)
            kd = kd_loss(s_logits, t_logits, TAU_KD)
            l_mhad = mhad(t_stages, s_stages)
            l_sfcl = head(t_pen, s_pen)
            loss = kd + BETA * l_mhad + GAMMA * l_sfcl
            parts = [kd.item(), l_mhad.item(), l_sfcl.item()]
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            s_step[0] += 1
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return parts

    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    nt = torch.get_num_threads()
    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"{nt} thread{'' if nt == 1 else 's'}"
    print(f"torch {torch.__version__} on {dev} ({where}), OMP_WAIT_POLICY={wait}; "
          f"one iteration = {G_STEPS} generator + {S_STEPS} student steps, batch {N}, {SIZE}px, {CLASSES} classes")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        parts = iteration()
        dt = time.perf_counter() - t0
        if not all(math.isfinite(v) for v in parts):
            raise SystemExit(f"iteration {i}: non-finite loss {parts}")
        label = "warmup" if i < warmup else f"iteration {i - warmup + 1}"
        print(f"{label}: {dt:.3f} s")
        if i >= warmup:
            times.append(dt)
    med = sorted(times)[len(times) // 2] if len(times) % 2 else sum(sorted(times)[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
    print(f"pytorch demo-iteration: median {med:.2f} s/iteration (torch {torch.__version__}, {where}, "
          f"OMP_WAIT_POLICY={wait}, {len(times)} timed after {warmup} warmup)")


def predict(a):
    """Batch-1 inference as `distill predict` runs it (benches/predict.rs): torchvision's
    ResNet-18 (200 classes) at 224 px and the demo's resnet8 at 32 px, evaluation mode,
    torch.inference_mode, on --threads threads."""
    import torchvision

    steps = 30 if a.steps is None else a.steps
    warmup = 5 if a.warmup is None else a.warmup
    torch.manual_seed(0)
    models = [("resnet18", torchvision.models.resnet18(num_classes=200), 224), ("resnet8", ResNet((1, 1, 1), num_classes=10), 32)]
    for name, model, size in models:
        model = model.eval()
        x = torch.randn(1, 3, size, size)
        times = []
        with torch.inference_mode():
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        med = sorted(times)[len(times) // 2]
        print(f"pytorch {torch.__version__} predict {name} batch 1 {size}px on cpu ({torch.get_num_threads()} threads): "
              f"median {med:.2f} ms")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="train-step", choices=["train-step", "demo-iteration", "predict"])
    p.add_argument("--arch", default="resnet18", help="train-step only")
    p.add_argument("--batch", type=int, default=32, help="train-step only")
    p.add_argument("--image-size", type=int, default=64, help="train-step only")
    p.add_argument("--num-classes", type=int, default=200, help="train-step only")
    p.add_argument("--steps", type=int, default=None, help="timed steps (train-step: 10) or iterations (demo-iteration: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (train-step: 2) or iterations (demo-iteration: 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--tf32", action="store_true", help="allow TF32 tensor-core math on CUDA (off: plain FP32, as dfkd)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: PyTorch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cudnn.benchmark = True
    if a.workload == "train-step":
        train_step(a)
    elif a.workload == "predict":
        predict(a)
    else:
        demo_iteration(a)


if __name__ == "__main__":
    main()

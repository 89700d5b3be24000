#!/usr/bin/env python3
"""Small PyTorch reference results for the forward of conv2d, conv_transpose2d,
batch_norm and the pools, read by tests/torch_ops.rs (CI needs no PyTorch).

    pip install torch safetensors
    python3 scripts/make_op_fixtures.py      # writes tests/fixtures/ops.safetensors
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    out = {}
    # conv2d: stride, padding, dilation, groups (incl. depthwise), bias, odd sizes
    x = r(2, 4, 9, 7)
    for name, (w, kw) in {
        "conv_s2p1": (r(6, 4, 3, 3), dict(stride=2, padding=1)),
        "conv_d2p2": (r(5, 4, 3, 3), dict(padding=2, dilation=2)),
        "conv_g2": (r(6, 2, 3, 1), dict(padding=(1, 0), groups=2)),
        "conv_dw": (r(4, 1, 5, 5), dict(padding=2, groups=4)),
        "conv_1x1": (r(3, 4, 1, 1), dict()),
    }.items():
        b = r(w.shape[0])
        out[f"{name}.w"], out[f"{name}.b"] = w, b
        out[f"{name}.y"] = F.conv2d(x, w, b, **kw)
    out["conv.x"] = x
    # conv_transpose2d: stride 1 and 2, output padding, groups
    xt = r(2, 4, 5, 6)
    for name, (w, kw) in {
        "convt_p1": (r(4, 3, 3, 3), dict(padding=1)),
        "convt_s2op1": (r(4, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
        "convt_g2": (r(4, 3, 3, 3), dict(stride=2, groups=2)),
    }.items():
        out[f"{name}.w"] = w
        out[f"{name}.y"] = F.conv_transpose2d(xt, w, **kw)
    out["convt.x"] = xt
    # batch norm, training mode (batch statistics, running update) and eval mode
    xb = r(3, 5, 4, 6) * 2 + 1
    gamma, beta, rm, rv = r(5), r(5), r(5), torch.rand(5, generator=g) + 0.5
    out.update({"bn.x": xb, "bn.gamma": gamma, "bn.beta": beta, "bn.rm": rm.clone(), "bn.rv": rv.clone()})
    out["bn.y_eval"] = F.batch_norm(xb, rm.clone(), rv.clone(), gamma, beta, training=False)
    rm2, rv2 = rm.clone(), rv.clone()
    out["bn.y_train"] = F.batch_norm(xb, rm2, rv2, gamma, beta, training=True, momentum=0.1)
    out["bn.rm_after"], out["bn.rv_after"] = rm2, rv2
    # pools
    xp = r(2, 3, 7, 9)
    y, idx = F.max_pool2d(xp, 3, 2, 1, return_indices=True)
    out.update({"pool.x": xp, "maxpool_k3s2p1.y": y, "maxpool_k3s2p1.idx": idx.to(torch.float32)})
    y2, idx2 = F.max_pool2d(xp[..., :6, :8], 2, 2, return_indices=True)
    out.update({"maxpool_k2.y": y2, "maxpool_k2.idx": idx2.to(torch.float32)})
    out["unpool.y"] = F.max_unpool2d(y2, idx2, 2, 2, output_size=(6, 8))
    out["avgpool_k3s2p1.y"] = F.avg_pool2d(xp, 3, 2, 1)
    out["adaptive1.y"] = F.adaptive_avg_pool2d(xp, 1)
    out["upsample2.y"] = F.interpolate(xp, scale_factor=2, mode="nearest")
    path = os.path.join(ROOT, "tests", "fixtures", "ops.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()

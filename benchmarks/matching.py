"""Benchmark of llfc.permutation: weight-matching time/sweeps and activation-matching memory.

    PYTHONPATH=src python benchmarks/matching.py [--out benchmarks/results/matching.json] [--threads 2]

Weight matching aligns two independently initialised models (PyTorch default init; no training, so
the number of sweeps is that of random weights; trained pairs may differ). Activation matching's
peak resident memory (VmHWM of a fresh subprocess, reset just before the pass) is measured for 1,000 and 10,000 random
inputs streamed in batches of 250: it must not grow with the number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the registry will hold these; fall back to local definitions until it does
    from llfc.models import create_model, list_models
except ImportError:  # pragma: no cover
    create_model, list_models = None, lambda: []

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """CIFAR VGG-16 (no BN): 13 conv3 + ReLU, 5 max-pools, classifier 512 → 512 → 10 (15.0M params)."""

    def __init__(self, cfg=VGG16, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, 512), nn.ReLU(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class ChannelLN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = ChannelLN(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = ChannelLN(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), ChannelLN(cout))

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(out)) + self.shortcut(x))


class ResNet20LN(nn.Module):
    """Git Re-Basin's ResNet-20 with LayerNorm over channels and a width multiplier."""

    def __init__(self, width=1, num_classes=10):
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.n1 = ChannelLN(w[0])
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            for j in range(3):
                blocks.append(Block(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.n1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def build(name):
    import torchvision

    if name == "mlp":
        return create_model("mlp", input_shape=(1, 28, 28), num_classes=10, widths=(512, 512, 512)), (1, 28, 28)
    if name == "vgg16":
        return VGG(), (3, 32, 32)
    if name == "resnet20_ln_x1":
        return ResNet20LN(1), (3, 32, 32)
    if name == "resnet20_ln_x4":
        return ResNet20LN(4), (3, 32, 32)
    if name == "vgg16_bn_paper":  # the paper's VGG-16-BN: BN, 512-4096-4096-10 classifier (33.6M)
        return create_model("vgg16_bn", input_shape=(3, 32, 32), num_classes=10), (3, 32, 32)
    if name == "vgg16_bn_small":  # VGG-16-BN at width 0.25 with a 128-256-256-10 classifier
        return create_model("vgg16_bn", input_shape=(3, 32, 32), num_classes=10, width=0.25,
                            hidden=256), (3, 32, 32)
    if name == "tv_resnet18":
        return torchvision.models.resnet18(num_classes=10), (3, 32, 32)
    if name == "vit_w256_d6_h8":  # GLMC's CIFAR-10 ViT size: 6 blocks, width 256, 8 heads, patch 4
        return create_model("vit", input_shape=(3, 32, 32), num_classes=10, width=256, depth=6, heads=8), (3, 32, 32)
    raise KeyError(name)


def bench_weight_matching(name):
    from llfc.permutation import derive_spec, weight_matching

    torch.manual_seed(0)
    a, shape = build(name)
    torch.manual_seed(1)
    b, _ = build(name)
    a.eval(), b.eval()
    t, c0 = time.perf_counter(), time.process_time()
    spec = derive_spec(a, torch.randn(2, *shape))
    t_spec, cpu_spec = time.perf_counter() - t, time.process_time() - c0
    load = os.getloadavg()[0]
    c = time.process_time()
    perms, rep = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0)
    cpu = time.process_time() - c
    return {
        "model": name,
        "params_M": sum(p.numel() for p in a.parameters()) / 1e6,
        "groups": len(spec.groups),
        "derive_spec_s": t_spec,
        "derive_spec_cpu_s": cpu_spec,
        "weight_matching_s": rep.time_s,
        "weight_matching_cpu_s": cpu,
        "sweeps": rep.n_sweeps,
        "objective": rep.objective,
        "objective_gain": rep.objective - rep.objective_identity,
        "moved_fraction_mean": sum(rep.moved_fraction.values()) / len(rep.moved_fraction),
        "products_full": rep.products_full,
        "products_low_rank": rep.products_low_rank,
        "cpu_products_s": rep.cpu_products_s,
        "cpu_assignments_s": rep.cpu_assignments_s,
        "cpu_objective_s": rep.cpu_objective_s,
        "load_average_1min_before": load,
    }


def sweep_trace(name: str) -> dict:
    """Which permutation groups change in each sweep of weight matching (and the objective gain
    of the sweep), from runs stopped after 1, 2, ... sweeps (the same seed gives the same prefix)."""
    from llfc.permutation import derive_spec, weight_matching

    torch.manual_seed(0)
    a, shape = build(name)
    torch.manual_seed(1)
    b, _ = build(name)
    spec = derive_spec(a.eval(), torch.randn(2, *shape))
    _, full = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0)
    h = full.objective_per_sweep
    first_gain = h[0] - full.objective_identity
    rows, prev = [], None
    for k in range(1, full.n_sweeps + 1):
        perms, _ = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0, max_iter=k)
        if prev is not None:
            rows.append({"sweep": k, "gain_rel_first": (h[k - 1] - h[k - 2]) / first_gain,
                         "units_moved": {g: int((perms[g] != prev[g]).sum()) for g in perms
                                         if not torch.equal(perms[g], prev[g])}})
        prev = perms
    return {"model": name, "sizes": dict(spec.sizes), "sweeps": full.n_sweeps, "rows": rows}


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def am_child(n_samples: int, batch: int = 250) -> dict:
    """Run activation matching on n_samples random CIFAR-shaped inputs; report RSS before and peak (MiB)."""
    from llfc.permutation import activation_matching, derive_spec

    torch.manual_seed(0)
    a, shape = build("resnet20_ln_x1")
    torch.manual_seed(1)
    b, _ = build("resnet20_ln_x1")
    a.eval(), b.eval()
    spec = derive_spec(a, torch.randn(2, *shape))

    def loader():
        g = torch.Generator().manual_seed(0)
        for i in range(0, n_samples, batch):
            yield torch.randn(min(batch, n_samples - i), *shape, generator=g)

    # Linux: writing 5 to clear_refs resets the peak-RSS watermark (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    t = time.perf_counter()
    perms, rep = activation_matching(a, b, spec, loader())
    return {
        "model": "resnet20_ln_x1",
        "n_samples": n_samples,
        "batch": batch,
        "time_s": time.perf_counter() - t,
        "rss_before_MiB": base,
        "peak_rss_MiB": _status_mib("VmHWM"),
        "feature_vectors_per_group_max": max(rep.n_samples.values()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/matching.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp,vgg16,resnet20_ln_x1,resnet20_ln_x4,tv_resnet18,vit_w256_d6_h8")
    ap.add_argument("--am-samples", default="1000,10000")
    ap.add_argument("--am-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trace", default=None, metavar="MODEL",
                    help="only print (and write to --out) which groups change in each sweep")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trace:
        t = sweep_trace(args.trace)
        print(f"{args.trace}: {t['sweeps']} sweeps; groups changed per sweep (units moved)")
        for r in t["rows"]:
            print(f"{r['sweep']:>3} gain {r['gain_rel_first']:9.2e} x first sweep's  {r['units_moved']}")
        Path(args.out).write_text(json.dumps(t, indent=2))
        return
    if args.am_child is not None:
        print(json.dumps(am_child(args.am_child)))
        return

    wm = []
    print(f"weight matching (two independent random inits, {args.threads} threads, restarts=1; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"{'model':<16} {'params':>8} {'groups':>6} {'spec s':>7} {'match s':>8} {'cpu s':>7} {'sweeps':>6} {'moved':>6} "
          f"{'total s':>7} {'cpu: products':>13} {'LAP':>6} {'J':>6} {'low-rank/full':>13}")
    for name in args.models.split(","):
        r = bench_weight_matching(name)
        wm.append(r)
        print(f"{r['model']:<16} {r['params_M']:>7.2f}M {r['groups']:>6} {r['derive_spec_s']:>7.2f} "
              f"{r['weight_matching_s']:>8.2f} {r['weight_matching_cpu_s']:>7.2f} {r['sweeps']:>6} {r['moved_fraction_mean']:>6.2f} "
              f"{r['derive_spec_s'] + r['weight_matching_s']:>7.2f} {r['cpu_products_s']:>13.2f} "
              f"{r['cpu_assignments_s']:>6.2f} {r['cpu_objective_s']:>6.2f} "
              f"{r['products_low_rank']:>6}/{r['products_full']:<6}")

    am = []
    print("\nactivation matching memory (resnet20_ln_x1, batches of 250, fresh process each)")
    print(f"{'samples':>8} {'time s':>7} {'RSS before MiB':>15} {'peak RSS MiB':>13} {'increase MiB':>13}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    for n in [int(s) for s in args.am_samples.split(",") if s]:
        out = subprocess.run([sys.executable, __file__, "--am-child", str(n), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        am.append(r)
        r["increase_MiB"] = r["peak_rss_MiB"] - r["rss_before_MiB"]
        print(f"{n:>8} {r['time_s']:>7.1f} {r['rss_before_MiB']:>15.0f} {r['peak_rss_MiB']:>13.0f} "
              f"{r['increase_MiB']:>13.1f}")

    result = {
        "torch": torch.__version__,
        "load_average_1min_at_end": os.getloadavg()[0],
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "weight_matching": wm,
        "activation_matching_memory": am,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""PyTorch reference timings for the same training steps that hylo-bench times, on the same CPU.

    python torch_step.py [--model resnet32|resnet50|unet] [--batch N] [--size S] [--steps K] [--threads T]

Prints one line: model, batch, input size, median and min milliseconds of one SGD training step
(with `--json`, one JSON object: torch, threads, median_ms, min_ms, as `hylo-bench --peer-steps`
reads it)
(forward, cross-entropy or for the U-Net Dice loss, backward, SGD with momentum 0.9), over K timed
steps after 2 warm-up steps. The U-Net is the brain-MRI U-Net of the HyLo paper (4 levels, 32 base
features, 7,763,041 parameters; input 3 x 256 x 256 by default, `--features` to change the width).
Set up once: python3 -m venv venv && venv/bin/pip install torch torchvision (the PyPI wheels run on
the CPU). Run it right before or after the Rust figure it is compared with: the machine is noisy.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """CIFAR ResNet block with the parameter-free shortcut (option A): stride-2 subsampling and
    zero-padded channels, as in He et al. 2016 and the HyLo paper's ResNet-32 (464,154 parameters)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, :: self.stride, :: self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, depth=32, classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UNetBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """Encoder of four blocks with 2x2 max-pooling, a bottleneck, a decoder with 2x2 transposed
    convolutions and skip concatenations, a 1x1 convolution and a sigmoid."""

    def __init__(self, cin=3, cout=1, f=32):
        super().__init__()
        widths = [f, 2 * f, 4 * f, 8 * f]
        self.enc, c = nn.ModuleList(), cin
        for w in widths:
            self.enc.append(UNetBlock(c, w))
            c = w
        self.bottleneck = UNetBlock(8 * f, 16 * f)
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, 2) for w in reversed(widths))
        self.dec = nn.ModuleList(UNetBlock(2 * w, w) for w in reversed(widths))
        self.head = nn.Conv2d(f, cout, 1)

    def forward(self, x):
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return torch.sigmoid(self.head(x))


def dice_loss(p, y, eps=1.0):
    inter = (p * y).sum()
    return 1 - (2 * inter + eps) / (p.sum() + y.sum() + eps)


def build(name, size, features=32):
    if name == "resnet32":
        return CifarResNet(32), (3, size or 32, size or 32), 10
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(), (3, size or 224, size or 224), 1000
    if name == "unet":
        return UNet(3, 1, features), (3, size or 256, size or 256), None
    raise SystemExit(f"unknown model {name}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, shape, classes = build(a.model, a.size, a.features)
    params = sum(q.numel() for q in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(a.batch, *shape)
    if classes is None:
        y = (torch.rand(a.batch, 1, shape[1], shape[2]) > 0.9).float()
        loss_fn = dice_loss
    else:
        y = torch.randint(0, classes, (a.batch,))
        loss_fn = F.cross_entropy
    times = []
    for i in range(a.steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    if a.json:
        print(json.dumps({"torch": torch.__version__, "threads": a.threads,
                          "median_ms": round(statistics.median(times), 3),
                          "min_ms": round(min(times), 3)}))
        return
    print(f"torch {torch.__version__} {a.model} params={params} batch={a.batch} input={shape} "
          f"threads={a.threads} step_ms median={statistics.median(times):.1f} min={min(times):.1f}")


if __name__ == "__main__":
    main()

"""ResNet forms read as ODEs: post-activation (v1) against pre-activation (v2) ResNets, converted by
`odenet.swap_blocks`, on scikit-learn's 8x8 digits.

A residual block `x + F(x)` is one Euler step of `dx/dt = F(x)` with h = 1. Of the two ResNet
forms only the pre-activation one (He et al. 2016b, "Identity mappings in deep residual
networks") is such a step: the original post-activation block (He et al. 2016a) computes
`relu(x + F(x))`, a ReLU after the addition. This script trains four ResNets as their authors
write them (v1 torchvision-style, v2 as in He et al. 2016b), with basic and bottleneck blocks,

    stem -> stage 1 (8x8, `--blocks` blocks) -> stage 2 (4x4, `--blocks` blocks) -> pool -> linear

where the first block of a stage that changes the shape (stride 2, or the bottleneck's channel
expansion) has a 1x1 projection shortcut. Each trained model is converted with
`odenet.swap_blocks(select=<block class>, branches=..., merge=True)`: blocks that change the
state's shape stay discrete (`swap_report` says which), the others are ODE steps of their
residual branch over one unit of depth, and each stage's run of ODE steps is one solve under an
adaptive solver. The post-activation blocks are read two ways:

- `branch`: `F` = the residual branch (conv-BN-ReLU-conv-BN). `swap_blocks` refuses this with
  `strict=True` (the block differs from `x + F(x)`; the message is recorded); with
  `strict=False` it converts the block anyway and so drops the trailing ReLU.
- `block-x`: `F(x) = block(x) - x`, the whole block minus the identity, so the Euler form is
  the original model; any other solver integrates `dx/dt = relu(x + F(x)) - x`.

The pre-activation blocks are read by their branch (`v2`, exact). Every converted model is
evaluated on the test set (one batch of all 359 images, eval mode) under Euler with 1, 2, 4
steps per block, RK4 and dopri5 at several tolerances: test accuracy, the largest logit
difference from the original model, the share of predictions that agree with it, and the
evaluations of the ODE fields (NFE). Per block it also records `|F(x)| / |x|` and, for v1,
the share of `x + F(x)` that the trailing ReLU removes.

    python experiments/resnet_forms.py            # full run (4 models, 3 seeds; about 5 minutes on 2 idle CPU cores)
    python experiments/resnet_forms.py --quick    # smoke test (well under a minute)
    python experiments/resnet_forms.py --help     # every setting

Writes to `--out` (default `results/resnet_forms/`): `cross_eval.png`, `euler_gap.png`,
`blocks.png`, `training.png`, `results.json` (command, environment, settings, every model's
rows) and `results.md` (the tables). Each model and seed is a line of `results.jsonl` as it
finishes: a rerun with the same settings resumes; `--fresh` starts over.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

import odenet
from kit.data import load_digits
from kit.skeleton import (ResultLog, build_parser, command_line, digest, environment, key_fields, opt,
                          parse_config, save_figure, script_main, write_json)
from kit.training import resolve_device
from odenet.residual import ResidualRun

PROG = "resnet_forms.py"
MODELS = ("v1-basic", "v1-bottleneck", "v2-basic", "v2-bottleneck")


@dataclass
class ResNetFormsConfig:
    models: Tuple[str, ...] = opt(MODELS, "comma-separated models: v1-basic, v1-bottleneck, v2-basic, v2-bottleneck",
                                  key=False, metavar="M,M,...")
    blocks: int = opt(3, "blocks per stage (two stages; the first of stage 2 has a projection shortcut)", minimum=1)
    width: int = opt(16, "channels of stage 1 (basic) or its bottleneck width (bottleneck: 4x as many outputs)",
                     minimum=1)
    epochs: int = opt(30, "training epochs per model", minimum=1)
    batch_size: int = opt(128, "training batch size", minimum=1)
    lr: float = opt(0.05, "SGD learning rate (momentum 0.9, cosine schedule)", positive=True)
    weight_decay: float = opt(5e-4, "SGD weight decay", minimum=0.0)
    seeds: int = opt(3, "number of seeds (0, 1, ...) for initialisation and batch order", key=False, minimum=1)
    euler_steps: Tuple[int, ...] = opt((1, 2, 4), "Euler steps per block to evaluate under", minimum=1)
    rk4_steps: Tuple[int, ...] = opt((1, 2), "RK4 steps per block to evaluate under", minimum=1)
    dopri5_tols: Tuple[float, ...] = opt((1e-2, 1e-3, 1e-4), "dopri5 tolerances (rtol = atol) to evaluate under")
    max_steps: int = opt(2000, "dopri5 step limit per solve (a solve that hits it counts as failed)", minimum=1)
    n_train: int = opt(0, "use only the first N training images (0: all 1438)", minimum=0)
    device: str = opt("cpu", "cpu, cuda or auto", key=False, choices=["cpu", "cuda", "auto"])
    threads: int = opt(1, "torch CPU threads (the networks are small: one is fastest)", key=False, minimum=1)
    dpi: int = opt(110, "resolution of the PNG figures", key=False, minimum=1)
    out: str = opt(os.path.join("results", "resnet_forms"), "output directory", key=False)
    gallery: str = opt("", "also write small copies of the figures here (docs: docs/img/resnet_forms)", key=False)
    fresh: bool = opt(False, "start over instead of reusing the runs finished in OUT/results.jsonl", key=False)


QUICK = dict(blocks=2, width=8, epochs=2, seeds=1, n_train=256, euler_steps=(1, 2), rk4_steps=(1,), dopri5_tols=(1e-2,))


def parse_args(argv=None) -> ResNetFormsConfig:
    parser = build_parser(ResNetFormsConfig, prog=PROG, description=__doc__.split("\n\n")[0], quick=QUICK)
    return parse_config(ResNetFormsConfig, argv, parser=parser, quick=QUICK, check=check)


def check(config: ResNetFormsConfig) -> None:
    bad = [m for m in config.models if m not in MODELS]
    if bad or len(set(config.models)) != len(config.models):
        raise ValueError(f"--models must be a comma-separated subset of {','.join(MODELS)}, got {','.join(config.models)!r}.")
    resolve_device(config.device)  # cuda asked for without CUDA: one line, exit 2


# ---------------------------------------------------------------------------- the models, as their authors write them


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's post-activation basic block (He et al. 2016a): relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's post-activation bottleneck (stride on the 3x3, "ResNet v1.5"), expansion 4."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, self.expansion * planes, stride))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016b), expansion 4, stride on the 3x3."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, self.expansion * planes)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, self.expansion * planes, stride))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class ResNet(nn.Module):
    """torchvision's ResNet for 8x8 inputs (a 3x3 stem, no max-pool: the CIFAR variant), two stages."""

    def __init__(self, block, layers, width=16, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = conv3x3(1, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActResNet(nn.Module):
    """He et al. 2016b's pre-activation ResNet for 8x8 inputs: a bare conv stem, two stages, and the
    final BN-ReLU before pooling."""

    def __init__(self, block, num_blocks, width=16, num_classes=10):
        super().__init__()
        self.in_planes = width
        self.conv1 = conv3x3(1, width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.bn = nn.BatchNorm2d(2 * width * block.expansion)
        self.linear = nn.Linear(2 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


BLOCKS = {"v1-basic": BasicBlock, "v1-bottleneck": Bottleneck, "v2-basic": PreActBlock, "v2-bottleneck": PreActBottleneck}


def build(name: str, blocks: int, width: int) -> nn.Module:
    """One of `MODELS`, `blocks` per stage."""
    cls = ResNet if name.startswith("v1") else PreActResNet
    return cls(BLOCKS[name], [blocks, blocks], width=width)


def residual_branch(block: nn.Module) -> nn.Module:
    """The block's residual branch `F` as a function of the state (same-shape blocks)."""
    if isinstance(block, BasicBlock):
        return lambda x: block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    if isinstance(block, Bottleneck):
        return lambda x: block.bn3(block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))))
    if isinstance(block, PreActBlock):
        return lambda x: block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(x))))))
    return lambda x: block.conv3(F.relu(block.bn3(block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(x)))))))))


#: How a block is read as `x + F(x)`: its residual branch, or the whole block minus the identity.
READINGS = {
    "branch": lambda b: (residual_branch(b),),
    "block-x": lambda b: (lambda x: b(x) - x,),
}


def readings_of(name: str) -> List[str]:
    """v1 is read both ways; v2 by its branch (both are the same function there)."""
    return ["branch", "block-x"] if name.startswith("v1") else ["branch"]


def convert(model: nn.Module, name: str, reading: str, solver: str, **kw) -> nn.Module:
    """A converted copy of `model` (its blocks by `reading`, each stage's run merged)."""
    strict = not (name.startswith("v1") and reading == "branch")
    return odenet.swap_blocks(copy.deepcopy(model), solver, select=BLOCKS[name], branches=READINGS[reading],
                              merge=True, strict=strict, **kw)


# ---------------------------------------------------------------------------- training and evaluation


def train(model: nn.Module, data, config: ResNetFormsConfig, seed: int, device) -> List[Dict[str, float]]:
    """SGD with momentum and a cosine schedule in the original (discrete) form; one record per epoch."""
    x, y = data["x_train"], data["y_train"]
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(y) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = torch.randperm(len(y), generator=gen).to(device)
        loss_sum = correct = 0.0
        for i in range(0, len(y), config.batch_size):
            idx = perm[i:i + config.batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y[idx]).sum().item()
        history.append(dict(epoch=epoch, train_loss=loss_sum / len(y), train_accuracy=correct / len(y)))
    return history


def eval_configs(config: ResNetFormsConfig) -> List[Dict[str, Any]]:
    """The solver settings every converted model is evaluated under (`steps` count per block)."""
    rows = [dict(label=f"euler x{n}", solver="euler", kw=dict(steps=n)) for n in config.euler_steps]
    rows += [dict(label=f"rk4 x{n}", solver="rk4", kw=dict(steps=n)) for n in config.rk4_steps]
    rows += [dict(label=f"dopri5 {tol:g}", solver="dopri5", kw=dict(rtol=tol, atol=tol, max_steps=config.max_steps))
             for tol in sorted(config.dopri5_tols, reverse=True)]
    return rows


def _nfe(model: nn.Module) -> int:
    """Evaluations of the ODE fields in the last forward, summed over the converted runs."""
    return sum(m.last_stats.nfe_forward for m in model.modules() if isinstance(m, ResidualRun) and m.last_stats)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, reference: Tensor):
    """`(row, logits)`: test accuracy (one batch, eval mode), max |logits - reference|, agreement of
    predictions, NFE; logits `None` when the solve failed."""
    model.eval()
    try:
        logits = model(x)
    except odenet.SolverError as err:
        return dict(ok=False, message=str(err).splitlines()[0], accuracy=float("nan"), max_abs_logit_diff=float("nan"),
                    agreement=float("nan"), nfe=float("nan")), None
    return dict(ok=True, message="", accuracy=(logits.argmax(1) == y).float().mean().item(),
                max_abs_logit_diff=(logits - reference).abs().max().item(),
                agreement=(logits.argmax(1) == reference.argmax(1)).float().mean().item(), nfe=_nfe(model)), logits


def strict_refusal(model: nn.Module, name: str, x: Tensor) -> str:
    """What `swap_blocks(strict=True)` says about the branch reading (empty when it accepts it)."""
    converted = odenet.swap_blocks(copy.deepcopy(model).eval(), "euler", steps=1, select=BLOCKS[name],
                                   branches=READINGS["branch"], merge=True)
    try:
        with torch.no_grad():
            converted(x)
    except ValueError as err:
        return str(err)
    return ""


@torch.no_grad()
def block_diagnostics(model: nn.Module, name: str, x: Tensor) -> List[Dict[str, Any]]:
    """Per block on `x` (eval mode), for the same-shape blocks: `|F(x)|/|x|` (the branch),
    `|block(x) - x|/|x|` and, for v1, the share `|relu(s) - s| / |s|` of `s = x + F(x)` that the
    trailing ReLU removes."""
    model.eval()
    rows, h = [], x
    for stage in ("layer1", "layer2"):
        if stage == "layer1":  # the stem
            h = model.relu(model.bn1(model.conv1(h))) if name.startswith("v1") else model.conv1(h)
        for i, block in enumerate(getattr(model, stage)):
            out = block(h.clone())  # a copy: torchvision's blocks write into their output in place
            row = dict(block=f"{stage}.{i}", projection=out.shape != h.shape)
            if not row["projection"]:
                s = h + residual_branch(block)(h)
                row["branch_ratio"] = (s - h).norm().item() / h.norm().item()
                row["step_ratio"] = (out - h).norm().item() / h.norm().item()  # |block(x) - x| / |x|
                row["relu_removes"] = (F.relu(s) - s).norm().item() / s.norm().item() if name.startswith("v1") else 0.0
            rows.append(row)
            h = out
    return rows


def run_model(name: str, seed: int, config: ResNetFormsConfig, data, device) -> Dict[str, Any]:
    """Train one model, then convert and evaluate it under every reading and solver setting."""
    torch.manual_seed(1000 * seed + MODELS.index(name))
    model = build(name, config.blocks, config.width).to(device)
    start = time.perf_counter()
    history = train(model, data, config, seed, device)
    train_seconds = time.perf_counter() - start
    x, y = data["x_test"], data["y_test"]
    model.eval()
    with torch.no_grad():
        reference = model(x)
    original = dict(accuracy=(reference.argmax(1) == y).float().mean().item())
    rows, reports = [], {}
    start = time.perf_counter()
    for reading in readings_of(name):
        mine = []
        for cfg in eval_configs(config):
            converted = convert(model, name, reading, cfg["solver"], **cfg["kw"])
            row = dict(reading=reading, label=cfg["label"], solver=cfg["solver"], **cfg["kw"])
            result, logits = evaluate(converted, x, y, reference)
            mine.append((dict(row, **result), logits))
            if cfg["solver"] == "dopri5" and reading not in reports:
                reports[reading] = odenet.swap_report(converted)
        ode = mine[-1][1] if config.dopri5_tols else None  # the tightest dopri5 solve: the ODE's solution
        for row, logits in mine:
            row["max_abs_diff_to_ode"] = float("nan") if ode is None or logits is None else (logits - ode).abs().max().item()
            rows.append(row)
    return dict(model=name, seed=seed, original=original, history=history, train_seconds=train_seconds,
                eval_seconds=time.perf_counter() - start, rows=rows, swap_reports=reports,
                strict_refusal=strict_refusal(model, name, x), blocks=block_diagnostics(model, name, x),
                parameters=sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------- summary, tables, figures


def variants(results: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(model, reading) pairs in order of appearance."""
    seen = []
    for r in results:
        for row in r["rows"]:
            if (r["model"], row["reading"]) not in seen:
                seen.append((r["model"], row["reading"]))
    return seen


def summarise(results: List[Dict[str, Any]], config: ResNetFormsConfig) -> Dict[str, Any]:
    """Means (and, over several seeds, min/max) per model, reading and solver setting."""
    labels = [c["label"] for c in eval_configs(config)]
    out: Dict[str, Any] = {"original": {}, "cross_eval": {}}
    for name in config.models:
        mine = [r for r in results if r["model"] == name]
        accs = [r["original"]["accuracy"] for r in mine]
        out["original"][name] = dict(accuracy=float(np.mean(accs)), min=min(accs), max=max(accs),
                                     final_train_loss=float(np.mean([r["history"][-1]["train_loss"] for r in mine])))
    for name, reading in variants(results):
        mine = [r for r in results if r["model"] == name]
        per_label = {}
        for label in labels:
            rows = [row for r in mine for row in r["rows"] if row["reading"] == reading and row["label"] == label]
            entry = {}
            for key in ("accuracy", "max_abs_logit_diff", "max_abs_diff_to_ode", "agreement", "nfe"):
                vals = np.array([row[key] for row in rows], dtype=float)
                entry[key] = float(np.mean(vals))
                entry[key + "_min"], entry[key + "_max"] = float(np.min(vals)), float(np.max(vals))
            entry["failed"] = sum(not row["ok"] for row in rows)
            per_label[label] = entry
        out["cross_eval"][f"{name} / {reading}"] = per_label
    return out


def _fmt_diff(v: float) -> str:
    return "0 (exact)" if v == 0 else f"{v:.2g}"


def tables(summary: Dict[str, Any], results: List[Dict[str, Any]], config: ResNetFormsConfig) -> str:
    """The markdown tables of results.md."""
    labels = [c["label"] for c in eval_configs(config)]
    seeds = config.seeds
    L = [f"Means over {seeds} seed(s); test set: 359 images, one batch, eval mode.", "",
         "| model | parameters | test accuracy (original) | final training loss |", "|---|---|---|---|"]
    params = {r["model"]: r["parameters"] for r in results}
    for name, s in summary["original"].items():
        spread = f" ({s['min']:.3f}-{s['max']:.3f})" if seeds > 1 else ""
        L.append(f"| {name} | {params[name]} | {s['accuracy']:.3f}{spread} | {s['final_train_loss']:.4f} |")
    for title, key, fmt in (("Test accuracy", "accuracy", lambda v: f"{v:.3f}"),
                            ("Largest |logit difference| from the original model", "max_abs_logit_diff", _fmt_diff),
                            (f"Largest |logit difference| from the ODE's solution (dopri5 at {min(config.dopri5_tols, default=0):g})",
                             "max_abs_diff_to_ode", _fmt_diff),
                            ("Predictions that agree with the original model", "agreement", lambda v: f"{v:.3f}"),
                            ("NFE (evaluations of the ODE fields per forward pass, all stages)", "nfe", lambda v: f"{v:.0f}")):
        if key == "max_abs_diff_to_ode" and not config.dopri5_tols:
            continue
        L += ["", f"**{title}**" + (" (max over seeds)" if key.startswith("max_abs") else ""), "",
              "| model / reading | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for variant, per_label in summary["cross_eval"].items():
            cells = []
            for label in labels:
                e = per_label[label]
                v = e[key + "_max"] if key.startswith("max_abs") else e[key]
                spread = f" ({e[key + '_min']:.3f}-{e[key + '_max']:.3f})" if key == "accuracy" and seeds > 1 else ""
                if key == "max_abs_diff_to_ode" and label == labels[-1]:
                    cells.append("(reference)")
                    continue
                cells.append(("failed " if e["failed"] else "") + fmt(v) + spread)
            L.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(L + _details(results))


def _details(results: List[Dict[str, Any]]) -> List[str]:
    """Per-block diagnostics, swap reports and the strict refusal, for seed 0."""
    L = ["", "**Per block (seed 0, test set): |F(x)|/|x| (branch); for v1 also |block(x) - x|/|x| and "
         "|relu(s) - s|/|s| with s = x + F(x)**", "",
         "| model | " + " | ".join(b["block"] for b in results[0]["blocks"]) + " |",
         "|---|" + "---|" * len(results[0]["blocks"])]
    first = [r for r in results if r["seed"] == 0]
    for r in first:
        cells = ["projection" if b["projection"] else f"{b['branch_ratio']:.2f}"
                 + (f" / {b['step_ratio']:.2f} / {b['relu_removes']:.2f}" if r["model"].startswith("v1") else "")
                 for b in r["blocks"]]
        L.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    for r in first:  # the readings of a model convert the same blocks: one report each
        reading, report = next(iter(r["swap_reports"].items()))
        L += ["", f"swap_report, {r['model']} / {reading} (dopri5):", "", "```text", report, "```"]
    for r in first:
        if r["strict_refusal"]:
            L += ["", f"swap_blocks with strict=True, {r['model']} / branch, on the first forward:", "", "```text",
                  r["strict_refusal"], "```"]
    return L


def _style(ax) -> None:
    ax.grid(True, color="0.9", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


COLOURS = {"v1-basic": "#d62728", "v1-bottleneck": "#ff7f0e", "v2-basic": "#1f77b4", "v2-bottleneck": "#2ca02c"}
STYLES = {"branch": "-", "block-x": ":"}


def _label(variant: str) -> str:
    name, reading = variant.split(" / ")
    if name.startswith("v2"):
        return f"{name} (branch, exact)"
    return f"{name}, " + ("branch (ReLU dropped)" if reading == "branch" else "block(x) - x")


def cross_eval_figure(summary, config: ResNetFormsConfig) -> Figure:
    """Test accuracy and agreement with the original under each solver setting, one line per model and reading."""
    labels = [c["label"] for c in eval_configs(config)]
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    for k, (key, title) in enumerate((("accuracy", "test accuracy"), ("agreement", "predictions agreeing with the original"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for variant, per_label in summary["cross_eval"].items():
            name, reading = variant.split(" / ")
            ax.plot(range(len(labels)), [per_label[lb][key] for lb in labels], STYLES[reading], marker="o", ms=4,
                    color=COLOURS[name], label=_label(variant))
        if key == "accuracy":
            for name, s in summary["original"].items():
                ax.axhline(s["accuracy"], color=COLOURS[name], lw=0.7, alpha=0.5)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, fontsize=8)
        ax.set_title(title + (" (thin lines: the original models)" if key == "accuracy" else ""), fontsize=10)
        _style(ax)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("Trained ResNets converted by swap_blocks, evaluated under other solvers (steps per block)", fontsize=10)
    return fig


def euler_gap_figure(summary, config: ResNetFormsConfig) -> Figure:
    """The largest logit difference from the original and from the ODE's solution (the tightest
    dopri5) per solver setting, 0 drawn at a floor; test accuracy against NFE."""
    labels = [c["label"] for c in eval_configs(config)]
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    floor = 1e-9
    for variant, per_label in summary["cross_eval"].items():
        name, reading = variant.split(" / ")
        for ax, key in zip(axes, ("max_abs_logit_diff_max", "max_abs_diff_to_ode_max")):
            diffs = [max(per_label[lb][key], floor) for lb in labels]
            ax.plot(range(len(labels)), diffs, STYLES[reading], marker="o", ms=4, color=COLOURS[name], label=_label(variant))
        for solver, marker in (("euler", "o"), ("rk4", "s"), ("dopri5", "^")):
            mine = [c["label"] for c in eval_configs(config) if c["solver"] == solver]
            axes[2].plot([per_label[lb]["nfe"] for lb in mine], [per_label[lb]["accuracy"] for lb in mine],
                         STYLES[reading], marker=marker, ms=5, color=COLOURS[name])
    tight = f"dopri5 {min(config.dopri5_tols, default=0):g}"
    for ax, title in zip(axes, ("max |logits - original ResNet's logits|", f"max |logits - ODE solution's logits| ({tight})")):
        ax.axhline(floor, color="0.5", lw=0.6)
        ax.text(0, floor * 1.6, "0 (bit for bit) is drawn here", fontsize=7, color="0.4")
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, fontsize=8)
        ax.set_title(title + ", max over seeds", fontsize=9)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("NFE per forward pass (ODE fields, all stages)")
    axes[2].set_title("test accuracy against NFE (o euler, s rk4, ^ dopri5)", fontsize=9)
    for a in axes:
        _style(a)
    axes[0].legend(fontsize=7)
    return fig


def blocks_figure(results, config: ResNetFormsConfig) -> Figure:
    """Per block: |F(x)|/|x| and, for v1, the share of x + F(x) the trailing ReLU removes (seed 0)."""
    fig = Figure(figsize=(13, 4.0), layout="constrained")
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in results:
        if r["seed"] != 0:
            continue
        name = r["model"]
        pts = [(i, b) for i, b in enumerate(r["blocks"]) if not b["projection"]]
        ax.plot([i for i, _ in pts], [b["branch_ratio"] for _, b in pts], marker="o", ms=4, color=COLOURS[name],
                label=f"{name}: |F(x)|/|x|")
        if name.startswith("v1"):
            ax.plot([i for i, _ in pts], [b["step_ratio"] for _, b in pts], ":", marker="o", ms=4, color=COLOURS[name],
                    label=f"{name}: |block(x) - x|/|x|")
        if name.startswith("v1"):
            bx.plot([i for i, _ in pts], [b["relu_removes"] for _, b in pts], marker="o", ms=4, color=COLOURS[name],
                    label=name)
    ax.set_title("size of each same-shape block's step, relative to its input", fontsize=10)
    bx.set_title("v1: |relu(x + F(x)) - (x + F(x))| / |x + F(x)| (what the trailing ReLU removes)", fontsize=10)
    names = [b["block"] for b in results[0]["blocks"]]
    for a in (ax, bx):
        a.set_xticks(range(len(names)))
        a.set_xticklabels(names, fontsize=8)
        a.set_xlabel("block (projection blocks are not ODE steps: no point)")
        _style(a)
        if a.get_lines():
            a.legend(fontsize=7)
    return fig


def training_figure(results, config: ResNetFormsConfig) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        ax.plot([h["epoch"] for h in r["history"]], [h["train_loss"] for h in r["history"]], color=COLOURS[r["model"]],
                lw=1.2, alpha=1.0 if r["seed"] == 0 else 0.5, label=r["model"] if r["seed"] == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (running mean over the epoch)")
    _style(ax)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------- main


def load_data(config: ResNetFormsConfig, device) -> Dict[str, Tensor]:
    ds = load_digits(seed=0)
    n = config.n_train or ds.num_train
    return dict(x_train=ds.x_train[:n].to(device), y_train=ds.y_train[:n].to(device),
                x_test=ds.x_test.to(device), y_test=ds.y_test.to(device))


def main(argv=None) -> int:
    return script_main(PROG, parse_args, run, argv)


def run(config: ResNetFormsConfig, argv=None) -> Dict[str, Any]:
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    log = ResultLog(config.out, fresh=config.fresh)
    settings = key_fields(config)
    data = load_data(config, device)
    results = []
    start = time.perf_counter()
    for seed in range(config.seeds):
        for name in config.models:
            key = digest(dict(settings, model=name, seed=seed))
            resumed = key in log.done
            r = log.done[key] if resumed else log.add(key, run_model(name, seed, config, data, device))
            results.append(r)
            euler1 = {row["reading"]: row for row in r["rows"] if row["label"] == f"euler x{config.euler_steps[0]}"}
            print(f"seed {seed} {name:14s} test acc {r['original']['accuracy']:.3f}  "
                  + "  ".join(f"{k}: {v['label']} diff {v['max_abs_logit_diff']:.2g} acc {v['accuracy']:.3f}"
                              for k, v in euler1.items())
                  + f"  ({r['train_seconds']:.0f}s train, {r['eval_seconds']:.0f}s eval)"
                  + (" (from results.jsonl)" if resumed else ""), flush=True)
    summary = summarise(results, config)
    for fig, name in ((cross_eval_figure(summary, config), "cross_eval.png"),
                      (euler_gap_figure(summary, config), "euler_gap.png"),
                      (blocks_figure(results, config), "blocks.png"), (training_figure(results, config), "training.png")):
        save_figure(fig, name, out=config.out, dpi=config.dpi, gallery=config.gallery)
    env = environment(device)
    result = dict(experiment="resnet_forms", command=command_line(PROG, argv), environment=env,
                  config=dataclasses.asdict(config), summary=summary, runs=results,
                  total_seconds=time.perf_counter() - start)
    write_json(os.path.join(config.out, "results.json"), result)
    text = tables(summary, results, config)
    header = (f"Command: `{result['command']}`  \nCommit: {env['commit']}; torch {env['torch']}, odenet {env['odenet']}, "
              f"Python {env['python']}; {env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads), "
              f"device {env['device']}" + (f" ({env['gpu']})" if env["gpu"] else "") + "\n\n")
    with open(os.path.join(config.out, "results.md"), "w") as fh:
        fh.write(header + text + "\n")
    print("\n" + text)
    print(f"\nfigures, results.json and results.md written to {os.path.join(os.path.abspath(config.out), '')}")
    return result


if __name__ == "__main__":
    sys.exit(main())

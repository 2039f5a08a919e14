"""Shared test helpers. Keep this file small: helpers that several test modules need, each well named."""

from __future__ import annotations

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and every BatchNorm running statistic random values, in place.

    torchvision zero-initialises some layers (the last BatchNorm of residual blocks, some heads), which
    makes comparisons of two models vacuous: a zeroed branch hides any error in it. Scales keep
    activations of the order of one through deep networks: weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.25),
    running means ~ N(0, 0.04), running variances ~ U(0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False):
                scale = p[0].numel() ** -0.5 if p.dim() > 1 else 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model

"""Helpers for checking pruned models (tests, benchmarks, users' own checks), in the spirit of
`torch.testing`. Each mutates the model it is given (hence the trailing underscore)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and every BatchNorm running statistic random values, in place.

    torchvision zero-initialises some layers (the last BatchNorm of residual blocks, some heads). That makes
    a comparison of two models vacuous: a zeroed branch hides any error in it. The scales keep activations
    of the order of one through deep networks: weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.25), running
    means ~ N(0, 0.04), running variances ~ U(0.5, 1.5)."""
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


def calibrate_batchnorm_(
    model: nn.Module, input_shape: tuple[int, int, int], batches: int = 1, batch_size: int = 4
) -> nn.Module:
    """Re-estimate BatchNorm statistics on random inputs, so an untrained model gives outputs of a sensible
    scale in eval mode (mobilenet_v3_small with weights=None outputs ~1e-9 otherwise). The model is left
    in eval mode."""
    from prunekit.runtime import model_device
    from prunekit.trainer import recalibrate_batchnorm

    device = model_device(model)
    data = [(torch.randn(batch_size, *input_shape), None) for _ in range(batches)]
    recalibrate_batchnorm(model, data, device, batches)
    return model.eval()


__all__ = ["calibrate_batchnorm_", "randomize_"]

"""An independent PyTorch model of the CRAD semantics, written from the method specification.

Used by the parity tests and by the side-by-side benchmark. Module and parameter names follow
the official CRAD checkpoints (`query.0`, `coord_.0`, `layer.3.conv.5.fc.0`, `recover`, ...), so
its state dict, prefixed with `module.reconstruction.`, is what an official checkpoint holds.
The backbone is the `efficientnet_pytorch` package (B-series) or `efficientnet_lite_pytorch`
(Lite), run block by block so that stage outputs can be taken.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HSwish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class HSigmoid(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // 4, bias=False),
            nn.ReLU(),
            nn.Linear(channels // 4, channels, bias=False),
            HSigmoid(),
        )

    def forward(self, x):
        gate = self.fc(x.mean(dim=(2, 3)))
        return x * gate[:, :, None, None]


class Bottleneck(nn.Module):
    """MobileNetV3 block as CRAD uses it: SE placed before the second h-swish."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(width, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            HSwish(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            SqueezeExcite(hidden),
            HSwish(),
            nn.Conv2d(hidden, width, 1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x):
        return x + self.conv(x)


class TorchCRAD(nn.Module):
    """The reconstruction module. Input and output NCHW."""

    def __init__(
        self,
        channels: int,
        feature_hw: tuple[int, int],
        local_resol: int = 8,
        global_resol: int = 4,
        layers: int = 11,
        ch_exp: int = 864,
        upsample: int = 8,
    ):
        super().__init__()
        c = channels
        h, w = feature_hw
        self.query = nn.ParameterList(
            [
                nn.Parameter(nn.init.xavier_normal_(torch.empty(1, c, local_resol, local_resol))),
                nn.Parameter(
                    nn.init.xavier_normal_(torch.empty(1, c * h * w, global_resol, global_resol))
                ),
            ]
        )
        self.coord_ = nn.Sequential(nn.Linear(c, c), nn.Tanh(), nn.Linear(c, 2), nn.Tanh())
        self.coord = nn.Sequential(nn.Conv2d(c, c, 1), nn.Tanh(), nn.Conv2d(c, 2, 1), nn.Tanh())
        self.layer = nn.Sequential(*[Bottleneck(2 * c, ch_exp) for _ in range(layers)])
        self.recover = nn.Conv2d(2 * c, c, 1, bias=False)
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=upsample)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x, local_noise=None):
        """x: `[B, C, H, W]`. `local_noise` `[B, 2, H, W]` is added to the local coordinates
        when given (the caller decides the coin, so tests can inject the JAX draw)."""
        b, c, h, w = x.shape
        v_global = self.coord_(x.mean(dim=(2, 3)))
        v_local = self.coord(x)
        if local_noise is not None:
            v_local = v_local + local_noise
        f_global = F.grid_sample(
            self.query[1], v_global.view(1, b, 1, 2), align_corners=False
        )  # [1, C*H*W, B, 1]
        f_global = f_global.permute(2, 3, 0, 1).reshape(b, c, h, w)
        f_local = F.grid_sample(
            self.query[0].expand(b, -1, -1, -1), v_local.permute(0, 2, 3, 1), align_corners=False
        )
        r = self.recover(self.layer(torch.cat([f_global, f_local], dim=1)))
        mse = ((r - x) ** 2).mean(dim=1)
        gate = 1 - torch.round((mse * 0.05).clamp(0, 1))
        cos = F.cosine_similarity(r, x, dim=1)
        s = (0.3 * gate + 0.7 * cos).unsqueeze(1)
        x_hat = s * x + (1 - s) * r
        distance = torch.sqrt(((x_hat - x) ** 2).sum(dim=1, keepdim=True))
        return {
            "reconstruction": r,
            "feature_rec": x_hat,
            "similarity": s[:, 0],
            "distance": distance[:, 0],
            "anomaly_map": self.upsample(distance)[:, 0],
            "global_coord": v_global,
            "local_coord": v_local,
        }


def mfcn(features, strides, out_stride):
    return torch.cat(
        [
            nn.UpsamplingBilinear2d(scale_factor=s // out_stride)(f) if s != out_stride else f
            for f, s in zip(features, strides, strict=True)
        ],
        dim=1,
    )


def efficientnet(name: str, size: int = 96):
    """A lukemelas-layout EfficientNet with random weights and BN statistics calibrated on
    random inputs of `size` px, so activations stay O(1) through the random network."""
    if "lite" in name:
        from efficientnet_lite_pytorch import EfficientNet
    else:
        from efficientnet_pytorch import EfficientNet
    model = EfficientNet.from_name(name)
    calibrate_batchnorm(model, torch.rand(2, 3, size, size) * 4 - 2)
    return model.eval()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, inputs: torch.Tensor) -> None:
    """Set every BN's running stats to one batch's statistics (so random nets stay O(1)), and
    randomise the affine parameters so the conversion of scale/bias is exercised."""
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.momentum = 1.0
        module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    model.train()
    model(inputs)
    model.eval()
    for module, momentum in zip(norms, momenta, strict=True):
        module.momentum = momentum


def block_outputs(model, x, blocks):
    """Outputs of the given block indices (after the residual add), NCHW, eval mode."""
    outputs = {}
    x = model._swish(model._bn0(model._conv_stem(x)))
    for idx, block in enumerate(model._blocks):
        x = block(x, drop_connect_rate=None)
        if idx in blocks:
            outputs[idx] = x
        if idx >= max(blocks):
            break
    return [outputs[b] for b in blocks]


class TorchGrad(nn.Module):
    """Backbone + MFCN + CRAD, taking NCHW input already normalised for the backbone."""

    def __init__(self, backbone, out_blocks, strides, out_stride, head: TorchCRAD):
        super().__init__()
        self.backbone = backbone
        self.out_blocks = list(out_blocks)
        self.strides = list(strides)
        self.out_stride = out_stride
        self.reconstruction = head

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: running statistics, as the reference keeps it
        return self

    def forward(self, x, local_noise=None):
        with torch.no_grad():
            features = block_outputs(self.backbone, x, self.out_blocks)
            x_align = mfcn(features, self.strides, self.out_stride)
        out = self.reconstruction(x_align, local_noise)
        out["feature_align"] = x_align
        return out

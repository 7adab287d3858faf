"""The ops of the AutoAugment family on a uint8 (k, C, H, W) sub-batch, with a magnitude per
sample (k,): torchvision.transforms.v2's kernels and rounding, vectorized over the magnitude.
Sample i of the output equals torchvision's op on image i at magnitude i, bit for bit
(tests/test_augment_policies.py); nearest interpolation, fill 0 outside the image.
Magnitudes: shears tan(angle), translations pixels, rotation degrees (counter-clockwise),
colour ops factor - 1, Posterize bits, Solarize a 0..255 threshold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.float().view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a factor per sample; uint8 output truncates as it does."""
    f = _per_sample(factor)
    # addcmul rounds as torchvision's mul().add_(alpha=) does (one fused multiply-add).
    other = other.expand(image.shape)
    return torch.addcmul(image.float() * f, other, 1.0 - f).clamp_(0, 255).to(torch.uint8)


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    if image.shape[1] == 1:
        return image.float()
    r, g, b = image.unbind(1)
    # torchvision's exact operation order, so the floor lands on the same integers.
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _brightness(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(1.0 + magnitude)
    return (image.float() * factor).clamp_(0, 255).to(torch.uint8)


def _color(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    if image.shape[1] == 1:  # saturation of a grayscale image: unchanged (as PIL)
        return image
    return _blend(image, _grayscale(image), 1.0 + magnitude)


def _contrast(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, 1.0 + magnitude)


def _sharpness(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    channels, height, width = image.shape[1:]
    if height <= 2 or width <= 2:
        return image
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]],
                          device=image.device) / 13.0
    out = image.float()
    blurred = F.conv2d(out, kernel.expand(channels, 1, 3, 3), groups=channels).round_()
    inner = out[..., 1:-1, 1:-1]  # the border keeps its pixels, as in torchvision
    inner.add_((blurred - inner) * (1.0 - _per_sample(1.0 + magnitude)))
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    bits = magnitude.long()
    mask = (0xFF << (8 - bits)) & 0xFF
    return image & mask.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return torch.where(image >= _per_sample(magnitude), 255 - image, image)


def _affine(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp by per-sample inverse matrices `theta` (k, 2, 3) in torchvision's
    frame (pixel units, origin at the image centre); outside pixels are 0. As torchvision's
    affine_image with a matrix per sample."""
    k, _, height, width = image.shape
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=image.device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=image.device)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, device=image.device)], -1).view(1, -1, 3)
    scale = torch.tensor([0.5 * width, 0.5 * height], device=image.device)
    grid = base.expand(k, -1, -1).bmm(theta.float().transpose(1, 2) / scale)
    out = F.grid_sample(image.float(), grid.view(k, height, width, 2), mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _theta(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
           f: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b, c, d, e, f], 1).view(-1, 2, 3)


def _shear_x(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    # torchvision shears by atan(m) degrees about the top-left corner: x_src = x + m*y + m*H/2.
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(image, _theta(one, m, m * image.shape[-2] / 2, zero, one, zero))


def _shear_y(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(image, _theta(one, zero, zero, m, one, m * image.shape[-1] / 2))


def _translate_x(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    shift = magnitude.double().trunc()  # torchvision: int(magnitude) pixels
    one, zero = torch.ones_like(shift), torch.zeros_like(shift)
    return _affine(image, _theta(one, zero, -shift, zero, one, zero))


def _translate_y(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    shift = magnitude.double().trunc()
    one, zero = torch.ones_like(shift), torch.zeros_like(shift)
    return _affine(image, _theta(one, zero, zero, zero, one, -shift))


def _rotate(image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    # Counter-clockwise by `magnitude` degrees about the image centre.
    angle = magnitude.double() * (math.pi / 180.0)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return _affine(image, _theta(cos, -sin, zero, sin, cos, zero))


OP_FUNCTIONS = {
    "ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x,
    "TranslateY": _translate_y, "Rotate": _rotate, "Brightness": _brightness, "Color": _color,
    "Contrast": _contrast, "Sharpness": _sharpness, "Posterize": _posterize,
    "Solarize": _solarize,
    # No magnitude; torchvision's kernels already work per image on a batch.
    "AutoContrast": lambda image, _: TF.autocontrast(image),
    "Equalize": lambda image, _: TF.equalize(image),
    "Invert": lambda image, _: TF.invert(image),
}

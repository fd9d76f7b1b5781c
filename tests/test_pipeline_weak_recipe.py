"""The weak recipe's batched torch ops (pipeline/recipes.py) against torchvision/PIL, the paper's code path.

Colour jitter is one matrix per crop: each factor alone matches torchvision's op (brightness, contrast,
saturation; contrast about the crop's grey MEAN as torchvision does, not about grey 128 as DALI's
color_twist, which the f9e9db5 loader used). Hue is a YIQ rotation (as DALI's), not torchvision's HSV shift:
it keeps luma and chroma. Blur is torchvision's Gaussian at 3 sigma, solarize PIL's at 128.
"""

from types import SimpleNamespace

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from mugs.pipeline.recipes import weak_recipe

YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])  # NTSC


def _images() -> torch.Tensor:
    """Smooth colour images plus two dark grey ones (a bright item on black, as Fashion-MNIST)."""
    rng = np.random.default_rng(0)
    base = torch.tensor(rng.random((6, 3, 6, 6)) * 255, dtype=torch.float32)
    colour = torch.nn.functional.interpolate(base, size=(40, 40), mode="bilinear", align_corners=False)
    dark = torch.zeros(2, 3, 40, 40)
    dark[0, :, 8:30, 12:28] = 200
    dark[1, :, 4:36, 16:24] = torch.linspace(60, 250, 32)[:, None]
    return torch.cat([colour, dark]).round()


def _draws(n, jitter=None, gray=None, sigma=None, solarize=None):
    """Draws of n crops of one kind (the crop-major [1, n] layout the recipe reshapes)."""
    jitter = np.tile([1.0, 1.0, 1.0, 0.0], (n, 1)) if jitter is None else jitter
    return SimpleNamespace(
        jitter=jitter[None],
        gray=np.zeros((1, n), bool) if gray is None else gray[None],
        blur_sigma=np.zeros((1, n)) if sigma is None else sigma[None],
        solarize=np.zeros((1, n), bool) if solarize is None else solarize[None],
    )


def _tv(x: torch.Tensor, op, factors) -> torch.Tensor:
    return torch.stack([op(x[i].to(torch.uint8), float(f)).float() for i, f in enumerate(factors)])


def test_each_jitter_factor_matches_torchvision():
    x = _images()
    n = len(x)
    f = np.linspace(0.6, 1.4, n)
    s = np.linspace(0.8, 1.2, n)
    for col, values, op in ((0, f, TF.adjust_brightness), (1, f, TF.adjust_contrast), (2, s, TF.adjust_saturation)):
        jit = np.tile([1.0, 1.0, 1.0, 0.0], (n, 1))
        jit[:, col] = values
        ours = weak_recipe(x.clone(), _draws(n, jitter=jit))
        diff = (ours - _tv(x, op, values)).abs()
        assert diff.mean() < 1.0 and diff.max() <= 2.0, (op.__name__, diff.mean().item(), diff.max().item())
    # contrast 0.6 on the black background of an item: (1 - c) x the grey mean (torchvision), not x 128
    jit = np.tile([1.0, 0.6, 1.0, 0.0], (n, 1))
    ours = weak_recipe(x.clone(), _draws(n, jitter=jit))
    mean = x[-2].mean().item()
    assert abs(ours[-2, :, 0, 0].mean().item() - 0.4 * mean) <= 1.0 and 0.4 * mean < 0.4 * 128 - 10


def test_grayscale_and_hue():
    x = _images()
    n = len(x)
    ours = weak_recipe(x.clone(), _draws(n, gray=np.ones(n, bool)))
    assert (ours - TF.rgb_to_grayscale(x.to(torch.uint8), 3).float()).abs().max() < 1.5  # ours is not rounded
    jit = np.tile([1.0, 1.0, 1.0, 0.1], (n, 1))
    ours = weak_recipe(x.clone(), _draws(n, jitter=jit))
    yiq = torch.einsum("kc,nchw->nkhw", YIQ, x), torch.einsum("kc,nchw->nkhw", YIQ, ours)
    inside = ((ours > 0) & (ours < 255)).all(1)  # where the rotation did not clip at 0 or 255
    assert (yiq[1][:, 0] - yiq[0][:, 0]).abs()[inside].max() < 0.01  # it keeps luma (Y) ...
    iq_size = [t[:, 1:].norm(dim=1)[inside] for t in yiq]
    assert (iq_size[1] - iq_size[0]).abs().max() < 0.01  # ... and the chroma's size (|I, Q|)
    assert (ours - x)[:6].abs().mean() > 5.0  # and turns the colours


def test_blur_and_solarize_match_torchvision_and_pil():
    x = _images()
    n = len(x)
    sigma = np.linspace(0.1, 2.0, n)
    ours = weak_recipe(x.clone(), _draws(n, sigma=sigma))
    for i, sg in enumerate(sigma):
        k = int(2 * np.ceil(3 * sg) + 1)
        ref = TF.gaussian_blur(x[i][None], [k, k], [float(sg)] * 2)[0]
        assert (ours[i] - ref).abs().max() < 0.01, sg
    sol = np.arange(n) % 2 == 0
    ours = weak_recipe(x.clone(), _draws(n, solarize=sol))
    for i in range(n):
        ref = x[i]
        if sol[i]:
            pil = ImageOps.solarize(Image.fromarray(x[i].permute(1, 2, 0).numpy().astype(np.uint8)), 128)
            ref = torch.tensor(np.asarray(pil), dtype=torch.float32).permute(2, 0, 1)
        assert torch.equal(ours[i], ref)

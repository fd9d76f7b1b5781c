"""Each batched torch RandAugment op (pipeline/randaug.py) against timm's PIL op at the same level."""

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from mugs.pipeline.randaug import FILL, OP_NAMES, rand_augment

LEVEL = 6.0
# our op -> (timm op name, worst allowed mean |ours - PIL| in grey levels)
CASES = {
    "AutoContrast": ("AutoContrast", 1.0),
    "Equalize": ("Equalize", 1.0),
    "Invert": ("Invert", 0.0),
    "Rotate": ("Rotate", 3.0),
    "Posterize": ("PosterizeIncreasing", 0.0),
    "Solarize": ("SolarizeIncreasing", 0.0),
    "SolarizeAdd": ("SolarizeAdd", 0.0),
    "Color": ("ColorIncreasing", 1.0),
    "Contrast": ("ContrastIncreasing", 1.0),
    "Brightness": ("BrightnessIncreasing", 1.0),
    "Sharpness": ("SharpnessIncreasing", 1.0),
    "ShearX": ("ShearX", 3.0),
    "ShearY": ("ShearY", 3.0),
    "TranslateXRel": ("TranslateXRel", 3.0),
    "TranslateYRel": ("TranslateYRel", 3.0),
}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _image():
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    img = np.stack([x * 3, y * 3, 128 + 60 * np.sin((x + y) / 9)], -1)
    img[20:40, 24:44] = (230, 40, 90)
    img += np.random.default_rng(0).normal(0, 15, img.shape)  # texture for sharpness
    return np.clip(img, 0, 255).astype(np.uint8)


def _timm(name, img, sign):
    """timm's op at LEVEL, with the random sign fixed to `sign` (timm would draw it)."""
    from timm.data import auto_augment as aa

    hp = dict(translate_pct=0.45, img_mean=(int(FILL),) * 3)
    args = aa.LEVEL_TO_ARG[name](LEVEL, hp) if aa.LEVEL_TO_ARG[name] else ()
    if name in GEOMETRIC:
        args = (abs(args[0]) * sign,)
    elif name.endswith("Increasing") and name not in ("PosterizeIncreasing", "SolarizeIncreasing"):
        args = (1.0 + sign * abs(args[0] - 1.0),)  # enhance factor 1 +- 0.9 level / 10
    out = aa.NAME_TO_OP[name](Image.fromarray(img), *args, fillcolor=(int(FILL),) * 3, resample=Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def test_ops_match_timm_in_one_batched_call():
    img = _image()
    n = len(OP_NAMES)
    worst = {}
    for sign in (1.0, -1.0):
        # every op on its own copy of the image, all in ONE batch (one layer), plus one identity crop
        x = torch.from_numpy(img).permute(2, 0, 1).float()[None].repeat(n + 1, 1, 1, 1)
        d = SimpleNamespace(
            ra_op=np.array([[i] for i in range(n)] + [[-1]]),
            ra_level=np.full((n + 1, 1), LEVEL),
            ra_sign=np.full((n + 1, 1), sign),
        )
        out = rand_augment(x, d, increasing=True, translate_px=0.45 * 64).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(out[n], img.astype(np.float32))  # a crop without an op is untouched
        for i, name in enumerate(OP_NAMES):
            timm_name = CASES[name][0]
            diffs = [np.abs(out[i] - _timm(timm_name, img, s)).mean() for s in (sign, -sign)]
            # geometric ops may turn the other way than PIL for the same sign: either is timm's distribution
            worst[name] = max(worst.get(name, 0.0), min(diffs) if name in GEOMETRIC else diffs[0])
            assert np.abs(out[i] - img).mean() > 1.0 or name == "AutoContrast", f"{name} did nothing"
    bad = {n_: round(float(d), 2) for n_, d in worst.items() if d > CASES[n_][1]}
    assert not bad, f"ops differ from timm's PIL ops (mean abs diff): {bad}; all: {worst}"

"""Each DALI RandAugment op against timm's PIL op at the same level (the strong branch's parity)."""
import numpy as np
import pytest
from PIL import Image

dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from mugs.pipeline.dali_randaug import FILL, OP_NAMES, _apply, _Params  # noqa: E402

LEVEL = 6.0
# DALI op -> (timm op name, worst allowed mean |DALI - PIL| in grey levels); equalize follows OpenCV
CASES = {
    "AutoContrast": ("AutoContrast", 1.0), "Equalize": ("Equalize", 15.0), "Invert": ("Invert", 0.0),
    "Rotate": ("Rotate", 3.0), "Posterize": ("PosterizeIncreasing", 0.0),
    "Solarize": ("SolarizeIncreasing", 0.0), "SolarizeAdd": ("SolarizeAdd", 0.0),
    "Color": ("ColorIncreasing", 2.0), "Contrast": ("ContrastIncreasing", 1.0),
    "Brightness": ("BrightnessIncreasing", 1.0), "Sharpness": ("SharpnessIncreasing", 1.5),
    "ShearX": ("ShearX", 3.0), "ShearY": ("ShearY", 3.0),
    "TranslateXRel": ("TranslateXRel", 3.0), "TranslateYRel": ("TranslateYRel", 3.0),
}


def _image():
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    img = np.stack([x * 3, y * 3, 128 + 60 * np.sin((x + y) / 9)], -1)
    img[20:40, 24:44] = (230, 40, 90)
    img += np.random.default_rng(0).normal(0, 15, img.shape)  # texture for sharpness
    return np.clip(img, 0, 255).astype(np.uint8)


@pipeline_def
def _all_ops():
    x = fn.external_source(name="x", dtype=types.UINT8, ndim=3, layout="HWC")
    level = fn.external_source(name="level", dtype=types.FLOAT, ndim=0)
    sign = fn.external_source(name="sign", dtype=types.FLOAT, ndim=0)
    p = _Params(level, sign, increasing=True, translate_px=0.45 * 64)
    return tuple(_apply(i, x, p) for i in range(len(OP_NAMES)))


def _timm(name, img, sign):
    """timm's op at LEVEL, with the random sign fixed to `sign` (timm would draw it)."""
    from timm.data import auto_augment as aa

    hp = dict(translate_pct=0.45, img_mean=(FILL,) * 3)
    args = aa.LEVEL_TO_ARG[name](LEVEL, hp) if aa.LEVEL_TO_ARG[name] else ()
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        args = (abs(args[0]) * sign,)
    elif name.endswith("Increasing") and name not in ("PosterizeIncreasing", "SolarizeIncreasing"):
        args = (1.0 + sign * abs(args[0] - 1.0),)  # enhance factor 1 +- 0.9 level / 10
    out = aa.NAME_TO_OP[name](Image.fromarray(img), *args, fillcolor=(FILL,) * 3, resample=Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)

def test_ops_match_timm():
    img = _image()
    pipe = _all_ops(batch_size=2, num_threads=1, device_id=None, prefetch_queue_depth=1)
    pipe.build()
    worst = {}
    for sign in (1.0, -1.0):
        pipe.feed_input("x", np.stack([img, img]))
        pipe.feed_input("level", np.full(2, LEVEL, np.float32))
        pipe.feed_input("sign", np.full(2, sign, np.float32))
        outs = pipe.run()
        for name, out in zip(OP_NAMES, outs):
            timm_name = CASES[name][0]
            got = np.asarray(out.as_tensor())[0].astype(np.float32)
            diffs = [np.abs(got - _timm(timm_name, img, s)).mean() for s in (sign, -sign)]
            # geometric ops may turn the other way than PIL for the same sign: either is timm's distribution
            worst[name] = max(worst.get(name, 0.0), min(diffs) if name in ("Rotate", "ShearX", "ShearY",
                              "TranslateXRel", "TranslateYRel") else diffs[0])
            assert np.abs(got - img).mean() > 1.0 or name == "AutoContrast", f"{name} did nothing"
    bad = {n: round(float(d), 2) for n, d in worst.items() if d > CASES[n][1]}
    assert not bad, f"DALI ops differ from timm's PIL ops (mean abs diff): {bad}; all: {worst}"

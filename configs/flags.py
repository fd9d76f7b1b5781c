"""The command line, generated from the flag table (configs/options.py:MugsConfig): one flag per field with
its help, range and type, `--preset NAME` as the defaults, and the parse back into a MugsConfig."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from .options import MugsConfig


def bool_flag(s: str) -> bool:
    """true/false parser, as the original's utils.bool_flag (which is why it exists)."""
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser(defaults: MugsConfig | None = None) -> argparse.ArgumentParser:
    """argparse parser generated from MugsConfig; `defaults` may carry a preset (`preset_defaults`)."""
    from .presets import PRESETS  # presets are MugsConfigs: imported once this module is

    defaults = defaults or MugsConfig()
    p = argparse.ArgumentParser("mugs", description="Mugs self-supervised ViT pretraining")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from these named settings (configs/presets.py); the other flags given override them",
    )
    for f in dataclasses.fields(MugsConfig):
        meta = dict(f.metadata)
        del meta["resume"]
        rng = meta.pop("range")
        kw: dict = {
            "help": meta.pop("help", "") + (f"; range: {rng}" if rng is not None else ""),
            "default": getattr(defaults, f.name),
        }
        nargs = meta.pop("nargs", None)
        if f.type in ("bool", bool):
            kw["type"] = bool_flag
            kw["metavar"] = "true|false"
        elif f.name in ("memory_size", "embed_dim", "depth", "num_heads"):
            kw["type"] = int
        elif nargs is not None:
            kw["nargs"] = nargs
            kw["type"] = int if f.name == "size_crops" else float
        else:
            kw["type"] = type(getattr(MugsConfig(), f.name))
        kw.update(meta)
        p.add_argument("--" + f.name, **kw)
    return p


def config_from_args(ns: argparse.Namespace) -> MugsConfig:
    """The MugsConfig in a namespace parsed by build_parser (other attributes are left out)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(MugsConfig)}
    for name in ("global_crops_scale", "local_crops_scale"):
        values[name] = tuple(values[name])
    values["loss_weights"] = list(values["loss_weights"])
    values["size_crops"] = list(values["size_crops"])
    return MugsConfig(**values)


def preset_defaults(argv: Sequence[str] | None = None, defaults: MugsConfig | None = None):
    """The defaults to parse `argv` with: `defaults` with the preset `argv` names (--preset) on top."""
    from .presets import PRESETS
    from .presets import argv as preset_argv

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    name = pre.parse_known_args(argv)[0].preset
    if name not in PRESETS:  # absent, or unknown: build_parser's choices report it
        return defaults
    return config_from_args(build_parser(defaults).parse_args(preset_argv(name)))


def parse_config(argv: Sequence[str] | None = None, defaults: MugsConfig | None = None) -> MugsConfig:
    """MugsConfig from command-line flags (None: sys.argv), a --preset's values as the defaults."""
    return config_from_args(build_parser(preset_defaults(argv, defaults)).parse_args(argv))

"""Which images a loader reads: an ImageFolder tree or a file list written by `mugs-scan-data`.

File-list format (version 1), UTF-8 text, one entry per line::

    # mugs file list v1
    # root: /abs/path/to/imagefolder
    n01440764/n01440764_10026.JPEG<TAB>0

Lines starting with `#` are comments; a `# root:` comment sets the directory relative
paths are resolved against (default: the list file's own directory). Absolute paths
are used as they are. The number after the TAB is the class index (sorted class
folder names, as torchvision's ImageFolder numbers them). Lines without a TAB are
taken as a path with class index 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

# what the loaders read from a folder tree (DALI and PIL decode all of these)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LIST_HEADER = "# mugs file list v1"
# the most pixels (w x h) a loader decodes: PIL's own default limit (Image.MAX_IMAGE_PIXELS), stated here
# once and applied by both loaders, so a small file declaring a huge image is refused before decoding
MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class FileIndex:
    """Absolute paths and class indices, in a fixed (sorted) order: shuffles index into it."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    source: str

    def __len__(self) -> int:
        return len(self.paths)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def class_folders(root: str) -> list[str]:
    """Sorted class folder names (ImageFolder numbering); hidden folders are skipped."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def walk_class(root: str, cls: str) -> list[str]:
    """All files under root/cls (recursive, sorted), as paths relative to root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def index_folder(root: str) -> FileIndex:
    """List root/class/**/image files without decoding anything (the scan tool validates)."""
    root = os.path.abspath(root)
    classes = class_folders(root)
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected root/class/image.JPEG)")
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        for rel in walk_class(root, cls):
            if is_image_name(rel):
                paths.append(os.path.join(root, rel))
                labels.append(idx)
    if not paths:
        raise FileNotFoundError(f"no images with extensions {IMG_EXTENSIONS} under {root}")
    return FileIndex(tuple(paths), tuple(labels), root)


def read_file_list(list_path: str) -> FileIndex:
    """Parse a file list (format in the module docstring)."""
    list_path = os.path.abspath(list_path)
    root = os.path.dirname(list_path)
    paths, labels = [], []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("#"):
                body = line[1:].strip()
                if body.startswith("root:"):
                    root = os.path.abspath(os.path.join(os.path.dirname(list_path), body[5:].strip()))
                continue
            rel, _, label = line.partition("\t")
            try:
                labels.append(int(label) if label.strip() else 0)
            except ValueError:
                raise ValueError(f"{list_path}:{lineno}: bad class index {label!r}") from None
            paths.append(rel if os.path.isabs(rel) else os.path.join(root, rel))
    if not paths:
        raise FileNotFoundError(f"file list {list_path} names no images")
    return FileIndex(tuple(paths), tuple(labels), list_path)


def write_file_list(list_path: str, root: str, entries: Sequence[tuple[str, int]]) -> None:
    """Write (relative path, class index) entries; atomically (temp file + rename)."""
    tmp = list_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(LIST_HEADER + "\n")
        f.write(f"# root: {os.path.abspath(root)}\n")
        for rel, label in entries:
            if "\t" in rel or "\n" in rel:
                raise ValueError(f"path {rel!r} contains a TAB or newline")
            f.write(f"{rel}\t{label}\n")
    os.replace(tmp, list_path)


def load_index(data_path: str) -> FileIndex:
    """A directory is an ImageFolder tree; a file is a file list."""
    if not data_path:
        raise ValueError("data_path is empty: pass an ImageFolder root or a mugs-scan-data file list")
    if os.path.isdir(data_path):
        return index_folder(data_path)
    if os.path.isfile(data_path):
        return read_file_list(data_path)
    raise FileNotFoundError(f"data_path {data_path!r} is neither a folder nor a file list")

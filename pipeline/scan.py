"""`mugs-scan-data ROOT --out LIST`: decode every image once, write a clean file list and a report.

Why: DALI (nvjpeg especially) fails mid-epoch or misbehaves on files an ImageFolder happily
lists: truncated or corrupt JPEGs, PNG or CMYK data named .JPEG (ImageNet-1k has both),
grayscale files, tiny images, stray non-image files. Scanning once up front turns a crash
hours into a run into a list of files to look at.

Output: LIST in the format of `files.py` (`relative/path<TAB>class_index`, `# root:` header;
the loaders take it as --data_path), and LIST.report.json: counts per reason and one entry per
left-out file (path, reason, detail), plus empty class folders. Reasons:
  non_image, unreadable, corrupt, truncated, format_mismatch (content is not what the
  extension says, e.g. PNG in .JPEG), cmyk, grayscale (kept with --keep-grayscale),
  mode (other pixel modes: palette, alpha, 16-bit), too_small (a side < --min-size),
  outside_class (a file directly in ROOT), unlistable_name (a TAB, newline or carriage return in
  its name, which a file list line cannot hold: left out before decoding anything).
Class indices count every class folder (sorted), as torchvision's ImageFolder does, so an
empty class keeps its index and later classes do not shift.

`scan_dataset` is safe to call from any process, also one that already runs threads (OpenMP, DALI,
TensorBoard): its decoding processes come from a fork server (or spawn), never from forking the caller.
The workers need only this module, so they are started without importing the calling script (which
every non-fork start method does by default): a script calling it works with or without the
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import io
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from PIL import Image, ImageFile

from ..core.cli import run_cli
from ..core.errors import DataError
from ..core.outputs import check_output_file
from .files import class_folders, is_image_name, walk_class, write_file_list

# what each extension must contain (PIL format names)
_EXPECTED = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".ppm": "PPM",
    ".pgm": "PPM",
}
_GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F")


MIN_SIZE = 16  # pixels: an image with a shorter side is left out (--min-size)


def check_image(path: str, min_size: int = MIN_SIZE, keep_grayscale: bool = False) -> tuple[str | None, str]:
    """(reason, detail) for a file the loaders should not read, or (None, "WxH") for a good one."""
    ext = os.path.splitext(path)[1].lower()
    if not is_image_name(path):
        return "non_image", f"extension {ext or '(none)'!r}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "unreadable", str(e)
    if not data:
        return "corrupt", "empty file"
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # make PIL raise on truncated data
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            im.load()  # full decode
    except Exception as e:  # PIL raises many types for bad data
        if isinstance(e, Image.UnidentifiedImageError):
            return "corrupt", "not a format PIL can identify"
        return ("truncated" if "truncated" in str(e) else "corrupt"), f"{type(e).__name__}: {e}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    if _EXPECTED.get(ext) not in (None, fmt):
        return "format_mismatch", f"{fmt} data in a {ext} file"
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated", "no JPEG end-of-image marker"
    if mode == "CMYK":
        return "cmyk", f"{fmt} in mode {mode}"
    if mode in _GRAY_MODES:
        if not keep_grayscale:
            return "grayscale", f"mode {mode}"
    elif mode != "RGB":
        return "mode", f"mode {mode}"
    if min(w, h) < min_size:
        return "too_small", f"{w}x{h}, a side < {min_size}"
    return None, f"{w}x{h}"


def _check_task(task):
    i, root, rel, label, min_size, keep_gray = task
    reason, detail = check_image(os.path.join(root, rel), min_size, keep_gray)
    return i, rel, label, reason, detail


def _check_chunk(tasks):
    return [_check_task(t) for t in tasks]


def _progress(done: int, total: int, bad: int, t0: float, out) -> None:
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    print(
        f"mugs-scan-data: {done}/{total} files ({rate:.0f}/s, ~{eta:.0f}s left), {bad} left out", file=out, flush=True
    )


_CHUNK = 32  # files per task sent to a worker


def _pool_context():
    """Worker processes that do not fork the caller: a fork() of a process holding threads copies their
    locks (held ones included) but not the threads, and a worker can wait on such a lock forever."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


UNLISTABLE = ("\t", "\n", "\r")  # characters a file list line (relative/path<TAB>class) cannot hold


@contextlib.contextmanager
def _without_main_script() -> Iterator[None]:
    """While the pool starts its processes, __main__ reads as a module to leave alone: multiprocessing then
    does not re-import the caller's script in each worker (nor in the fork server), so a script without the
    `if __name__ == "__main__":` guard does not run its scan again there. The workers run only this module."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = main.__dict__.get("__spec__")
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = saved


def _check_all(tasks: list, workers: int):
    """Yields _check_task's results in completion order, from `workers` processes. A worker that dies
    (e.g. a calling script without the `if __name__ == "__main__":` guard, which the workers import)
    ends the scan with an error instead of a pool that restarts it forever."""
    if not tasks:
        return
    with ProcessPoolExecutor(max(1, min(workers, len(tasks))), mp_context=_pool_context()) as ex:
        with _without_main_script():  # the processes start during the submits
            futures = [ex.submit(_check_chunk, tasks[i : i + _CHUNK]) for i in range(0, len(tasks), _CHUNK)]
        try:
            for fut in as_completed(futures):
                yield from fut.result()
        except BrokenProcessPool as e:
            raise DataError(
                f"a decoding process died ({e}): killed (out of memory?); scan again with fewer --workers"
            ) from None
        finally:
            for fut in futures:
                fut.cancel()


def _decode_tasks(root: str, classes: list[str], min_size: int, keep_grayscale: bool) -> tuple[list, list[dict]]:
    """One decode task per file of the class folders, and what is left out before decoding: files in ROOT
    itself and names the list could not hold."""
    left_out: list[dict] = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_file() and not e.name.startswith("."):  # hidden files in ROOT (markers) are ignored
            left_out.append({"path": e.name, "reason": "outside_class", "detail": "not in a class folder"})
    tasks: list = []
    for label, cls in enumerate(classes):
        for rel in walk_class(root, cls):
            if any(c in rel for c in UNLISTABLE):  # before decoding: the list could not name it
                left_out.append(
                    {
                        "path": rel,
                        "reason": "unlistable_name",
                        "detail": "a TAB, newline or carriage return in the name: rename the file",
                    }
                )
            else:
                tasks.append((len(tasks), root, rel, label, min_size, keep_grayscale))
    return tasks, left_out


def scan_dataset(
    root: str,
    workers: int,
    min_size: int = MIN_SIZE,
    keep_grayscale: bool = False,
    quiet: bool = False,
    progress_every: float = 10.0,
) -> dict:
    """Scan ROOT; returns the report dict with the kept entries under "kept_entries"."""
    root = os.path.abspath(root)
    t0 = time.time()
    classes = class_folders(root)
    tasks, left_out = _decode_tasks(root, classes, min_size, keep_grayscale)
    out = sys.stderr
    if not quiet:
        print(f"mugs-scan-data: {len(tasks)} files in {len(classes)} class folders under {root}", file=out)
    done: dict[int, tuple[str, int, str | None, str]] = {}  # task index -> (rel, label, reason, detail)
    bad, last = 0, time.time()
    for n, (i, rel, label, reason, detail) in enumerate(_check_all(tasks, workers), 1):
        done[i] = (rel, label, reason, detail)
        bad += reason is not None
        if not quiet and time.time() - last >= progress_every:
            _progress(n, len(tasks), bad, t0, out)
            last = time.time()
    results = [done[i] for i in range(len(tasks))]  # every task answers once (_check_all raises otherwise)
    kept = [(rel, label) for rel, label, reason, _ in results if reason is None]
    left_out += [
        {"path": rel, "reason": reason, "detail": detail} for rel, _, reason, detail in results if reason is not None
    ]
    used = {label for _, label in kept}
    counts = dict(Counter(item["reason"] for item in left_out))
    if not quiet:
        _progress(len(tasks), len(tasks), len(left_out), t0, out)
    return {
        "root": root,
        "scanned": len(tasks) + counts.get("unlistable_name", 0),
        "kept": len(kept),
        "left_out_counts": counts,
        "empty_classes": [c for i, c in enumerate(classes) if i not in used],
        "num_classes": len(classes),
        "min_size": min_size,
        "keep_grayscale": keep_grayscale,
        "seconds": round(time.time() - t0, 2),
        "left_out": left_out,
        "kept_entries": kept,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mugs-scan-data", description=__doc__.split("\n")[0])
    ap.add_argument("root", help="ImageFolder root: ROOT/class/image")
    ap.add_argument("--out", required=True, help="file list to write (the loaders' --data_path)")
    ap.add_argument("--report", help="JSON report (default: OUT.report.json)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    ap.add_argument(
        "--min-size",
        type=int,
        default=MIN_SIZE,
        help=f"leave out images with a side shorter than this (default {MIN_SIZE}; "
        "use your local crop size to be strict)",
    )
    ap.add_argument("--keep-grayscale", action="store_true", help="keep single-channel images (decoded to RGB)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    return run_cli(lambda: _scan(args), "mugs-scan-data")


def _scan(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.root):
        raise DataError(f"{args.root} is not a folder")
    report_path = args.report or args.out + ".report.json"
    check_output_file(args.out)  # before the scan: a list that cannot be written fails now
    check_output_file(report_path, "--report")
    report = scan_dataset(args.root, args.workers, args.min_size, args.keep_grayscale, args.quiet)
    kept = report.pop("kept_entries")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    write_file_list(args.out, report["root"], kept)
    report["list"] = os.path.abspath(args.out)
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(report["left_out_counts"].items())) or "nothing"
    print(
        f"mugs-scan-data: kept {report['kept']} of {report['scanned']} files; left out: {summary}; "
        f"empty classes: {len(report['empty_classes'])}. List: {args.out}  Report: {report_path}"
    )
    return 0 if report["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Summarise a py-spy ``--format raw`` profile (collapsed stacks: ``frame;frame;... count``):
where the samples are, by function (self and inclusive) and by package.

    python -m bench.pyspy_summary /tmp/prof/worker-1234.txt [--top 20] [--match deliver]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

__all__ = ["summarise"]

_ROOT = f"{Path(__file__).resolve().parents[1]}/"  # this checkout: its frames are shown as ours
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def _func(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for cut in ("site-packages/", "/lib/python3.11/", _ROOT):
        if cut in file:
            file = file.split(cut, 1)[1]
            break
    return f"{m.group('func')} ({file})"


def _package(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    file = m.group("file") if m else frame
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0]
    if _ROOT in file:
        return "mtaq:" + file.split(_ROOT, 1)[1].split("/", 1)[0]
    if "/lib/python3" in file:
        part = file.split("/lib/python3", 1)[1].split("/", 2)
        return "stdlib:" + (part[1].removesuffix(".py") if len(part) > 1 else "?")
    return file


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith(("thread", "process")):
            frames = frames[1:]
        stacks.append((frames, int(n)))
    return stacks


def summarise(path: Path, *, top: int = 15, match: str = "", files: str = "") -> None:
    if not path.exists():
        print(f"\n{path}: no profile (py-spy wrote nothing)")
        return
    stacks = load(path)
    total = sum(n for _, n in stacks)
    if not total:
        print(f"\n{path}: no samples")
        return
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    for frames, n in stacks:
        if match and not any(match in f for f in frames):
            continue
        if frames:
            self_t[_func(frames[-1])] += n
            pkg[_package(frames[-1])] += n
        for f in {_func(f) for f in frames}:
            incl[f] += n
    print(f"\n== {path.name}: {total} samples{' matching ' + match if match else ''}")
    print("  self time by package (leaf frame):")
    for k, n in pkg.most_common(top):
        print(f"    {n / total:6.1%}  {k}")
    print("  self time by function:")
    for k, n in self_t.most_common(top):
        print(f"    {n / total:6.1%}  {k}")
    print(f"  inclusive time by function{' in ' + files if files else ''}:")
    shown = [(k, n) for k, n in incl.most_common() if not files or re.search(files, k)]
    for k, n in shown[: top + 10]:
        print(f"    {n / total:6.1%}  {k}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--match", default="", help="only stacks with a frame containing this text")
    p.add_argument("--files", default="", help="inclusive list: only functions whose 'name (file)' matches this regex")
    a = p.parse_args()
    for path in a.profiles:
        summarise(path, top=a.top, match=a.match, files=a.files)


if __name__ == "__main__":
    main()

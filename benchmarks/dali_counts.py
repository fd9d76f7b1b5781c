"""What a DALI loader builds: pipeline builds counted as they happen, and the operators in a built graph
(benchmarks/loader.py reports both; the structure tests assert them)."""

from __future__ import annotations


class BuildCounter:
    """Counts DALI pipeline builds and keeps the pipelines built (to count their operators)."""

    def __init__(self):
        self.builds, self.pipes = 0, []
        try:
            from nvidia.dali.pipeline import Pipeline
        except ImportError:
            self.cls = None
            return
        self.cls, self.orig = Pipeline, Pipeline.build
        counter = self

        def build(pipe, *a, **kw):
            if not getattr(pipe, "_built", False):
                counter.builds += 1
                counter.pipes.append(pipe)
            return counter.orig(pipe, *a, **kw)

        Pipeline.build = build

    def close(self):
        if self.cls is not None:
            self.cls.build = self.orig


def graph_ops(pipe) -> dict:
    """Operators in a built DALI pipeline's graph: all, and the conditional split/merge ones."""
    ops = getattr(pipe, "_ops", None) or []
    names = [type(o._op).__name__ if getattr(o, "_op", None) is not None else o.name for o in ops]
    cond = [
        n
        for n in names
        if n.lower().lstrip("_").startswith(("split", "merge", "conditional")) or "_conditional" in n.lower()
    ]
    return {"ops": len(names), "conditional_ops": len(cond)}

"""Every progress bar of the library and the studies knows its total: each `tqdm(...)` call passes `total=` or iterates a range."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
LIBRARY = sorted(p for d in ("vlmjax", "converters", "experiments") for p in (ROOT / d).rglob("*.py"))


def tqdm_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "tqdm":
            yield node


def has_total(call: ast.Call) -> bool:
    iterates_range = bool(call.args) and isinstance(call.args[0], ast.Call) and getattr(call.args[0].func, "id", None) == "range"
    return iterates_range or any(k.arg == "total" for k in call.keywords)


def test_every_progress_bar_of_the_library_has_a_total():
    calls = [(p.relative_to(ROOT).as_posix(), c) for p in LIBRARY for c in tqdm_calls(p)]
    assert len(calls) >= 4  # the scan finds the bars (shapes, eval, train, converters)
    assert [(path, c.lineno) for path, c in calls if not has_total(c)] == []

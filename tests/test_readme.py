"""README.md runs as written: its Python blocks execute in order in one namespace on the built-in model, and every
value a line states in its comment (`expr  # (1, 77, 137): ...`) is the value it has."""

import ast
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def stated_value(comment: str):
    """The Python literal a comment starts with ("# 4: L + 1 arrays" -> 4), or None."""
    text = comment.strip().lstrip("#").strip()
    for end in [i for i, c in enumerate(text) if c == ":"] + [len(text)]:
        try:
            return True, ast.literal_eval(text[:end].strip())
        except (ValueError, SyntaxError):
            continue
    return False, None


def test_the_readme_python_blocks_run_and_state_true_values():
    blocks = python_blocks()
    assert len(blocks) >= 4
    namespace, checked = {}, 0
    for source in blocks:
        lines = source.splitlines()
        for node in ast.parse(source).body:
            exec(compile(ast.Module([node], []), "README.md", "exec"), namespace)
            if node.lineno != node.end_lineno or not isinstance(node, (ast.Expr, ast.Assign)):
                continue
            found, value = stated_value(lines[node.lineno - 1][node.end_col_offset:])
            if not found:
                continue
            target = node.value if isinstance(node, ast.Expr) else node.targets[0]
            actual = eval(ast.unparse(target), namespace)
            assert actual == value, f"README line {ast.unparse(node)!r}: {actual!r}, not {value!r}"
            checked += 1
    assert checked >= 8  # the values the tour states were compared

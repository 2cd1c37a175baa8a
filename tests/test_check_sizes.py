"""scripts/check_sizes.py: code lines counted without docstrings, comments and blank lines; files by lines."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "check_sizes.py"


def _function(name: str, code_lines: int, *, docstring_lines: int = 0, indent: str = "") -> str:
    # `def` counts as one code line; the body adds `code_lines - 1` statements, with a comment and a blank line
    # between every two of them (neither counts).
    lines = [f"{indent}def {name}():"]
    if docstring_lines:
        body = [f"{indent}    more" for _ in range(docstring_lines - 2)]
        lines += [f'{indent}    """Doc.', *body, f'{indent}    """']
    for i in range(code_lines - 1):
        lines += [f"{indent}    x{i} = {i}", f"{indent}    # comment", ""]
    return "\n".join(lines) + "\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_functions_over_the_limit_are_listed_with_their_code_lines(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(_function("at_limit", 60, docstring_lines=30) + _function("over", 61))
    method = "class Model:\n" + _function("forward", 62, docstring_lines=5, indent="    ")
    (pkg / "b.py").write_text(method)
    result = _run(str(pkg))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    over_line = 1 + 30 + 59 * 3 + 1  # the second function starts after the first one's lines
    assert lines == [
        f"{pkg / 'a.py'}:{over_line} over: 61 code lines",
        f"{pkg / 'b.py'}:2 Model.forward: 62 code lines",
    ]


def test_a_nested_function_counts_for_itself_and_its_parent(tmp_path):
    inner = _function("inner", 40, indent="    ")
    source = "def outer():\n" + inner + "    return inner\n"
    (tmp_path / "m.py").write_text(source)
    result = _run(str(tmp_path / "m.py"), "--max-function-lines", "39")
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'm.py'}:1 outer: 42 code lines",
        f"{tmp_path / 'm.py'}:2 outer.inner: 40 code lines",
    ]


def test_long_files_and_clean_trees(tmp_path):
    (tmp_path / "long.py").write_text("x = 1\n" * 501)
    (tmp_path / "ok.py").write_text("x = 1\n" * 500)
    result = _run(str(tmp_path))
    assert result.returncode == 1 and result.stdout.splitlines() == [f"{tmp_path / 'long.py'}: 501 lines"]
    (tmp_path / "long.py").unlink()
    result = _run(str(tmp_path))
    assert result.returncode == 0 and "nothing over the limits" in result.stdout


def test_a_missing_path_is_one_line_on_stderr(tmp_path):
    result = _run(str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"check_sizes: no such file or folder: {tmp_path / 'nowhere'}"
    ]

"""List the functions longer than a limit of code lines and the files longer than a limit of lines.

A function's code lines are the lines of its body and signature that hold code: blank lines, comment-only lines
and its docstring do not count; a nested function counts towards its own total and its parent's. A file's length
is its number of lines, as ``wc -l`` counts them.

Usage::

    python scripts/check_sizes.py                       # pace/, limits 60 (function) and 500 (file)
    python scripts/check_sizes.py pace/models --max-function-lines 40

Prints one line per finding (``path:line name: N code lines`` or ``path: N lines``) and exits 1 if there is any.
"""

import argparse
import ast
import io
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _code_lines(source: str) -> set[int]:
    """Line numbers holding a token other than a comment, a newline or indentation."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(node: ast.AST) -> set[int]:
    if not isinstance(node, (ast.Module, ast.ClassDef, *_FUNCTIONS)) or ast.get_docstring(node, clean=False) is None:
        return set()
    return set(range(node.body[0].lineno, node.body[0].end_lineno + 1))


def long_functions(path: Path, limit: int) -> Iterator[tuple[int, str, int]]:
    """Functions of one file with more than ``limit`` code lines.

    Args:
        path: A Python file.
        limit: The most code lines a function may have.

    Returns:
        An iterator of ``(line, qualified name, code lines)``.
    """
    source = path.read_text(encoding="utf-8")
    code = _code_lines(source)
    tree = ast.parse(source, filename=str(path))
    docstrings = set().union(*(_docstring_lines(n) for n in ast.walk(tree)))

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (*_FUNCTIONS, ast.ClassDef)):
                yield from visit(child, prefix)
                continue
            name = prefix + child.name
            if isinstance(child, _FUNCTIONS):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                count = len((set(range(first, child.end_lineno + 1)) & code) - docstrings)
                if count > limit:
                    yield child.lineno, name, count
            yield from visit(child, f"{name}.")

    yield from visit(tree, "")


def python_files(paths: list[Path]) -> list[Path]:
    """The ``.py`` files named or found below the given paths, sorted."""
    found: set[Path] = set()
    for path in paths:
        found.update([path] if path.is_file() else path.rglob("*.py"))
    return sorted(found)


def findings(paths: list[Path], max_function_lines: int, max_file_lines: int) -> list[str]:
    """One line per function or file over its limit.

    Args:
        paths: Files or folders to check.
        max_function_lines: The most code lines a function may have.
        max_file_lines: The most lines a file may have.

    Returns:
        The findings, files in sorted order.
    """
    out = []
    for path in python_files(paths):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > max_file_lines:
            out.append(f"{path}: {lines} lines")
        long = long_functions(path, max_function_lines)
        out.extend(f"{path}:{line} {name}: {n} code lines" for line, name, n in long)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("pace")], help="files or folders (pace/)")
    parser.add_argument("--max-function-lines", type=int, default=60, help="code lines per function (60)")
    parser.add_argument("--max-file-lines", type=int, default=500, help="lines per file (500)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"check_sizes: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = findings(args.paths, args.max_function_lines, args.max_file_lines)
    print("\n".join(out) if out else "check_sizes: nothing over the limits")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())

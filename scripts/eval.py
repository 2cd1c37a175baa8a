"""Evaluate a model: `python scripts/eval.py model.name=<timm name> data.root=<val data>` (same as `pace-eval`)."""

from pace.eval.main import main

if __name__ == "__main__":
    main()

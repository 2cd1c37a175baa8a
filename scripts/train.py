"""Train a model: `python scripts/train.py experiment=quickstart` (same as `pace-train`)."""

from pace.train.main import main

if __name__ == "__main__":
    main()

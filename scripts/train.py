"""Train a model: `python scripts/train.py experiment=quickstart` (same as `pace-train`)."""

from pace_cli import train

if __name__ == "__main__":
    train()

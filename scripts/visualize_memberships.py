"""Membership maps of a PACE-ViT on images (see pace/analysis/visualize.py and docs/analysis.md).

python scripts/visualize_memberships.py CHECKPOINT_OR_TIMM_NAME IMAGE_OR_FOLDER ... [--demo] [--blocks 0 5 11]
"""

import sys

from pace.analysis.visualize import main

if __name__ == "__main__":
    sys.exit(main())

"""Per-layer α, β, τ, coding rates and token spectra of a PACE-ViT (see pace/analysis/analyze.py, docs/analysis.md).

python scripts/analyze_checkpoint.py CHECKPOINT_OR_TIMM_NAME IMAGE_FOLDER ... [--demo] [--synthetic N]
"""

import sys

from pace.analysis.analyze import main

if __name__ == "__main__":
    sys.exit(main())

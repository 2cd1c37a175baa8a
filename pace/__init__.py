"""PACE: PACEAttention and PACE-ViT for timm.

Importing the package registers the PACE-ViT variants with timm's model registry; nothing else runs at import.
"""

from pace import models as models  # noqa: F401  (registration with timm happens on import)

__version__ = "0.1.0"

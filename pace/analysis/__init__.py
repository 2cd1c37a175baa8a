"""White-box analysis: memberships, per-layer coding rates, plots."""

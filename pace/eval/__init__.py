"""Evaluation on ImageNet val and ImageNet-ReaL, shared by pace-eval and the Trainer."""

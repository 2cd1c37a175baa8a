"""Console entry points. Each one imports its job lazily so `import pace` stays cheap."""


def train() -> None:
    """`pace-train`: Hydra-configured training (configs/train.yaml)."""
    from pace.errors import exit_on_stop_signals

    exit_on_stop_signals()  # pre-empted while importing: exit 75 (requeue), not killed by the signal
    from pace.train.main import main

    main()


def evaluate() -> None:
    """`pace-eval`: Hydra-configured evaluation (configs/eval.yaml)."""
    from pace.eval.main import main

    main()


def make_shards() -> None:
    """`pace-make-shards`: write webdataset shards from an ImageNet-style folder."""
    from pace.data.make_shards import main

    main()

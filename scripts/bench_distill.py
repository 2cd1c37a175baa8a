"""What a teacher adds to a training step: the step time with and without distillation, interleaved in one process.

Both cases run the same student (forward, loss, backward, AdamW step) on the same batch; the distilled case adds
the teacher's forward under `no_grad` and DeiT's loss (`pace.train.distill`). The ratio is the price of
distillation per update at equal batch; epochs and updates stay the same.

    python scripts/bench_distill.py --teacher runs/quickstart/checkpoints/step_00000252.pt --student-depth 4
"""

import argparse

import timm
import torch
from _bench_utils import interleaved, median_ms
from torch import nn

import pace  # noqa: F401  (registers the PACE-ViT variants)
from pace.train.config import DistillConfig
from pace.train.distill import build_distillation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (ours) or release folder")
    parser.add_argument("--student", default="pace_vit_tiny_patch8_224")
    parser.add_argument("--student-depth", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kind", default="soft", choices=("soft", "hard"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    student = timm.create_model(args.student, num_classes=10, img_size=args.img_size, depth=args.student_depth)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    base = nn.CrossEntropyLoss()
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cfg = DistillConfig(kind=args.kind, teacher_checkpoint=args.teacher)
    distill = build_distillation(cfg, base, num_classes=10, mean=norm[0], std=norm[1], device=device)
    images, labels = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(10, (args.batch,))

    def step(distilled: bool) -> None:
        outputs = student(images)
        loss = distill(images, outputs, labels) if distilled else base(outputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved(
        {"plain": lambda: step(False), "distilled": lambda: step(True)}, repeats=args.repeats, warmup=2, device=device
    )
    plain, distilled = (median_ms(times[k]["cpu"]) for k in ("plain", "distilled"))
    print(f"student step, CPU ms (median of {args.repeats}): plain {plain:.0f}, distilled {distilled:.0f}")
    print(f"distilled / plain: {distilled / plain:.2f}")


if __name__ == "__main__":
    main()

"""Where the time of a distillation epoch goes: kdrun against the classic KD loop, on one machine, in one process.

    python scripts/bench_distill.py --root ../shared/data            # MNIST, as in the README's performance section

Both sides use the same MNIST training images (kdrun's train split), models, batch size, optimizer and number of
steps. It prints three ratios:

1. data path: kdrun's in-memory uint8 tensors + batched normalisation vs a torchvision DataLoader with per-sample
   ToTensor/Normalize, each feeding the same student (CE) for one epoch (img/s);
2. teacher outputs: a distillation epoch with cached teacher logits vs a CE-only epoch of the same student
   (and the same with the teacher run online on every batch);
3. the classic loop below (DataLoader, teacher forward every step, fp32) vs kdrun's distillation epoch, with the
   test accuracy each student reaches.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from kdrun.data import build_data
from kdrun.engine import evaluate, fit, predict, resolve_runtime
from kdrun.losses import CrossEntropy, build_objective
from kdrun.models import build_model

TEACHER = {"name": "resnet18", "stem": "imagenet"}  # torchvision resnet18, 1-channel 7x7 stride-2 stem
STUDENT = {"name": "small_cnn", "channels": [16, 32], "hidden": 128, "dropout": 0.1}


def classic_kd_epoch(student, teacher, loader, T: float, alpha: float, lr: float) -> float:
    """The reference: the KD loop as tutorials write it. Returns its wall time in seconds."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    teacher.eval()
    student.train()
    start = time.perf_counter()
    for images, labels in loader:
        with torch.no_grad():
            teacher_logits = teacher(images)
        student_logits = student(images)
        soft = F.kl_div(
            F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1), reduction="batchmean"
        )
        loss = alpha * F.cross_entropy(student_logits, labels) + (1 - alpha) * T * T * soft
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def classic_ce_epoch(student, loader, lr: float) -> float:
    """The reference data path feeding the student alone (CE), for the data-path ratio."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    start = time.perf_counter()
    for images, labels in loader:
        loss = F.cross_entropy(student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data", help="folder with MNIST/raw (torchvision layout)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--T", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference loops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runtime = resolve_runtime("cpu", "off", False)
    data = build_data({"name": "mnist", "root": args.root, "download": False, "val_fraction": 0.1}, runtime.device)
    spec, n = data.spec, len(data.train)
    recipe = OmegaConf.create({"epochs": 1, "batch_size": args.batch_size, "lr": args.lr})
    adam, no_sched = OmegaConf.create({"name": "adam"}), OmegaConf.create({"name": "none"})
    print(f"MNIST: {n} training images, batch {args.batch_size}, Adam {args.lr}, {torch.get_num_threads()} threads")

    # The same images for the reference loops: torchvision's MNIST restricted to kdrun's training split (the
    # complement of its seeded validation carve, split_seed 0), normalised with the same statistics.
    mean, std = data.transform.mean.item(), data.transform.std.item()
    transform = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((mean,), (std,))]
    )
    mnist = torchvision.datasets.MNIST(args.root, train=True, transform=transform)
    order = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(0))
    train_indices = order[len(mnist) - n :].sort().values
    assert torch.equal(mnist.data[train_indices].unsqueeze(1), data.train.images), "not the same training images"
    loader = DataLoader(
        Subset(mnist, train_indices.tolist()),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
    )

    def student():
        torch.manual_seed(args.seed)
        return build_model(STUDENT, spec)

    def kdrun_epoch(objective, teacher=None, logits=None):
        model = student()
        result = fit(
            "bench", model, objective, data, recipe, adam, no_sched, runtime, args.seed, None, teacher, 1024, logits
        )
        return model, result.train_time_s

    # 1. Data path, CE only.
    ref_time = classic_ce_epoch(student(), loader, args.lr)
    _, ce_time = kdrun_epoch(CrossEntropy())
    print(
        f"\n1. data path (student CE epoch): DataLoader {n / ref_time:.0f} img/s, kdrun tensors {n / ce_time:.0f} img/s"
    )
    print(f"   ratio kdrun / DataLoader = {ref_time / ce_time:.2f}x   (target >= 3x)")

    # A teacher to distil from, trained by kdrun.
    torch.manual_seed(args.seed)
    teacher = build_model(TEACHER, spec)
    teacher_recipe = OmegaConf.create({"epochs": args.teacher_epochs, "batch_size": args.batch_size, "lr": args.lr})
    fit("teacher", teacher, CrossEntropy(), data, teacher_recipe, adam, no_sched, runtime, args.seed)
    teacher.eval()
    print(f"\nteacher resnet18: test acc {evaluate(teacher, data.test, data, runtime, 1024)['acc']:.4f}")

    # 2. Teacher outputs: cached logits vs CE-only; online teacher vs CE-only.
    kd = build_objective({"name": "kd"}, args.T, args.alpha)
    start = time.perf_counter()
    logits, _ = predict(teacher, data.train, data, runtime, 1024)
    logits_time = time.perf_counter() - start
    cached_student, cached_time = kdrun_epoch(kd, logits=logits)
    _, online_time = kdrun_epoch(kd, teacher=teacher)
    print(
        f"\n2. distillation epoch / CE-only epoch: cached logits {cached_time / ce_time:.2f}x (target <= 1.15x), "
        f"online teacher {online_time / ce_time:.2f}x"
    )
    print(
        f"   CE {ce_time:.1f} s, cached {cached_time:.1f} s (+ {logits_time:.1f} s once for the logits), "
        f"online {online_time:.1f} s"
    )

    # 3. The classic loop vs kdrun's distillation epoch, same models, batch size and steps.
    classic_student = student()
    classic_time = classic_kd_epoch(classic_student, teacher, loader, args.T, args.alpha, args.lr)
    classic_acc = evaluate(classic_student, data.test, data, runtime, 1024)["acc"]
    kdrun_acc = evaluate(cached_student, data.test, data, runtime, 1024)["acc"]
    print(
        f"\n3. classic loop {classic_time:.1f} s vs kdrun {cached_time:.1f} s: "
        f"{classic_time / cached_time:.2f}x faster (target >= 2x); "
        f"{(classic_time / (cached_time + logits_time)):.2f}x counting the one-off logits pass"
    )
    print(f"   test acc after one epoch: classic {classic_acc:.4f}, kdrun {kdrun_acc:.4f}")


if __name__ == "__main__":
    main()

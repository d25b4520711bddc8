"""A small convolutional network for MNIST-style digits, with the seed example's command line.

    python3 convolutional_network.py --trainImagesFile ${DATA_DIR}/train-images-idx3-ubyte.gz \
        --trainLabelsFile ... --testImagesFile ... --testLabelsFile ... \
        --learningRate 0.001 --trainingIters 10000

Reads MNIST-format IDX files (gzipped or not; the image size comes from the files' header) and runs on
the GPUs the container was given (CUDA when available, else CPU).  Writes the model to
$RESULT_DIR/model.pt, one JSON line per evaluation to $RESULT_DIR/metrics.jsonl and a final
$RESULT_DIR/metrics.json ({"accuracy": ..., "loss": ..., "examples": ..., "seconds": ...}).
A missing or unreadable data file ends it with a message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from input_data import read_images, read_labels
from torch import nn


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def tensors(images_file: str, labels_file: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as a float tensor (count, 1, rows, cols) in 0..1 and labels as a long tensor (count)."""
    path = images_file
    try:
        count, rows, cols, raw = read_images(path)
        path = labels_file
        labels = read_labels(path)
    except (OSError, EOFError, ValueError) as error:  # a truncated or foreign file
        fail(f"cannot read {path}: {error}")
    if len(labels) != count:
        fail(f"{labels_file}: {len(labels)} labels for {count} images in {images_file}")
    if count == 0:
        fail(f"{images_file}: no images")
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().div_(255.0)
    return images.view(count, 1, rows, cols), torch.frombuffer(bytearray(labels), dtype=torch.uint8).long()


def model(rows: int, cols: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (rows // 4) * (cols // 4), 10),
    )  # fmt: skip


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainImagesFile", required=True)
    parser.add_argument("--trainLabelsFile", required=True)
    parser.add_argument("--testImagesFile", required=True)
    parser.add_argument("--testLabelsFile", required=True)
    parser.add_argument("--learningRate", type=float, default=0.001)
    parser.add_argument("--trainingIters", type=int, default=10000, help="training examples to process")
    parser.add_argument("--batchSize", type=int, default=64)
    parser.add_argument("--displayStep", type=int, default=10, help="batches between evaluations")
    return parser.parse_args()


def load(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    files = (args.trainImagesFile, args.trainLabelsFile, args.testImagesFile, args.testLabelsFile)
    missing = [name for name in files if not Path(name).is_file()]
    if missing:
        data_dir = os.environ.get("DATA_DIR", "not set")
        fail(f"training data not found: {', '.join(missing)} (DATA_DIR={data_dir})")
    train_x, train_y = tensors(args.trainImagesFile, args.trainLabelsFile)
    test_x, test_y = tensors(args.testImagesFile, args.testLabelsFile)
    if train_x.shape[1:] != test_x.shape[1:]:
        fail(f"train images are {tuple(train_x.shape[2:])}, test images {tuple(test_x.shape[2:])}")
    side = f"{train_x.shape[2]}x{train_x.shape[3]}"
    print(f"data: {len(train_x)} train / {len(test_x)} test images of {side}", flush=True)
    return train_x, train_y, test_x, test_y


def main() -> None:
    args = arguments()
    train_x, train_y, test_x, test_y = load(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}; GPUs visible: {os.environ.get('NVIDIA_VISIBLE_DEVICES', 'none')}", flush=True)
    torch.manual_seed(0)
    net = model(train_x.shape[2], train_x.shape[3]).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learningRate)
    loss_fn = nn.CrossEntropyLoss()
    test_x, test_y = test_x.to(device), test_y.to(device)
    result_dir = Path(os.environ.get("RESULT_DIR", "."))
    result_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = (result_dir / "metrics.jsonl").open("w")

    seen, step, started = 0, 0, time.monotonic()
    accuracy, loss = 0.0, torch.tensor(float("nan"))
    while seen < args.trainingIters:
        index = torch.randint(0, len(train_x), (args.batchSize,))
        x, y = train_x[index].to(device), train_y[index].to(device)
        optimizer.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        seen += args.batchSize
        step += 1
        if step % args.displayStep == 0 or seen >= args.trainingIters:
            with torch.no_grad():
                accuracy = (net(test_x).argmax(dim=1) == test_y).float().mean().item()
            record = {"step": step, "examples": seen, "loss": loss.item(), "accuracy": accuracy}
            print(f"Iter {seen}, Minibatch Loss= {loss.item():.6f}, Accuracy= {accuracy:.5f}", flush=True)
            metrics_log.write(json.dumps(record) + "\n")
    metrics_log.close()
    torch.save(net.state_dict(), result_dir / "model.pt")
    summary = {
        "accuracy": accuracy,
        "loss": loss.item(),
        "examples": seen,
        "seconds": time.monotonic() - started,
    }
    (result_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("Optimization Finished!", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

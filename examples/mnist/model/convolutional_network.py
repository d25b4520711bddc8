"""A small convolutional network for MNIST-style digits, with the seed example's command line.

    python3 convolutional_network.py --trainImagesFile ${DATA_DIR}/train-images-idx3-ubyte.gz \
        --trainLabelsFile ... --testImagesFile ... --testLabelsFile ... \
        --learningRate 0.001 --trainingIters 2000

Runs on the GPUs the container was given (CUDA when available, else CPU).  Writes the model to
$RESULT_DIR/model.pt, one JSON line per evaluation to $RESULT_DIR/metrics.jsonl and a final
$RESULT_DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from input_data import read_images, read_labels
from torch import nn


def tensors(images_file: str, labels_file: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    count, _pixels, raw = read_images(images_file)
    labels = read_labels(labels_file)
    if len(labels) != count:
        raise SystemExit(f"{labels_file}: {len(labels)} labels for {count} images")
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().div_(255.0)
    return images.view(count, 1, side, side), torch.frombuffer(bytearray(labels), dtype=torch.uint8).long()


def model(side: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 10),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainImagesFile", required=True)
    parser.add_argument("--trainLabelsFile", required=True)
    parser.add_argument("--testImagesFile", required=True)
    parser.add_argument("--testLabelsFile", required=True)
    parser.add_argument("--learningRate", type=float, default=0.001)
    parser.add_argument("--trainingIters", type=int, default=2000, help="training examples to process")
    parser.add_argument("--batchSize", type=int, default=64)
    parser.add_argument("--displayStep", type=int, default=10, help="batches between evaluations")
    parser.add_argument("--side", type=int, default=28, help="image side in pixels")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}; GPUs visible: {os.environ.get('NVIDIA_VISIBLE_DEVICES', 'none')}", flush=True)
    torch.manual_seed(0)
    train_x, train_y = tensors(args.trainImagesFile, args.trainLabelsFile, args.side)
    test_x, test_y = tensors(args.testImagesFile, args.testLabelsFile, args.side)
    net = model(args.side).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learningRate)
    loss_fn = nn.CrossEntropyLoss()
    result_dir = Path(os.environ.get("RESULT_DIR", "."))
    result_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = (result_dir / "metrics.jsonl").open("w")

    seen, step, started = 0, 0, time.monotonic()
    accuracy = 0.0
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
                predicted = net(test_x.to(device)).argmax(dim=1)
                accuracy = (predicted == test_y.to(device)).float().mean().item()
            record = {"step": step, "examples": seen, "loss": loss.item(), "accuracy": accuracy}
            print(f"Iter {seen}, Minibatch Loss= {loss.item():.6f}, Accuracy= {accuracy:.5f}", flush=True)
            metrics_log.write(json.dumps(record) + "\n")
    metrics_log.close()
    torch.save(net.state_dict(), result_dir / "model.pt")
    seconds = time.monotonic() - started
    summary = {"accuracy": accuracy, "loss": loss.item(), "examples": seen, "seconds": seconds}
    (result_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("Optimization Finished!", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

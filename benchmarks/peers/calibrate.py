"""The two environments' torch builds on the same bare work, no framework: is a difference between
lifelong and Avalanche the frameworks' or the torch builds' (lifelong: torch 2.13.0+cpu; Avalanche's
venv: torch 2.14.1, the default PyPI build)?

    .venv/bin/python benchmarks/peers/calibrate.py
    benchmarks/peers/.venv-avalanche/bin/python benchmarks/peers/calibrate.py

Prints one JSON line: CPU seconds (one thread) of 200 AdamW training steps of the benchmark's MLP
(784 -> 256 -> 256 -> 10, batch 25) and of the frozen EfficientNet-Lite0 forward pass on 400 images at
32 px (random weights: the cost does not depend on them), best of 3.
"""

import json
import time

import torch
import torch.nn.functional as F


def mlp_steps() -> float:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(784, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10)]
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x, y = torch.randn(25, 784), torch.randint(0, 10, (25,))
    start = time.process_time()
    for _ in range(200):
        h = x
        for layer in layers[:-1]:
            h = F.relu(layer(h))
        loss = F.cross_entropy(layers[-1](h), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.process_time() - start


@torch.no_grad()
def efficientnet_forward() -> float:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    x = torch.randn(400, 3, 32, 32)
    start = time.process_time()
    for i in range(0, 400, 25):
        net.extract_features(x[i : i + 25]).mean(dim=(2, 3))
    return time.process_time() - start


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "mlp_200_steps_cpu_s": min(mlp_steps() for _ in range(3)),
                      "efficientnet_400_images_cpu_s": min(efficientnet_forward() for _ in range(3))}))

"""PyTorch eager inference speed of a backbone's reference implementation
(the one `finetuned weights verify` compares against), for
`cargo bench --bench backbones`: ImageNet weights (or, with WEIGHTS
`random`, the architecture at random initialization: speed does not depend
on the values), eval mode, no_grad.

usage: reference_backbones.py NAME WEIGHTS SIZE BATCH SECONDS THREADS
Prints images/s."""
import os
import sys
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from reference_logits import reference  # noqa: E402


def main(name, weights, size, batch, seconds, threads):
    torch.set_num_threads(int(threads))
    model = reference(name)
    if weights != "random":
        model.load_state_dict(load_file(weights), strict=False)
    model.eval()
    x = torch.rand(int(batch), 3, int(size), int(size))
    with torch.no_grad():
        for _ in range(3):
            model(x)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < float(seconds):
            model(x)
            done += int(batch)
    print(done / (time.perf_counter() - started))


if __name__ == "__main__":
    main(*sys.argv[1:7])

"""The floor under `vit predict FOLDER` in bench/e2e.py: what no input pipeline can go below.

Imports torch, loads the checkpoint through vitcli and runs the forward pass over as many
images as the folder holds, at the same batch size, on zeros: no file is read, decoded or
resized and nothing is written. Ends as the `vit` program does (atexit handlers, then
os._exit). Run by bench/e2e.py as its own process, beside the commands it bounds.

    python bench/e2e_floor.py MODEL IMAGES [--batch-size 32]
"""

import argparse
import atexit
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as predict sets it
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from vitcli.runtime import keep_freed_memory

    keep_freed_memory()
    import torch

    from vitcli.weights.resolve import load_model

    bundle = load_model(args.model)
    model = bundle.model.eval()
    height, width = bundle.preprocess.size
    with torch.inference_mode():
        for start in range(0, args.images, args.batch_size):
            count = min(args.batch_size, args.images - start)
            model(torch.zeros(count, 3, height, width)).softmax(-1).topk(5)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""A small vision transformer on scikit-learn's 8×8 digits: dense vs STL (class 1 and converted).

    .venv/bin/python examples/digits_vit.py [--ranks 16 24 32 40 49] [--steps 600]

(A) train from scratch with every linear layer an STL layer (encoders/decoders trained too);
(B) convert the trained dense model: plain encoding with the fitted basis, + calibration on
256 training images, + distillation from the dense model with 10% of the training steps.
Prints test accuracy (%) per rank and writes examples/digits_vit.json. ``--bf16-cuda`` adds
a table of the same models evaluated in bf16 on the CUDA device.
"""

from __future__ import annotations

import copy

import torch
from _common import bf16_cuda, compare_ranks, parse_args, report, train

from stl_compiler.digits import DigitsViT, load, loss_fn  # shared with make demo


def main() -> None:
    args = parse_args(__doc__, "examples/digits_vit.json")
    steps = args.steps or 600
    data = load()

    def batches(seed: int = args.seed):
        return data.batches(seed)

    torch.manual_seed(args.seed)
    init = DigitsViT()
    dense = copy.deepcopy(init)
    seconds = train(dense, batches(), loss_fn, steps, lr=3e-3)
    dense_acc = data.accuracy(dense)
    print(f"dense: {dense_acc:.2f}% ({seconds:.0f}s, {steps} steps)", flush=True)
    extra_metrics = {"bf16_cuda": bf16_cuda(data.accuracy)} if args.bf16_cuda else {}
    calib = data.calibration(256)
    distill_steps = steps // 10
    stream = batches(args.seed + 1)
    distill_batches = [next(stream)[0] for _ in range(distill_steps)]
    results = compare_ranks(args.ranks, init, dense, "tokens", batches, loss_fn, steps, calib,
                            distill_batches, data.accuracy, ".2f", jobs=args.jobs,
                            extra_metrics=extra_metrics)
    # after the ranks: their worker processes are forked, which needs CUDA untouched until then
    dense_extra = {name: fn(dense) for name, fn in extra_metrics.items()}
    report("digits ViT, test accuracy", "accuracy %", dense_acc, results, args.out,
           {"steps": steps, "distill_steps": distill_steps, "seed": args.seed}, dense_extra)


if __name__ == "__main__":
    main()

"""Experiments: how close can a converted char LM get to dense at rank 24 (row_grouping="batch")?

    .venv/bin/python tools/char_lm_experiments.py VARIANT [VARIANT ...] [--rank 24]

Trains examples/char_lm.py's dense CharLM once (same seed, data and recipe as the example;
cached in /tmp/char_lm_dense.pt), converts it at ``--rank`` with row_grouping="batch",
calibrates (cached per calibration recipe in /tmp) and distils with the variant's recipe.
Prints and appends one JSON line per variant to /tmp/char_lm_experiments.jsonl.
Calibration uses the example's 8 calibration batches; distillation uses at most ``steps``
optimizer steps of batch 32 (the example's 100 distillation batches unless "fresh").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from _common import to_stl, train  # noqa: E402
from char_lm import (  # noqa: E402
    VOCAB,
    CharLM,
    batches,
    loss_fn,
    split_text,
    validation_batches,
)
from char_lm import perplexity as char_perplexity  # noqa: E402

from stl_compiler.fit import calibrate, distill, row_separable_basis  # noqa: E402
from stl_compiler.fit.calibrate import calibrate_layer  # noqa: E402
from stl_compiler.nn import STLLinear  # noqa: E402

VARIANTS = """variant keys (default in brackets):
  calib=[base]-N   calibration, N rounds (cached in /tmp/char_lm_calib_r{R}_{calib}.pt):
                   base: calibrate(steps=N) (the previous example); teacher: each layer fitted
                   to the dense model's activation of that layer; resid: teacher, and proj/fc2
                   also correct the residual stream's error; rowsep: row-separable basis +
                   base; rowsepteacher / rowsepresid: row-separable + teacher / resid;
                   pkg: calibrate(target="teacher", basis="row_separable") (the example's
                   recipe); pkgseed-S: pkg with basis seed S; pkglayer: row-separable only
  steps=[100]      distillation steps (0: none)
  lr=[2e-4]        peak learning rate (linear warmup, cosine to lr/20)
  params=[stl]|all STL layers' parameters only, or all parameters
  warmup=[0]       warmup steps
  feat=[0]         weight of the block-output MSE (normalized by the teacher's mean square)
  fresh=[0]        1: fresh training batches instead of the example's 100
  ce=[0], wd=[0]   weight of the next-char cross-entropy; AdamW weight decay
  mask=[0]         1: keep ex / d row-separable during distillation
  olr=[1]          learning-rate factor of the non-STL parameters
  impl=[script]|pkg  distillation loop: this script's or stl_compiler.fit.distill
example: calib=pkg-2,params=all,lr=1.2e-2,warmup=10,feat=1   (the example's r=24 recipe)
"""
SEED, STEPS = 0, 1000
DENSE_PATH = "/tmp/char_lm_dense.pt"
LOG = "/tmp/char_lm_experiments.jsonl"

train_text, val_text = split_text()
VAL = validation_batches(val_text)


def perplexity(model):
    return char_perplexity(model, VAL)


def dense_model() -> CharLM:
    torch.manual_seed(SEED)
    init = CharLM()
    dense = copy.deepcopy(init)
    if os.path.exists(DENSE_PATH):
        dense.load_state_dict(torch.load(DENSE_PATH))
    else:
        seconds = train(dense, batches(train_text, SEED), loss_fn, STEPS, lr=3e-3)
        torch.save(dense.state_dict(), DENSE_PATH)
        print(f"trained dense in {seconds:.0f}s", flush=True)
    dense.eval()
    return dense


# the example's data: 8 calibration batches, then 100 distillation batches, same stream
_stream = batches(train_text, SEED + 1)
CALIB = [next(_stream)[:, :-1] for _ in range(8)]
DISTILL = [next(_stream)[:, :-1] for _ in range(100)]


# ----------------------------------------------------------------------------- calibration
def _capture_out(model, name, batches_):
    outs = []
    hook = model.get_submodule(name).register_forward_hook(
        lambda _m, _a, o: outs.append(o.detach()))
    with torch.no_grad():
        for b in batches_:
            model(b)
    hook.remove()
    return outs


def _capture_in(model, name, batches_):
    ins = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: ins.append(a[0].detach()))
    with torch.no_grad():
        for b in batches_:
            model(b)
    hook.remove()
    return ins


def _forward_order(model, batch):
    """The STL layers' names in the order ``batch`` first calls them (unused ones last)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, STLLinear)}
    order: dict[str, None] = {}  # insertion-ordered set

    def called(module, _args):
        order.setdefault(names[module], None)

    hooks = [m.register_forward_pre_hook(called) for m in names]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    return [*order, *(n for n in names.values() if n not in order)]


def calibrate_to_teacher(student, teacher, batches_, steps, residual: bool):
    """Sequential error-correcting calibration: layer ``name`` of the student, on its own
    inputs, is fitted to the *teacher's* output of that layer on the teacher's inputs.
    ``residual``: for proj / fc2 (which add into the residual stream), the target also
    corrects the residual-stream error accumulated so far:
    teacher_out + (teacher_stream - student_stream)."""
    rows = []
    for name in _forward_order(student, batches_[0]):
        inputs = _capture_in(student, name, batches_)
        targets = _capture_out(teacher, name, batches_)
        if residual and name.endswith((".proj", ".fc2")):
            block = name.rsplit(".", 1)[0]
            s_in = _capture_in(student, block, batches_)
            t_in = _capture_in(teacher, block, batches_)
            if name.endswith(".fc2"):
                proj = block + ".proj"
                s_in = [a + b for a, b in zip(s_in, _capture_out(student, proj, batches_))]
                t_in = [a + b for a, b in zip(t_in, _capture_out(teacher, proj, batches_))]
            targets = [y + ti - si for y, ti, si in zip(targets, t_in, s_in)]
        before, after = calibrate_layer(student.get_submodule(name), inputs, targets, steps,
                                        name=name)
        rows.append({"layer": name, "error_before": before, "error_after": after})
    return rows


def row_separable_basis_(student, seed=0):
    """Restart every layer from :func:`row_separable_basis` (its weight is re-solved later by
    calibration)."""
    gen = torch.Generator().manual_seed(seed)
    for m in student.modules():
        if isinstance(m, STLLinear):
            ex, d = row_separable_basis(m.tile, m.rank, gen)
            with torch.no_grad():
                m.ex.copy_(ex)
                m.d.copy_(d)
                m.weight_encoded.zero_()


def calibrated(dense, rank, recipe: str):
    """Converted + calibrated student for ``recipe`` (cached in /tmp)."""
    path = f"/tmp/char_lm_calib_r{rank}_{recipe}.pt"
    student = to_stl(dense, rank, "batch", keep_reference=True)
    if os.path.exists(path):
        student.load_state_dict(torch.load(path))
        return student, None
    start = time.perf_counter()
    kind, _, arg = recipe.partition("-")
    if recipe == "plain":
        info = None
    elif kind == "base":            # the example: calibrate(steps=2) on 8 batches
        info = calibrate(student, CALIB, steps=int(arg or 2), progress=False).rows
    elif kind == "teacher":          # error-correcting, targets = teacher layer outputs
        info = calibrate_to_teacher(student, dense, CALIB, int(arg or 2), residual=False)
    elif kind == "resid":            # error-correcting incl. residual stream
        info = calibrate_to_teacher(student, dense, CALIB, int(arg or 2), residual=True)
    elif kind == "rowsep":           # row-separable basis + the example's calibration
        row_separable_basis_(student)
        info = calibrate(student, CALIB, steps=int(arg or 2), progress=False).rows
    elif kind == "pkg":              # the package: row-separable basis + teacher targets
        info = calibrate(student, CALIB, steps=int(arg or 2), teacher=dense, target="teacher",
                         basis="row_separable", progress=False).rows
    elif kind == "pkgseed":          # as "pkg" (2 rounds), another seed of the random basis
        info = calibrate(student, CALIB, steps=2, teacher=dense, target="teacher",
                         basis="row_separable", seed=int(arg), progress=False).rows
    elif kind == "pkglayer":         # the package: row-separable basis, dense-layer targets
        info = calibrate(student, CALIB, steps=int(arg or 2), basis="row_separable",
                         progress=False).rows
    elif kind == "rowsepteacher":
        row_separable_basis_(student)
        info = calibrate_to_teacher(student, dense, CALIB, int(arg or 2), residual=False)
    elif kind == "rowsepresid":
        row_separable_basis_(student)
        info = calibrate_to_teacher(student, dense, CALIB, int(arg or 2), residual=True)
    else:
        raise ValueError(recipe)
    print(f"calibration {recipe}: {time.perf_counter() - start:.0f}s", flush=True)
    torch.save(student.state_dict(), path)
    return student, info


# ---------------------------------------------------------------------------- distillation
def distill_custom(student, teacher, steps, lr, params="stl", warmup=0, feat=0.0,
                   fresh=False, ce=0.0, wd=0.0, mask=False, olr=1.0):
    """KL(teacher ‖ student) on logits (+ ``feat`` × MSE of every block's output, normalized
    by the teacher's mean square) (+ ``ce`` × next-char cross-entropy), Adam(W), linear
    warmup then cosine to lr/20. ``params``: "stl" (STL layers only) or "all"."""
    if params == "stl":
        ps = [p for m in student.modules() if isinstance(m, STLLinear) for p in m.parameters()]
    else:
        ps = list(student.parameters())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in ps:
        p.requires_grad_(True)
    stl_ids = {id(p) for m in student.modules() if isinstance(m, STLLinear)
               for p in m.parameters()}
    groups = [{"params": [p for p in ps if id(p) in stl_ids], "lr": lr},
              {"params": [p for p in ps if id(p) not in stl_ids], "lr": lr * olr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=wd)

    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        prog = (i - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    masks = []
    if mask:   # keep ex / d row-separable: term p reads / writes only tile row p // (r/t)
        for m in student.modules():
            if isinstance(m, STLLinear):
                t, r = m.tile, m.rank
                keep = (torch.arange(r)[:, None] // (r // t)) == (torch.arange(t * t)[None] // t)
                masks += [(m.ex, keep.to(m.ex.dtype)), (m.d, keep.to(m.d.dtype))]
        with torch.no_grad():
            for p, k in masks:
                p.mul_(k)
    feats_s, feats_t = [], []
    hooks = []
    if feat:
        for blk in student.blocks:
            hooks.append(blk.register_forward_hook(lambda _m, _a, o: feats_s.append(o)))
        for blk in teacher.blocks:
            hooks.append(blk.register_forward_hook(lambda _m, _a, o: feats_t.append(o)))
    stream = batches(train_text, SEED + 7)
    student.train()
    for i in range(steps):
        full = next(stream) if fresh else None
        batch = full[:, :-1] if fresh else DISTILL[i % len(DISTILL)]
        feats_s.clear()
        feats_t.clear()
        with torch.no_grad():
            target = teacher(batch)
        out = student(batch)
        loss = F.kl_div(F.log_softmax(out, -1).reshape(-1, VOCAB),
                        F.log_softmax(target, -1).reshape(-1, VOCAB), log_target=True,
                        reduction="batchmean")
        if feat:
            loss = loss + feat * sum(F.mse_loss(a, b) / b.square().mean()
                                     for a, b in zip(feats_s, feats_t))
        if ce:
            loss = loss + ce * F.cross_entropy(out.reshape(-1, VOCAB), full[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p, k in masks:
                p.mul_(k)
    for h in hooks:
        h.remove()
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()


# ------------------------------------------------------------------------------ variants
def parse_variant(spec: str) -> dict:
    """``calib=base,steps=100,lr=2e-4,params=stl,warmup=0,feat=0,fresh=0,ce=0``"""
    out = {"calib": "base", "steps": 100, "lr": 2e-4, "params": "stl", "warmup": 0,
           "feat": 0.0, "fresh": 0, "ce": 0.0, "wd": 0.0, "mask": 0, "impl": "script", "olr": 1.0}
    for item in spec.split(","):
        if item:
            key, value = item.split("=")
            out[key] = type(out[key])(value) if key not in ("lr", "feat", "ce", "wd", "olr") \
                else float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=VARIANTS)
    parser.add_argument("variants", nargs="+", help="comma-separated key=value lists")
    parser.add_argument("--rank", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense = dense_model()
    dense_ppl = perplexity(dense)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    for spec in args.variants:
        v = parse_variant(spec)
        start = time.perf_counter()
        student, info = calibrated(dense, args.rank, v["calib"])
        calib_ppl = perplexity(student)
        if v["steps"] > 0 and v["impl"] == "pkg":
            distill(student, dense, DISTILL[:v["steps"]], steps=v["steps"], lr=v["lr"],
                    params=v["params"], warmup=v["warmup"], progress=False,
                    features=["blocks.0", "blocks.1"] if v["feat"] else [],
                    feature_weight=v["feat"] or 1.0)
        elif v["steps"] > 0:
            distill_custom(student, dense, v["steps"], v["lr"], v["params"], v["warmup"],
                           v["feat"], bool(v["fresh"]), v["ce"], v["wd"], bool(v["mask"]), v["olr"])
        ppl = perplexity(student)
        row = {"rank": args.rank, "variant": spec, **v, "dense": dense_ppl,
               "calibrated": calib_ppl, "distilled": ppl, "ratio": ppl / dense_ppl,
               "seconds": time.perf_counter() - start}
        if info is not None:
            row["calibration"] = [(r["layer"], r["error_before"], r["error_after"])
                                  for r in info]
        print(json.dumps({k: val for k, val in row.items() if k != "calibration"}),
              flush=True)
        if info is not None:
            print("  calib errors:", ", ".join(f"{n}:{b:.3f}->{a:.3f}" for n, b, a in
                                              row["calibration"] if b is not None))
        with open(LOG, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""One process: the training step (the config's optimizer, its batch size) and the evaluation forward
at batch 256 of CONFIG, timed with the fastcnn on sys.path (random inputs; 2 warm-up steps, then
each timed for 3 s, at least 3 and at most 40 times, the median kept); prints one JSON line.

    PYTHONPATH=TREE python3 scripts/ab_step.py CONFIG     (scripts/ab_trees.sh runs it per tree)
"""
import json
import os
import statistics
import sys
import time

import numpy as np

import fastcnn
from fastcnn.optim import build_optimizer

cfg = fastcnn.load_config(sys.argv[1])
model = fastcnn.build_model(cfg.model, seed=0)
opt = build_optimizer(cfg.train.optimizer, model.parameters())
rng = np.random.default_rng(0)
n = cfg.data.batch_size
x = rng.standard_normal((n, *cfg.model.input_shape)).astype(np.float32)
y = rng.integers(0, cfg.model.num_classes, n)
xe = rng.standard_normal((256, *cfg.model.input_shape)).astype(np.float32)
for _ in range(2):
    fastcnn.train_step(model, opt, x, y)
    model.forward(xe, training=False)


def timed(f, budget=3.0, most=40):
    ts, t0 = [], time.perf_counter()
    while len(ts) < 3 or (time.perf_counter() - t0 < budget and len(ts) < most):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


step = timed(lambda: fastcnn.train_step(model, opt, x, y))
ev = timed(lambda: model.forward(xe, training=False))
print(json.dumps({"tree": os.environ.get("TREE"), "config": sys.argv[1], "train_img_s": n / step,
                  "eval_img_s": 256 / ev}))

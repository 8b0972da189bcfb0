"""The command line the differential clients share (httpdiff.py, redisdiff.py): run
run_seed(port, seed, steps) for each seed of --seeds A-B and print one JSON line each,
{"seed": N, "log": [...]}, as soon as it is done."""
import argparse
import json


def run_seeds(run_seed, seeds="1-10", steps=80, password=False):
    """password: the client takes --password P, given to run_seed as password=."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--steps", type=int, default=steps)
    if password:
        ap.add_argument("--password")
    a = ap.parse_args()
    kw = {"password": a.password} if password else {}
    lo, _, hi = a.seeds.partition("-")
    for seed in range(int(lo), int(hi or lo) + 1):
        print(json.dumps({"seed": seed, "log": run_seed(a.port, seed, a.steps, **kw)}), flush=True)

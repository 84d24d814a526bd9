"""Time exact scoring + top-10 at COCO 5K scale on CPU: 25,000 captions x 5,000 images, D=2560.

Not a test. Prints seconds per direction and the process's peak RSS.
Run: PYTHONPATH=. python bench/bench_retrieval.py [--n-txt 25000 --n-img 5000 --dim 2560 --chunk 4096]
"""

import argparse
import os
import resource
import time

import numpy as np

from slq.retrieval import image_text_recall, topk


def unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-txt", type=int, default=25_000)
    ap.add_argument("--n-img", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=2560)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    img = unit(rng, args.n_img, args.dim)
    txt_to_img = np.repeat(np.arange(args.n_img), -(-args.n_txt // args.n_img))[: args.n_txt]
    txt = img[txt_to_img] + 0.05 * rng.standard_normal((args.n_txt, args.dim), dtype=np.float32)
    print(f"cpus={os.cpu_count()} data={args.n_txt}x{args.n_img}x{args.dim} float32, chunk={args.chunk}")
    print(f"peak RSS after data: {peak_rss_mib():.0f} MiB")

    t = time.perf_counter()
    topk(txt, img, args.k, chunk=args.chunk)
    print(f"t2i scoring + top-{args.k}: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    topk(img, txt, args.k, chunk=args.chunk)
    print(f"i2t scoring + top-{args.k}: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    r = image_text_recall(img, txt, txt_to_img, ks=(1, 5, 10), chunk=args.chunk)
    print(f"image_text_recall (both ways + recall): {time.perf_counter() - t:.2f} s, mean_R={r['mean_R']:.3f}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()

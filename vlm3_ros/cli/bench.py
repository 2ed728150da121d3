"""``vlm3-ros bench``: shared-prefix engine against the reference way of querying a VLM3 model.

On one 640x480 frame unified to f = 1000 px, for each point count N, the same model on the same
machine answers N depth questions twice, side by side in one run:

(a) the reference: the full prompt through the processor and one ``generate(max_new_tokens=128)``
    per point, the image re-encoded every time (as the public VLM3 notebook does);
(b) the engine: the image prefix encoded and prefilled once, all N questions decoded as one batch.

The engine's frame time is the median of ``--engine-repeats`` frames answered back to back (as a
node answers a camera), the reference's the total of its N calls. Before each N, both ways answer
the same points once on another frame, untimed (one-time costs of new shapes would otherwise fall on
the engine's first timed call and be spread over the reference's
N calls). It reports points/s, per-frame latency, peak memory, the ratio b/a and whether every answer was
identical token for token, plus where the engine's frame time goes, and the tokens each point
costs with the model's own depth protocol against the released VLM3 depth protocol in the same
tokenizer: prompt tokens after the image (the question and the chat turn around it) and answer
tokens (what the engine generated, against the DepthLM-style answer the VLM3 protocol trains).

With ``--server URL`` (a server serving the same ``--model``, e.g. ``vlm3-ros serve MODEL``) the same
run also measures (c) the server backend: the N questions all at once and one at a time, and a fleet
of depth nodes sharing the server (:mod:`vlm3_ros.cli.bench_server`). Each point count then uses its
own frame, so that the server never finds a frame in its prefix cache from an earlier row.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from .server_options import add_server_options, server_backend

HELP = "Benchmark the shared-prefix engine against one generate() per point (same model, same run)."

BENCH_MODEL_VERSION = "1"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", type=int, nargs="+", default=[1, 16, 64, 256], help="point counts N")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the generated bench model)")
    parser.add_argument("--preset", default="bench", help="preset of the generated model when --model is not given")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens generated per answer (random weights never stop early)")
    parser.add_argument("--max-batch", type=int, default=64, help="engine: questions decoded together at most")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--image", type=Path, help="a 640x480 image file instead of the generated test frame")
    parser.add_argument("--focal", type=float, default=585.0, help="focal length of the frame in pixels")
    parser.add_argument("--engine-repeats", type=_positive_int, default=5, metavar="K",
                        help="engine: frames answered back to back per N, their median time is the engine's (default 5)")
    parser.add_argument("--skip-reference-above", type=int, default=0,
                        help="skip the (slow) reference for N above this (0: never skip)")
    parser.add_argument("--server", metavar="URL", help="also measure this OpenAI-compatible server serving --model "
                        "(e.g. vlm3-ros serve MODEL): all questions at once, one at a time, and a fleet of robots")
    parser.add_argument("--robots", type=int, default=2, help="with --server: depth nodes in their own namespaces "
                        "sharing the server in the fleet measurement (0: no fleet measurement)")
    parser.add_argument("--fleet-seconds", type=float, default=20.0, help="duration of each fleet configuration")
    parser.add_argument("--fleet-rounds", type=int, default=3, help="rounds the fleet configurations take turns for")
    parser.add_argument("--fleet-points", type=int, default=64, help="depth questions per frame in the fleet")
    add_server_options(parser)


def bench_frame(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A deterministic textured RGB frame (gradients, blocks and noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / width * 200, yy / height * 200, ((xx // 40 + yy // 40) % 2) * 120], axis=-1)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 60), rng.integers(0, height - 60)
        w, h = rng.integers(20, 120), rng.integers(20, 120)
        image[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak on GPU, sampled resident set size on CPU."""

    def __init__(self, device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak_mb = self._rss_mb()

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak_mb = max(self.peak_mb, self._rss_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())


def _bench_model(preset: str) -> Path:
    from ..engine.model_factory import build_checkpoint
    from ..paths import cache_dir

    path = cache_dir("models") / f"{preset}-v{BENCH_MODEL_VERSION}"
    if not path.is_dir():
        print(f"building the {preset} model (random weights) in {path} ...", flush=True)
        build_checkpoint(path, preset=preset)
    return path


def _tokens_after_image(backend, encoded) -> list[int]:
    """Prompt tokens after each question's last image token (and the ``<|vision_end|>`` closing it)."""
    out = []
    for ids in encoded.input_ids:
        last = max(i for i, t in enumerate(ids) if t == encoded.image_token_id)
        out.append(len(ids) - last - 2)
    return out


def token_costs(backend, estimator, prepared, uv, generated_tokens: int) -> dict:
    """Tokens per point of the model's depth protocol and of the VLM3 depth protocol (same tokenizer)."""
    from .. import protocol
    from ..engine import Request

    spec = estimator.spec
    questions = estimator.questions(prepared, uv)[0]
    ours = _tokens_after_image(backend, backend.encode(Request(images=[prepared.image], questions=questions, spec=spec)))
    width, height = prepared.width, prepared.height
    vlm3_questions = [protocol.depth_question(*protocol.normalize_point(x, y, width, height, protocol.DEPTH.coord_scale))
                      for x, y in prepared.mapping.to_prepared(uv)]
    request = Request(images=[prepared.image], questions=vlm3_questions, spec=protocol.DEPTH)
    theirs = _tokens_after_image(backend, backend.encode(request))
    vlm3_answer = len(backend.tokenizer(protocol.format_depth_answer(2.34))["input_ids"]) + 1  # + end of turn
    n = len(questions)
    return {
        "prompt_tokens_per_point": float(np.mean(ours)),
        "vlm3_prompt_tokens_per_point": float(np.mean(theirs)),
        "prompt_reduction": float(np.mean(theirs) / np.mean(ours)),
        "answer_tokens_per_point": generated_tokens / n,
        "vlm3_answer_tokens_per_point": float(vlm3_answer),
        "example_question": questions[0],
        "example_vlm3_question": vlm3_questions[0],
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from ..camera import Intrinsics
    from ..engine import Request
    from ..engine.transformers_backend import TransformersBackend, same_tokens
    from ..pipeline import DepthEstimator, query_grid

    torch.manual_seed(0)
    model = args.model or str(_bench_model(args.preset))
    # No prefix cache: every N must encode and prefill the image itself, as in the reference.
    backend = TransformersBackend(model, device=args.device, dtype=args.dtype, max_batch=args.max_batch, prefix_cache=0)
    device = backend.device
    if args.image:
        import cv2

        bgr = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"error: cannot read image {args.image}")
            return 2
        frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        frame = bench_frame()
    height, width = frame.shape[:2]
    camera = Intrinsics.from_focal(width, height, args.focal)
    estimator = DepthEstimator(backend)
    spec = estimator.spec
    prepared = estimator.prepare(frame, camera)
    encoded = backend.encode(Request(images=[prepared.image], questions=["x"], spec=spec))
    image_tokens = int(sum(int(g.prod()) for g in encoded.image_grid_thw)) // backend.processor.image_processor.merge_size**2
    info = {
        "device": str(device),
        "dtype": str(backend.model.dtype).replace("torch.", ""),
        "model": model,
        "parameters_m": round(sum(p.numel() for p in backend.model.parameters()) / 1e6, 2),
        "frame": f"{width}x{height} f={args.focal:g} -> {prepared.width}x{prepared.height} f={prepared.intrinsics.fx:g}",
        "image_tokens": image_tokens,
        "max_new_tokens": args.max_new_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    print("  ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    server = sequential = None
    if args.server:
        from .bench_server import print_server_row, server_row

        server = server_backend(args)
        if server.spec(spec.name) != spec:
            print(f"error: the server at {args.server} serves other {spec.name} specs than {model}; serve that model")
            return 2
        sequential = server_backend(args, concurrency=1)
        warm = estimator.prepare(bench_frame(seed=99), camera)
        server.answer(Request(images=[warm.image], questions=estimator.questions(warm, query_grid(width, height, 4))[0],
                              spec=spec, max_new_tokens=args.max_new_tokens))

    results = []
    for n in args.points:
        if server is not None and not args.image:  # a frame the server has not seen (see the docstring)
            prepared = estimator.prepare(bench_frame(seed=n), camera)
        uv = query_grid(width, height, n)[:n]
        if len(uv) < n:  # the grid rounds its shape; top up deterministically
            extra = np.random.default_rng(n).uniform([0, 0], [width - 1, height - 1], size=(n - len(uv), 2)).round()
            uv = np.vstack([uv, extra])
        questions = estimator.questions(prepared, uv)[0]
        request = Request(images=[prepared.image], questions=questions, spec=spec, max_new_tokens=args.max_new_tokens)
        _warm_up(backend, estimator, camera, uv, spec, args, reference=not (args.skip_reference_above and n > args.skip_reference_above))
        row: dict = {"points": n}
        # The engine's frame time is the median of --engine-repeats frames answered back to back (as a
        # node answers a camera's frames), not one call's, whose timing varies by several ms here.
        runs = []
        with PeakMemory(device) as mem:
            for _ in range(args.engine_repeats):
                t0 = time.perf_counter()
                answer = backend.answer(request)
                runs.append((time.perf_counter() - t0, answer))
        engine_s, engine = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        row.update(engine_points_per_s=n / engine_s, engine_latency_s=engine_s, engine_peak_mb=mem.peak_mb,
                   engine_runs_s=[r[0] for r in runs])
        t = engine.timings
        row["engine_timings_s"] = {k: t[k] for k in ("preprocess", "vision", "prefix_prefill", "suffix_prefill", "decode")}
        row["generated_tokens"] = int(sum(engine.generated_tokens))
        if args.skip_reference_above and n > args.skip_reference_above:
            row.update(reference_points_per_s=None, ratio=None, identical_answers=None)
        else:
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                reference = backend.answer_reference(request)
                reference_s = time.perf_counter() - t0
            row.update(
                reference_points_per_s=n / reference_s,
                reference_latency_s=reference_s,
                reference_peak_mb=mem.peak_mb,
                ratio=reference_s / engine_s,
                identical_answers=same_tokens(engine, reference),
            )
            # Sharing the image alone (encoding and prefill once instead of N times) can reach at most
            # this ratio: the per-question prefill and decoding remain, and only batching speeds those up.
            image_s = t["vision"] + t["prefix_prefill"] + t["preprocess"]
            per_point = reference_s / n
            row["image_sharing_bound"] = reference_s / (image_s + n * max(per_point - image_s, 0.0))
        row["tokens"] = token_costs(backend, estimator, prepared, uv, row["generated_tokens"])
        if server is not None:
            other = estimator.prepare(bench_frame(seed=10_000 + n), camera)
            skip = bool(args.skip_reference_above and n > args.skip_reference_above)
            row.update(server_row(server, sequential, request, engine.answers, None if skip else Request(
                images=[other.image], questions=estimator.questions(other, uv)[0], spec=spec,
                max_new_tokens=args.max_new_tokens)))
        results.append(row)
        _print_row(row)
        if server is not None:
            print_server_row(row)

    fleet_rows = []
    if server is not None and args.robots > 0:
        from .bench_server import fleet

        frames = [bench_frame(seed=20_000 + k) for k in range(8)] if not args.image else [frame]
        fleet_rows = fleet(args.server, backend, frames, camera, robots=args.robots, points=args.fleet_points,
                           seconds=args.fleet_seconds, max_new_tokens=args.max_new_tokens, rounds=args.fleet_rounds)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"info": info, "results": results, **({"fleet": fleet_rows} if fleet_rows else {})}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    identical = all(r["identical_answers"] in (True, None) and r.get("server_identical_to_engine", True) for r in results)
    return 0 if identical else 1


def _warm_up(backend, estimator, camera, uv, spec, args, reference: bool) -> None:
    """One untimed pass of both ways on another frame with the same points, so that neither timed
    run pays one-time costs of new shapes (allocations, kernel set-up): the engine's timed frame is
    its first at this N otherwise, while the reference spreads its first call's over N calls."""
    from ..engine import Request

    other = estimator.prepare(bench_frame(seed=30_000 + len(uv)), camera)
    questions = estimator.questions(other, uv)[0]
    backend.answer(Request(images=[other.image], questions=questions, spec=spec, max_new_tokens=args.max_new_tokens))
    if reference:
        backend.answer_reference(Request(images=[other.image], questions=questions[:1], spec=spec,
                                         max_new_tokens=args.max_new_tokens))


def _print_row(row: dict) -> None:
    t = row["engine_timings_s"]
    ref = row.get("reference_points_per_s")
    parts = [
        f"N={row['points']:4d}",
        f"reference {ref:8.2f} pts/s" if ref else "reference skipped",
        f"engine {row['engine_points_per_s']:8.2f} pts/s",
        f"ratio {row['ratio']:6.2f}x" if row.get("ratio") else "",
        f"latency ref {row['reference_latency_s']:.2f}s / engine {row['engine_latency_s']:.2f}s" if ref else
        f"latency engine {row['engine_latency_s']:.2f}s",
        f"peak MB ref {row['reference_peak_mb']:.0f} / engine {row['engine_peak_mb']:.0f}" if ref else
        f"peak MB engine {row['engine_peak_mb']:.0f}",
        f"identical={row['identical_answers']}",
    ]
    print("  ".join(p for p in parts if p))
    print(
        "        engine frame time: "
        f"preprocess {t['preprocess']:.3f}s, vision {t['vision']:.3f}s, shared prefill {t['prefix_prefill']:.3f}s, "
        f"per-question prefill {t['suffix_prefill']:.3f}s, decode {t['decode']:.3f}s "
        f"({row['generated_tokens']} tokens)"
        + (f"; image-sharing bound {row['image_sharing_bound']:.2f}x" if row.get("image_sharing_bound") else ""),
        flush=True,
    )
    k = row["tokens"]
    print(
        f"        tokens per point: prompt {k['prompt_tokens_per_point']:.1f} (VLM3 depth prompt "
        f"{k['vlm3_prompt_tokens_per_point']:.1f}, {k['prompt_reduction']:.1f}x fewer), answer "
        f"{k['answer_tokens_per_point']:.1f} (VLM3/DepthLM answer {k['vlm3_answer_tokens_per_point']:.0f}); "
        f"question {k['example_question']!r}",
        flush=True,
    )

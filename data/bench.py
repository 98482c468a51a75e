"""`make bench-data`: how many 1024 px samples per second one loader worker turns out on this CPU.

The shards hold the demo's colour photographs upscaled (bicubic) to LAION-POP's mean size, 1274 x 1457 px,
with mild noise added back (upscaling alone leaves them smoother, hence faster to decode, than real photos),
saved as JPEG quality 90. The timed path is the real one: tar reading, shuffle, JPEG decode, resize of the
shorter side to 1024, random 1024 x 1024 crop, uint8 -> float32 [-1, 1] tensor, batching, and the
worker-to-trainer hand-over.
"""

from __future__ import annotations

import datetime
import io
import itertools
import math
import os
import platform
import time
from typing import Any

import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image

from data.config import DataConfig
from data.demo import DEMO_IMAGES
from data.stream import build_loader

# LAION-POP's mean image (KOALA paper), width x height in px.
LAION_POP_MEAN_SIZE = (1274, 1457)
JPEG_QUALITY = 90
NOISE_STD = 3.0  # uint8 levels of gaussian noise added after upscaling
# Throughput a training GPU consumes (the figure docs/PERFORMANCE.md sizes workers for), images/s.
GPU_IMAGES_PER_S = 30.0


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_bench_shards(out: str, num_samples: int = 48, samples_per_shard: int = 12, seed: int = 0) -> list[str]:
    """Write LAION-POP-sized JPEG samples made from the demo photos; return the shard paths."""
    import skimage.data  # optional dependency (pip install .[data])

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [
        Image.open(os.path.join(skimage.data.data_dir, d.filename))
        .convert("RGB")
        .resize(LAION_POP_MEAN_SIZE, Image.Resampling.BICUBIC)
        for d in DEMO_IMAGES
    ]
    paths = []
    for shard in range(math.ceil(num_samples / samples_per_shard)):
        path = os.path.join(out, f"{shard:06d}.tar")
        with wds.TarWriter(path, mtime=0) as writer:
            for i in range(samples_per_shard):
                n = shard * samples_per_shard + i
                if n >= num_samples:
                    break
                photo = photos[n % len(photos)]
                pixels = np.asarray(photo, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (*photo.size[::-1], 3))
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    buffer, format="JPEG", quality=JPEG_QUALITY
                )
                caption = DEMO_IMAGES[n % len(DEMO_IMAGES)].caption
                writer.write({"__key__": f"bench{n:06d}", "jpg": buffer.getvalue(), "txt": caption.encode()})
        paths.append(path)
    return paths


def time_loader(cfg: DataConfig, batch_size: int, batches: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) over `batches` batches.

    One warm-up batch first, so worker start-up is excluded. The CPU-second figure counts only this process
    (so it is meaningful for num_workers=0, where the whole pipeline runs here) and is hardly affected by other
    programs competing for the cores.
    """
    iterator = iter(build_loader(cfg, batch_size=batch_size, rank=0, world_size=1, seed=0))
    next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in itertools.islice(iterator, batches):
        pass
    samples = batches * batch_size
    return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)


def run_bench(
    shards: str, resolution: int = 1024, batch_size: int = 4, batches: int = 12, workers: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    """Throughput of the raw stream in-process and with `workers` worker processes, as a JSON-able dict.

    samples_per_cpu_s: one worker's throughput when it has a core to itself (the in-process pipeline per CPU
    second, torch limited to one thread as in a worker); workers_for_gpu_at_30_img_s divides 30 img/s by it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside a DataLoader worker
    try:
        cfg = DataConfig(shards=shards, resolution=resolution, num_workers=0, shuffle_buffer=16, random_crop=True)
        in_process_wall, per_cpu_s = time_loader(cfg, batch_size, batches)
    finally:
        torch.set_num_threads(threads)
    by_workers = {}
    for num_workers in workers:
        cfg = DataConfig(
            shards=shards, resolution=resolution, num_workers=num_workers, shuffle_buffer=16, random_crop=True
        )
        by_workers[str(num_workers)] = round(time_loader(cfg, batch_size, batches)[0], 2)
    return {
        "bench": "data",
        "samples_per_cpu_s": round(per_cpu_s, 2),
        "samples_per_s_in_process": round(in_process_wall, 2),
        "samples_per_s_by_workers": by_workers,
        "workers_for_gpu_at_30_img_s": math.ceil(GPU_IMAGES_PER_S / per_cpu_s),
        "resolution": resolution,
        "image_size_wh": list(LAION_POP_MEAN_SIZE),
        "jpeg_quality": JPEG_QUALITY,
        "batch_size": batch_size,
        "samples_timed": batches * batch_size,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": datetime.date.today().isoformat(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "webdataset": wds.__version__,
            "numpy": np.__version__,
        },
    }

"""Speed of the video layer around the model: decode a 640x360 clip's first second, resize each frame x4 (PIL
bicubic, standing in for the model), encode to 2560x1440 with each x264 preset.

    python benchmarks/bench_video_codec.py [--clip PATH] [--seconds 1] [--presets medium,faster,...] [--threads 4]

Reports frames/s for decode, resize, RGB->YUV + encode, and decode+encode (resize excluded: the model replaces it),
and the CPU seconds per frame (all threads): on a shared machine wall-clock rates drop with the load, while CPU time
per frame does not; 2 / cpu_s_per_frame is what two otherwise idle cores would reach at best.
The product bar is >= 10 frames/s decode+encode for 640x360 -> 2560x1440 on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from media.video import (
    PRESETS,
    SegmentEncoder,
    VideoEncoding,
    decode_segment,
    extract_segment,
    index_video,
    plan_segments,
)
from media.video.colour import SWS_FLAGS
from media.video.encode import quantized

SHARED_CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "Mustache_640x360.mp4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=str(SHARED_CLIP))
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--presets", default="medium,fast,faster,veryfast,superfast,ultrafast")
    parser.add_argument("--threads", type=int, default=VideoEncoding().threads)
    parser.add_argument("--crf", type=int, default=18)
    args = parser.parse_args()

    index = index_video(args.clip, args.clip)
    frames = min(index.frames, max(1, round(args.seconds * float(index.average_rate or 25))))
    whole = plan_segments(index, index.frames)[0]
    segment = dataclasses.replace(whole, stop=frames, last_pts=index.pts[frames - 1])  # frames [0, frames)
    started, cpu = time.perf_counter(), time.process_time()
    data = extract_segment(args.clip, segment, args.clip)
    decoded = list(decode_segment(data, segment, args.clip))
    decode_s, decode_cpu = time.perf_counter() - started, time.process_time() - cpu

    started = time.perf_counter()
    upscaled = []
    for pixels in decoded:
        image = Image.fromarray(pixels)
        large = image.resize((image.width * 4, image.height * 4), Image.Resampling.BICUBIC)
        upscaled.append(np.asarray(large, dtype=np.float32) / 255.0)
    resize_s = time.perf_counter() - started
    height, width = upscaled[0].shape[:2]

    # The encoder's own per-frame work before x264: float -> uint8, and RGB -> YUV 4:2:0 (swscale, one thread).
    started, cpu = time.perf_counter(), time.process_time()
    for frame in upscaled:
        rgb = av.VideoFrame.from_ndarray(quantized(frame, np.uint8), format="rgb24")
        rgb.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG,
                     interpolation=SWS_FLAGS, threads=1)
    convert_s, convert_cpu = time.perf_counter() - started, time.process_time() - cpu

    results = {"clip": Path(args.clip).name, "frames": len(decoded), "output": f"{width}x{height}",
               "threads": args.threads, "decode_fps": round(len(decoded) / decode_s, 1),
               "decode_cpu_s_per_frame": round(decode_cpu / len(decoded), 4),
               "resize_fps": round(len(decoded) / resize_s, 1),
               "rgb_to_yuv_fps": round(len(decoded) / convert_s, 1),
               "rgb_to_yuv_cpu_s_per_frame": round(convert_cpu / len(decoded), 4), "presets": {}}
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r}")
        encoder = SegmentEncoder(index, VideoEncoding(crf=args.crf, preset=preset, threads=args.threads), width,
                                 height)
        started, cpu = time.perf_counter(), time.process_time()
        for offset, frame in enumerate(upscaled):
            encoder.add(frame, index.pts[segment.start + offset])
        size = len(encoder.finish())
        encode_s, encode_cpu = time.perf_counter() - started, time.process_time() - cpu
        cpu_per_frame = (decode_cpu + encode_cpu) / len(decoded)
        results["presets"][preset] = {
            "encode_fps": round(len(decoded) / encode_s, 2),
            "decode_plus_encode_fps": round(len(decoded) / (decode_s + encode_s), 2),
            "cpu_s_per_frame": round(cpu_per_frame, 4),
            "two_idle_cores_fps_at_best": round(2 / cpu_per_frame, 1),
            "bytes": size,
        }
        print(preset, results["presets"][preset], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""``casa-stream VIDEO --model HF_DIR``: live captions of a video with an exported CASA model.

Prints ``[mm:ss.s] caption`` per frame and writes ``stream.json`` (per-frame time-to-first-token,
decode tokens/s, cache bytes, memory, captions), ``stream.png`` and the captions as subtitles
(``captions.srt``, ``captions.vtt``) into ``--out``. A video that
cannot be decoded stops with an error naming it; a stream that breaks mid-way (decoding error,
Ctrl-C) keeps and writes the captions so far, marked ``"stopped": <reason>``. ``--realtime``
delivers the frames at the video's own pace, as a live camera (``pacing.py``): each caption's lag
behind its frame and the frames dropped say whether the model keeps up on this machine.

A live source (an RTSP / RTMP / UDP / SRT URL, ``-`` for standard input, a camera such as
``/dev/video0 --input-format v4l2``, or any source with ``--live``) is captioned as it arrives:
read on a thread of its own, the captioner taking the newest frame, with the same lag and drop
report; it runs until the source ends, ``--max-frames``, or Ctrl-C (then exit 0, the captions
written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from casa_megatron.inference.frames import StreamBroken, VideoDecodeError, is_live, iter_frames
from casa_megatron.inference.model_folder import NotAnHFFolder, load_model, resolve_adapter
from casa_megatron.inference.pacing import PacingStats, live, realtime
from casa_megatron.inference.report import plot_series
from casa_megatron.inference.streaming import ContextTooSmall, FrameRecord, LiveCaptioner
from casa_megatron.inference.subtitles import cues, srt, vtt
from casa_megatron.runtime.atomic import atomic_write_json, atomic_write_text


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="casa-stream", description=__doc__.splitlines()[0])
    p.add_argument("video", help="video file or http(s) URL (anything FFmpeg decodes), or a live source: an "
                   "rtsp:// rtmp:// udp:// srt:// URL, - (standard input), pipe:N, a device (/dev/video0)")
    p.add_argument("--live", action="store_true", help="caption the source as it arrives (implied for the live "
                   "sources above): read on its own thread, the newest frame captioned, late ones dropped")
    p.add_argument("--input-format", default=None, help="FFmpeg input format or device kind (v4l2, avfoundation, "
                   "dshow, mpegts, ...); default: guessed from the source")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a URL may take to open or to send more "
                   "data before the stream counts as broken (default 10)")
    p.add_argument("--model", required=True, help="exported Hugging Face folder (casa-convert export-hf)")
    p.add_argument("--out", default="stream_out", help="folder for stream.json, stream.png and the subtitles "
                   "captions.srt / captions.vtt")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-context-tokens", type=int, default=None, help="bound the self-attention cache (text; "
                   "an insertion export's image tokens too) of a stream that never ends: a frame whose turn could pass "
                   "it starts the stream afresh (default: no bound)")
    p.add_argument("--prompt", default="", help="before the first frame: the user turn (chat template) or the "
                   "text after <bos> (layout tokens)")
    p.add_argument("--max-pixels", type=int, default=None, help="frame pixel budget (processor default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--adapter", default="auto", help="LoRA adapter merged into the model: auto (the folder's "
                   "lora_adapter/ from export-hf --lora separate, when there is one), none, or a PEFT adapter folder")
    p.add_argument("--realtime", action="store_true", help="deliver frames at the video's own pace, as a live "
                   "camera: the captioner takes the newest arrived frame, older ones are dropped; reports each "
                   "caption's lag behind its frame and the frames dropped")
    p.add_argument("--decoder", default="auto", choices=("auto", "cpu", "dali"),
                   help="auto: DALI on a GPU when it is installed, else PyAV on the CPU")
    return p.parse_args(argv)


def _decoder(kind: str, device: str, live: bool = False) -> str:
    if kind != "auto":
        return kind
    if live:  # DALI decodes whole files
        return "cpu"
    from casa_megatron.data.video.dali import dali_available

    return "dali" if device.startswith("cuda") and dali_available() else "cpu"


def stamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def run(args: argparse.Namespace) -> dict:
    adapter = resolve_adapter(args.model, args.adapter)
    model, processor = load_model(args.model, args.device, args.dtype, str(adapter) if adapter else "none")
    captioner = LiveCaptioner(model, processor, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
                              max_pixels=args.max_pixels, max_context_tokens=args.max_context_tokens)
    records: List[FrameRecord] = []
    stopped = None
    start = time.perf_counter()
    live_source = args.live or is_live(args.video)
    frames = iter_frames(args.video, args.fps, args.max_frames, _decoder(args.decoder, args.device, live_source),
                         live=live_source, input_format=args.input_format, timeout_s=args.timeout)
    pacing, lags = None, []
    if live_source:
        pacing = PacingStats()
        frames = live(frames, pacing)
    elif args.realtime:
        pacing = PacingStats()
        frames = realtime(frames, pacing)
    try:
        for record in captioner.stream(frames):
            records.append(record)
            if pacing is not None:  # the caption is done now: its lag behind its frame's arrival
                lags.append(time.perf_counter() - pacing.arrived[record.time_s])
            print(f"[{stamp(record.time_s)}] {record.caption}", flush=True)
    except StreamBroken as e:
        stopped = str(e)
    except KeyboardInterrupt:
        stopped = "interrupted"
    result = {"video": str(args.video), "live": live_source, "model": str(args.model),
              "adapter": adapter and str(adapter), "fps": args.fps, "device": args.device,
              "dtype": args.dtype, "max_context_tokens": args.max_context_tokens,
              "restarts": sum(r.restarted for r in records), "frames": [r.to_json() for r in records],
              "stopped": stopped, "wall_s": time.perf_counter() - start}
    if pacing is not None:
        for frame, lag in zip(result["frames"], lags):
            frame["lag_s"] = lag
        interval = 1 / args.fps
        result["realtime"] = {"dropped": len(pacing.dropped), "dropped_times_s": pacing.dropped,
                              "captioned": len(records), "max_lag_s": max(lags, default=None),
                              "keeps_up": not pacing.dropped and all(lag <= interval for lag in lags)}
        print(f"realtime at {args.fps} fps: {len(records)} frames captioned, {len(pacing.dropped)} dropped, lag "
              f"max {max(lags, default=0):.2f} s (a frame every {interval:.2f} s): "
              f"{'keeps up' if result['realtime']['keeps_up'] else 'falls behind'}", flush=True)
    out = Path(args.out)
    atomic_write_json(out / "stream.json", result)
    captions = cues([r.time_s for r in records], [r.caption for r in records], 1 / args.fps)
    atomic_write_text(out / "captions.srt", srt(captions))  # to watch the video with its captions
    atomic_write_text(out / "captions.vtt", vtt(captions))
    if records:
        plot_series(out / "stream.png", {"casa-stream": result["frames"]}, f"{Path(args.video).name} @ {args.fps} fps")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (VideoDecodeError, NotAnHFFolder, ContextTooSmall) as e:
        print(f"casa-stream: {e}", file=sys.stderr)
        return 2
    if result["stopped"] == "interrupted" and result["live"]:  # how a live stream is ended
        print(f"casa-stream: stopped; {len(result['frames'])} frames captioned, written to {args.out}", file=sys.stderr)
        return 0
    if result["stopped"]:
        print(f"casa-stream: stream stopped early ({result['stopped']}); "
              f"{len(result['frames'])} frames captioned, written to {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

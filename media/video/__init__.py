"""Videos: index a clip from its packets, cut it into segments of frames that are units of work of their own, decode
one segment, encode its upscaled frames into a staged segment file, and join the staged segments with the source's
audio and subtitle packets into the output. Only encoded bytes travel between these stages. The decisions behind
each step (timestamps, colour, interlacing, containers, determinism) are in README.md beside this file.

    index_video(source, name)                   -> VideoIndex   plan time: demux only, plus one decoded frame
    plan_segments(index, segment_frames)        -> [Segment]    frame ranges [start, stop)
    field_rate_index(index)                     -> VideoIndex   the output timeline of field-rate deinterlacing
    extract_segment(source, segment, name)      -> bytes        the packets that decode them, with codec parameters
    decode_segment(data, segment, name)         -> frames       exactly frames [start, stop): HxWx3 uint8/uint16 RGB
    SegmentEncoder(index, encoding, w, h)       .add(float RGB frame, source pts) ... .finish() -> bytes
    assemble(source, staged, out, index, name)  -> stats        remux, no re-encode, + audio/subtitle packets copied
    output_container(source_key, index, codec)  -> ".mp4" | ".mov" | ".mkv"
"""

from .assemble import assemble, output_container
from .decode import decode_segment
from .encode import CODECS, ENCODERS, PRESETS, SegmentEncoder, VideoEncoding
from .index import VideoIndex, field_rate_index, index_video
from .segments import DEINTERLACE_MODES, DEINTERLACE_RATES, Segment, deinterlaces, extract_segment, plan_segments
from .source import Source

__all__ = [
    "CODECS",
    "DEINTERLACE_MODES",
    "DEINTERLACE_RATES",
    "ENCODERS",
    "PRESETS",
    "Segment",
    "SegmentEncoder",
    "Source",
    "VideoEncoding",
    "VideoIndex",
    "assemble",
    "decode_segment",
    "deinterlaces",
    "extract_segment",
    "field_rate_index",
    "index_video",
    "output_container",
    "plan_segments",
]

"""The staging format a segment's source packets travel in, from the reader to the actor: the decoder's parameters
plus the packets, as they came out of the demuxer. Unlike a container, it takes every codec FFmpeg decodes (ProRes,
DNxHR, QuickTime Animation, HAP, ...) and every timestamp (negative ones from MP4 edit lists, 33-bit MPEG-TS clocks):
nothing is remuxed, so nothing can be refused.

    pack(parameters, packets) -> bytes        unpack(bytes) -> (parameters, [StagedPacket])
    parameters.decoder(threads)               a decoder configured as the demuxer configured the source's

Layout: magic, a JSON header (sorted keys), then per packet: pts, dts (int64; INT64_MIN for none), flags (u8), size
(u32), payload. The same packets and parameters give the same bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import struct
from collections.abc import Iterable
from fractions import Fraction

import av

MAGIC = b"DIT4SR-PACKETS-1\n"
_NONE = -(1 << 63)
_KEY, _DISCARD = 1, 2
_RECORD = struct.Struct("<qqBI")


@dataclasses.dataclass(frozen=True)
class CodecParameters:
    """What a decoder needs beyond the packets (the demuxer's AVCodecParameters that matter for decoding)."""

    codec: str
    extradata: bytes
    width: int
    height: int
    pix_fmt: str | None
    bits_per_coded_sample: int  # QuickTime Animation and other raw-ish codecs need it
    codec_tag: str
    time_base: Fraction
    # Where the bitstream does not say it (decoded-once FFV1, `mezzanine`): FFmpeg's name (left, center, topleft, ...);
    # swscale reads it when converting to RGB.
    chroma_location: str | None = None

    @classmethod
    def of(cls, stream) -> CodecParameters:
        context = stream.codec_context
        return cls(codec=context.codec.name, extradata=bytes(context.extradata or b""), width=context.width,
                   height=context.height, pix_fmt=context.pix_fmt, bits_per_coded_sample=context.bits_per_coded_sample,
                   codec_tag=context.codec_tag or "", time_base=Fraction(stream.time_base))

    def decoder(self, threads: int, options: dict[str, str] | None = None):
        context = av.CodecContext.create(self.codec, "r")
        if self.extradata:
            context.extradata = self.extradata
        context.width, context.height = self.width, self.height
        if self.pix_fmt:
            context.pix_fmt = self.pix_fmt
        context.bits_per_coded_sample = self.bits_per_coded_sample
        if self.codec_tag.isprintable() and len(self.codec_tag) == 4:
            context.codec_tag = self.codec_tag
        context.thread_type = "AUTO"  # decoded pixels do not depend on threading
        context.thread_count = threads
        context.options = dict(options or {}) | (
            {"chroma_sample_location": self.chroma_location} if self.chroma_location else {})
        return context

    def _header(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["extradata"] = base64.b64encode(self.extradata).decode()
        fields["time_base"] = [self.time_base.numerator, self.time_base.denominator]
        return fields

    @classmethod
    def _from_header(cls, fields: dict) -> CodecParameters:
        return cls(**fields | {"extradata": base64.b64decode(fields["extradata"]),
                               "time_base": Fraction(*fields["time_base"])})


@dataclasses.dataclass(frozen=True)
class StagedPacket:
    pts: int | None
    dts: int | None
    key: bool
    discard: bool
    data: bytes

    def to_packet(self, time_base: Fraction) -> av.Packet:
        # A packet of its own size gets FFmpeg's zeroed input padding (decoders read past the end); one made from the
        # bytes would reference them unpadded, and decoders then read whatever follows in memory.
        packet = av.Packet(len(self.data))
        packet.update(self.data)
        packet.pts, packet.dts, packet.time_base = self.pts, self.dts, time_base
        packet.is_keyframe = self.key  # discarded packets (MP4 edit lists) decode into frames outside the range
        return packet


def pack(parameters: CodecParameters, packets: Iterable[av.Packet]) -> bytes:
    out = io.BytesIO()
    header = json.dumps(parameters._header(), sort_keys=True).encode()
    out.write(MAGIC + struct.pack("<I", len(header)) + header)
    for packet in packets:
        payload = bytes(packet)
        flags = _KEY * packet.is_keyframe | _DISCARD * packet.is_discard
        out.write(_RECORD.pack(_or_none(packet.pts), _or_none(packet.dts), flags, len(payload)))
        out.write(payload)
    return out.getvalue()


def unpack(data: bytes) -> tuple[CodecParameters, list[StagedPacket]]:
    if not data.startswith(MAGIC):
        raise ValueError("not a staged packet file")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    position = len(MAGIC) + 4
    parameters = CodecParameters._from_header(json.loads(data[position : position + length]))
    position += length
    packets = []
    while position < len(data):
        pts, dts, flags, size = _RECORD.unpack_from(data, position)
        position += _RECORD.size
        payload = data[position : position + size]
        if len(payload) != size:
            raise ValueError("staged packet file is cut short")
        position += size
        packets.append(StagedPacket(None if pts == _NONE else pts, None if dts == _NONE else dts,
                                    bool(flags & _KEY), bool(flags & _DISCARD), payload))
    return parameters, packets


def _or_none(timestamp: int | None) -> int:
    return _NONE if timestamp is None else timestamp

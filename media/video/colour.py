"""Colour as players see it: which YUV matrix and range a clip is converted to RGB with, which tags an output
carries (always all four, explicitly), and the HDR metadata kept on HDR outputs. Numbers are FFmpeg's AVCOL_*."""

from __future__ import annotations

import dataclasses
import struct
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation

SWS_FLAGS = (
    Interpolation.BICUBIC
    | Interpolation.ACCURATE_RND
    | Interpolation.BITEXACT
    | Interpolation.FULL_CHR_H_INT
    | Interpolation.FULL_CHR_H_INP
)
UNSPECIFIED = 2  # AVCOL_PRI/TRC/SPC_UNSPECIFIED
LIMITED_RANGE, FULL_RANGE = 1, 2  # AVCOL_RANGE_MPEG, AVCOL_RANGE_JPEG
RGB, BT709, BT470BG, SMPTE170M, BT2020_NCL = 0, 1, 5, 6, 9
PQ, HLG = 16, 18  # AVCOL_TRC_SMPTE2084, AVCOL_TRC_ARIB_STD_B67
# AVCOL_SPC_* -> swscale's matrix constant
SWS_MATRICES = {
    1: Colorspace.ITU709,
    4: Colorspace.FCC,
    5: Colorspace.ITU601,
    6: Colorspace.ITU601,
    7: Colorspace.SMPTE240M,
    9: Colorspace.BT2020,
    10: Colorspace.BT2020,
}
_SD_MATRICES = {BT470BG, SMPTE170M}
HD_LINES = 720  # from here up players assume BT.709 for untagged video, below BT.601


@dataclasses.dataclass(frozen=True)
class ColourTags:
    """A complete, explicit description: what a player needs to show the pixels as intended."""

    primaries: int
    transfer: int
    matrix: int  # 0: RGB (no matrix)
    full_range: bool

    @property
    def hdr(self) -> bool:
        return self.transfer in (PQ, HLG)


def tag(value: int | None) -> int | None:
    """A stored tag, or None where FFmpeg reads 'unspecified' (primaries/transfer 0 is reserved)."""
    return None if value in (None, 0, UNSPECIFIED) else int(value)


def assumed_matrix(height: int) -> int:
    return BT709 if height >= HD_LINES else SMPTE170M


def source_colour(height: int, primaries: int | None, transfer: int | None, matrix: int | None,
                  color_range: int | None) -> ColourTags:
    """The source as a player reads it: its tags, and for each missing one FFmpeg's and the players' guess (BT.601
    below 720 lines, with PAL primaries at 576 lines and NTSC's otherwise; BT.709 from 720 up; limited range)."""
    if primaries is None:
        primaries = BT709 if height >= HD_LINES else BT470BG if height in (576, 288) else SMPTE170M
    return ColourTags(
        primaries=primaries,
        transfer=transfer if transfer is not None else BT709,  # BT.601 and BT.709 share the SDR camera curve
        matrix=matrix if matrix in SWS_MATRICES or matrix == RGB else assumed_matrix(height),
        full_range=color_range == FULL_RANGE,
    )


def output_colour(source: ColourTags, output_height: int) -> ColourTags:
    """SD matrices become BT.709 at HD output sizes (players ignoring tags assume BT.709 there), RGB sources get the
    matrix players assume for the output size; primaries, transfer and range are kept (no gamut or HDR conversion:
    HDR stays HDR with its own tags)."""
    matrix = source.matrix
    if matrix == RGB or (matrix in _SD_MATRICES and output_height >= HD_LINES):
        matrix = assumed_matrix(output_height)
    return dataclasses.replace(source, matrix=matrix)


def to_rgb(frame: av.VideoFrame, colour: ColourTags) -> np.ndarray:
    """HxWx3 RGB (uint8, or uint16 above 8 bits), with the clip's matrix and range, not the frame's tags: packets
    travel without container tags, and codecs without a VUI (FFV1, ProRes) have them only in the container."""
    deep = frame.format.components[0].bits > 8
    target = "rgb48le" if deep else "rgb24"
    if frame.format.is_rgb or colour.matrix == RGB:
        return frame.reformat(format=target, interpolation=SWS_FLAGS, threads=1).to_ndarray()
    rgb = frame.reformat(
        format=target,
        src_colorspace=SWS_MATRICES[colour.matrix],
        src_color_range=ColorRange.JPEG if colour.full_range else ColorRange.MPEG,
        dst_color_range=ColorRange.JPEG,
        interpolation=SWS_FLAGS,
        threads=1,
    )
    return rgb.to_ndarray()


def from_rgb(pixels: np.ndarray, pix_fmt: str, colour: ColourTags) -> av.VideoFrame:
    rgb = av.VideoFrame.from_ndarray(pixels, format="rgb48le" if pixels.dtype == np.uint16 else "rgb24")
    if av.VideoFormat(pix_fmt).is_rgb:
        return rgb.reformat(format=pix_fmt, interpolation=SWS_FLAGS, threads=1)
    return rgb.reformat(format=pix_fmt, dst_colorspace=SWS_MATRICES[colour.matrix],
                        dst_color_range=ColorRange.JPEG if colour.full_range else ColorRange.MPEG,
                        interpolation=SWS_FLAGS, threads=1)


def describe(context, colour: ColourTags, sample_aspect_ratio: Fraction | None) -> None:
    """Tags and pixel aspect into an encoder (H.264/H.265 VUI) or an output stream (containers carry them for
    codecs without a VUI)."""
    if sample_aspect_ratio:
        context.sample_aspect_ratio = sample_aspect_ratio
    context.colorspace = colour.matrix if colour.matrix != RGB else UNSPECIFIED
    context.color_range = FULL_RANGE if colour.full_range else LIMITED_RANGE
    context.color_primaries = colour.primaries
    context.color_trc = colour.transfer


# --- HDR metadata: mastering display (SMPTE ST 2086) and content light level, in x265's notation ----------------


def hdr_metadata(frame: av.VideoFrame) -> tuple[str | None, str | None]:
    """(master-display, max-cll) as x265 takes them, from a decoded frame's side data; None where absent."""
    mastering = light = None
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.MASTERING_DISPLAY_METADATA:
            mastering = _mastering_display(bytes(side_data))
        elif side_data.type == av.sidedata.sidedata.Type.CONTENT_LIGHT_LEVEL:
            max_cll, max_fall = struct.unpack("<2I", bytes(side_data)[:8])
            light = f"{max_cll},{max_fall}"
    return mastering, light


def _mastering_display(data: bytes) -> str | None:
    # AVMasteringDisplayMetadata: display_primaries[3][2] (R, G, B), white_point[2], min/max luminance (AVRationals),
    # has_primaries, has_luminance.
    values = struct.unpack("<22i", data[:88])
    ratios = [Fraction(values[i], values[i + 1]) if values[i + 1] else Fraction(0) for i in range(0, 20, 2)]
    has_primaries, has_luminance = values[20], values[21]
    if not (has_primaries and has_luminance):
        return None
    (rx, ry, gx, gy, bx, by, wx, wy), (low, high) = ratios[:8], ratios[8:10]

    def xy(x: Fraction, y: Fraction) -> str:
        return f"({round(x * 50000)},{round(y * 50000)})"

    return f"G{xy(gx, gy)}B{xy(bx, by)}R{xy(rx, ry)}WP{xy(wx, wy)}L({round(high * 10000)},{round(low * 10000)})"

"""Classified media errors: each becomes one input's `failed` manifest row with its `error_type`."""


class MediaError(Exception):
    """An input or output (image or video) that cannot be processed; `error_type` classifies it for manifests."""

    error_type = "media_error"


class EmptyFileError(MediaError):
    error_type = "empty_file"


class TruncatedError(MediaError):
    """A file that ends before its own structure says it should (images and videos alike)."""

    error_type = "truncated"


class TruncatedImageError(TruncatedError):
    pass


class NotAnImageError(MediaError):
    error_type = "not_an_image"


class CorruptImageError(MediaError):
    error_type = "corrupt"


class TooManyPixelsError(MediaError):
    error_type = "too_many_pixels"


class UnsupportedImageError(MediaError):
    error_type = "unsupported"


class TooLargeForFormatError(MediaError):
    error_type = "too_large_for_format"


class EncodeError(MediaError):
    error_type = "encode_failed"


class NotAVideoError(MediaError):
    """A file with a video extension that no demuxer recognises."""

    error_type = "not_a_video"


class NoVideoStreamError(MediaError):
    """A recognised container without a video stream (audio only, cover art only, subtitles only)."""

    error_type = "no_video_stream"


class ZeroFramesError(MediaError):
    error_type = "zero_frames"


class UnsupportedVideoError(MediaError):
    """A well-formed video this pipeline cannot carry faithfully (e.g. frames without timestamps)."""

    error_type = "unsupported"


class UnsupportedCodecError(UnsupportedVideoError):
    """A video stream whose codec this PyAV/FFmpeg build cannot decode."""

    error_type = "unsupported_codec"


class CorruptVideoError(MediaError):
    error_type = "corrupt"


class VideoTooLongError(MediaError):
    error_type = "too_long"


class AssemblyError(MediaError):
    """Staged segments that cannot be joined into the output: missing or repeated frames, or segments encoded
    with different codec parameters."""

    error_type = "assembly_failed"

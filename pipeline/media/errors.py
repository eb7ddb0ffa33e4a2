"""Classified media errors: each becomes one input's `failed` manifest row with its `error_type`."""


class MediaError(Exception):
    """An input or output image that cannot be processed; `error_type` classifies it for manifests."""

    error_type = "media_error"


class EmptyFileError(MediaError):
    error_type = "empty_file"


class TruncatedImageError(MediaError):
    error_type = "truncated"


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

"""What an audio file's header bytes say, without decoding it: the producer's cheap check.

:func:`look` recognises a container by its first bytes and reads what its header states: sample
rate, channels, and the duration when the header gives one — from a sample or frame count
(``estimated`` False), or from a bitrate and the size (``estimated`` True). It refuses what is
clearly not audio (text, HTML, JSON, an image, an archive, an executable, zero bytes) and the
header of a known container that is broken (a WAV without its data chunk, Ogg pages that do not
follow each other, an MP4 without its ``moov`` box, a WebM without an audio track), with an
:class:`~worker.errors.AudioError` that says which.

It never decodes and reads a few kilobytes of any file, however long. What it lets through can
still fail to decode, stop early or turn out longer than its header says: the worker decodes it,
enforces the limit on decoded samples and reports that on the utterance record.

Content decides, never the name: a WAV sent as ``format="mp3"`` is a WAV here, as it is to ffmpeg.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import AudioError

#: no real audio has more: ffmpeg refuses more channels (its FF_SANE_NB_CHANNELS is 512)
MAX_CHANNELS = 512
#: no real audio is sampled faster (768 kHz is the highest rate DACs offer)
MAX_RATE = 768_000
#: how far into a file a stream of MPEG audio or ADTS frames is looked for
_SCAN = 64 * 1024
#: frames walked from the start before a duration is estimated from the bitrate instead of counted
_WALK = 2000


@dataclass(frozen=True)
class Header:
    """What a header says. ``duration_s``: None when it does not say; ``estimated`` when it
    comes from a bitrate and the size rather than a count of samples or frames. ``trusted``:
    the duration is firm enough to refuse the file on (a variable bitrate sampled at a few
    places is not)."""

    format: str
    sample_rate: int | None = None
    channels: int | None = None
    duration_s: float | None = None
    estimated: bool = False
    trusted: bool = True


def look(data: bytes) -> Header:
    """The header of ``data`` (the whole file); :class:`AudioError` when it is clearly not
    audio or its container's header is broken. Unknown binary data passes, duration unknown."""
    if not data:
        raise AudioError("audio is empty: 0 bytes")
    start = _skip_id3(data)
    for magic, at, parse in _CONTAINERS:
        if data.startswith(magic, start + at):
            return parse(data[start:] if start else data)
    for magic, at, what in _NOT_AUDIO:
        if data.startswith(magic, at):
            raise AudioError(f"not audio: the file is {what}")
    found = _frames_at(data, start)
    if found is not None:
        return found
    text = _text_kind(data)
    if text is not None:
        raise AudioError(f"not audio: the file is text ({text})")
    at = data.find(b"\xff", start, start + _SCAN)
    while at >= 0:
        if (found := _frames_at(data, at)) is not None:
            return found
        at = data.find(b"\xff", at + 1, start + _SCAN)
    head = data[:_SCAN]
    if not head.strip(b"\x00"):
        raise AudioError(f"not audio: the file starts with {len(head)} zero bytes")
    if start or _frame(data, 0) is not None:
        raise AudioError("audio is unreadable: no MPEG audio frames follow each other "
                         + ("after its ID3 tag" if start else "from its first frame"))
    return Header("unknown", trusted=False)


# text and other things that are not audio -----------------------------------------------------

_NOT_AUDIO = [
    (b"\x89PNG\r\n\x1a\n", 0, "a PNG image"), (b"\xff\xd8\xff", 0, "a JPEG image"), (b"GIF8", 0, "a GIF image"),
    (b"WEBP", 8, "a WebP image"), (b"II*\x00", 0, "a TIFF image"), (b"MM\x00*", 0, "a TIFF image"),
    (b"%PDF", 0, "a PDF document"), (b"PK\x03\x04", 0, "a ZIP archive"), (b"\x1f\x8b", 0, "gzip data"),
    (b"BZh", 0, "bzip2 data"), (b"\xfd7zXZ\x00", 0, "xz data"), (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive"),
    (b"Rar!", 0, "a RAR archive"), (b"\x7fELF", 0, "an executable (ELF)"), (b"MZ", 0, "an executable (Windows)"),
    (b"\xcf\xfa\xed\xfe", 0, "an executable (Mach-O)"), (b"\xce\xfa\xed\xfe", 0, "an executable (Mach-O)"),
    (b"\xfe\xed\xfa\xcf", 0, "an executable (Mach-O)"), (b"\xfe\xed\xfa\xce", 0, "an executable (Mach-O)"),
    (b"\xca\xfe\xba\xbe", 0, "an executable (Mach-O or Java)"), (b"\x00asm", 0, "WebAssembly"),
    (b"SQLite format 3\x00", 0, "an SQLite database"),
]


def _text_kind(data: bytes) -> str | None:
    """What kind of text ``data`` starts with, or None when it is not text."""
    head = data[:1024]
    boms = {b"\xef\xbb\xbf": "utf-8", b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}
    bom = next((b for b in boms if head.startswith(b)), b"")
    codec = boms.get(bom, "utf-8")
    head = head[len(bom):]
    try:
        chars = head.decode(codec)
    except UnicodeDecodeError as exc:  # a character cut at the 1024th byte is still text
        if exc.start < len(head) - 4:
            return None
        chars = head[: exc.start].decode(codec)
    if not chars.strip() or any(c < " " and c not in "\t\n\r\f" for c in chars):
        return None
    first = chars.lstrip()[:1]
    lower = chars.lstrip()[:64].lower()
    if lower.startswith(("<!doctype html", "<html")):
        return "HTML"
    if first == "<":
        return "XML or HTML"
    if first in "{[":
        return "JSON"
    return "plain text"


# shared pieces --------------------------------------------------------------------------------


def _u16(data: bytes | memoryview, at: int, order: str = "<") -> int:
    return int(struct.unpack_from(order + "H", data, at)[0])


def _u32(data: bytes | memoryview, at: int, order: str = "<") -> int:
    return int(struct.unpack_from(order + "I", data, at)[0])


def _check_layout(kind: str, rate: int, channels: int) -> None:
    if not 0 < channels <= MAX_CHANNELS:
        raise AudioError(f"audio is unreadable: its {kind} header says {channels} channels")
    if not 0 < rate <= MAX_RATE:
        raise AudioError(f"audio is unreadable: its {kind} header says {rate} Hz")


def _skip_id3(data: bytes) -> int:
    """Where the data starts after any ID3v2 tags (0 when there are none)."""
    at = 0
    while data.startswith(b"ID3", at) and len(data) >= at + 10 and all(b < 0x80 for b in data[at + 6:at + 10]):
        size = (data[at + 6] << 21) | (data[at + 7] << 14) | (data[at + 8] << 7) | data[at + 9]
        at += 10 + size + (10 if data[at + 5] & 0x10 else 0)
    return min(at, len(data))


# RIFF/WAVE ------------------------------------------------------------------------------------

#: WAVE format tags whose samples are a fixed number of bytes (PCM, float, A-law, mu-law)
_FIXED_WIDTH = {1, 3, 6, 7}


@dataclass(frozen=True)
class WavFormat:
    """A WAV ``fmt `` chunk: format tag (the sub-format's, for WAVE_FORMAT_EXTENSIBLE)."""

    tag: int
    channels: int
    rate: int
    byte_rate: int
    block_align: int
    bits: int

    @classmethod
    def parse(cls, body: bytes | memoryview) -> WavFormat:
        if len(body) < 16:
            raise AudioError("audio is unreadable: its WAV fmt chunk is too short")
        tag, channels, rate, byte_rate, block, bits = struct.unpack_from("<HHIIHH", body)
        if tag == 0xFFFE and len(body) >= 26:
            tag = _u16(body, 24)
        return cls(tag, channels, rate, byte_rate, block, bits)


def wav_chunks(read: Callable[[int], bytes]) -> tuple[WavFormat, int | None, int]:
    """Read a RIFF/WAVE header through ``read(n)`` up to the start of its data: the format, the
    ``fact`` chunk's sample count (None without one) and the data chunk's stated size."""
    riff = read(12)
    if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:12] != b"WAVE":
        raise AudioError("audio is unreadable: not a RIFF/WAVE header")
    fmt: WavFormat | None = None
    fact: int | None = None
    while True:
        head = read(8)
        if len(head) < 8:
            raise AudioError("audio is unreadable: the WAV file has no data chunk")
        cid, size = head[:4], _u32(head, 4)
        if cid == b"data":
            if fmt is None:
                raise AudioError("audio is unreadable: the WAV file has no fmt chunk before its data")
            return fmt, fact, size
        if size > 1 << 20:  # no header chunk is that big: the walk has gone astray
            raise AudioError("audio is unreadable: the WAV file has no data chunk")
        body = read(size + (size & 1))
        if len(body) < size:
            raise AudioError("audio is unreadable: the WAV file has no data chunk")
        if cid == b"fmt ":
            fmt = WavFormat.parse(body[:size])
        elif cid == b"fact" and size >= 4:
            fact = _u32(body, 0)


def _wav(data: bytes) -> Header:
    at = 0

    def read(n: int) -> bytes:
        nonlocal at
        at += n
        return data[at - n:at]

    fmt, fact, stated = wav_chunks(read)
    _check_layout("WAV", fmt.rate, fmt.channels)
    held = len(data) - at
    size = held if stated in (0, 0xFFFFFFFF) else min(stated, held)
    if fmt.tag in _FIXED_WIDTH:
        if fmt.bits == 0:
            raise AudioError("audio is unreadable: its WAV header says 0 bits per sample")
        block = fmt.channels * ((fmt.bits + 7) // 8)
        return Header("wav", fmt.rate, fmt.channels, size // block / fmt.rate)
    if fact:
        return Header("wav", fmt.rate, fmt.channels, fact / fmt.rate)
    if fmt.byte_rate:
        return Header("wav", fmt.rate, fmt.channels, size / fmt.byte_rate, estimated=True)
    return Header("wav", fmt.rate, fmt.channels, trusted=False)


# AIFF and Sun AU -------------------------------------------------------------------------------


def _extended(raw: bytes | memoryview) -> float:
    """An 80-bit IEEE 754 extended float (AIFF's sample rate)."""
    exponent = _u16(raw, 0, ">") & 0x7FFF
    mantissa = int.from_bytes(raw[2:10], "big")
    return 0.0 if exponent == 0 and mantissa == 0 else mantissa * 2.0 ** (exponent - 16383 - 63)


def _aiff(data: bytes) -> Header:
    if data[8:12] not in (b"AIFF", b"AIFC"):
        raise AudioError("audio is unreadable: a FORM file that is not AIFF")
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at:at + 4], _u32(data, at + 4, ">")
        if cid == b"COMM":
            if size < 18 or at + 26 > len(data):
                raise AudioError("audio is unreadable: its AIFF COMM chunk is cut off")
            channels, frames = _u16(data, at + 8, ">"), _u32(data, at + 10, ">")
            rate = int(_extended(data[at + 16:at + 26]))
            _check_layout("AIFF", rate, channels)
            return Header("aiff", rate, channels, frames / rate)
        at += 8 + size + (size & 1)
    raise AudioError("audio is unreadable: the AIFF file has no COMM chunk")


#: Sun AU encodings with a fixed sample width, in bytes
_AU_WIDTH = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 7: 8, 27: 1}


def _au(data: bytes) -> Header:
    if len(data) < 24:
        raise AudioError("audio is unreadable: its AU header is cut off")
    offset, size, encoding, rate, channels = struct.unpack_from(">IIIII", data, 4)
    _check_layout("AU", rate, channels)
    held = max(0, len(data) - offset)
    size = held if size == 0xFFFFFFFF else min(size, held)
    width = _AU_WIDTH.get(encoding)
    if width is None:
        return Header("au", rate, channels, trusted=False)
    return Header("au", rate, channels, size // (width * channels) / rate)


# FLAC ------------------------------------------------------------------------------------------


def _flac(data: bytes) -> Header:
    at = 4
    info: tuple[int, int, int] | None = None
    while True:
        if at + 4 > len(data):
            raise AudioError("audio is unreadable: the file ends inside its FLAC metadata")
        kind, size = data[at] & 0x7F, int.from_bytes(data[at + 1:at + 4], "big")
        last = data[at] & 0x80
        if kind == 127:
            raise AudioError("audio is unreadable: an invalid FLAC metadata block")
        if at + 4 + size > len(data):
            raise AudioError("audio is unreadable: the file ends inside its FLAC metadata")
        if kind == 0:
            if size < 34:
                raise AudioError("audio is unreadable: its FLAC STREAMINFO is too short")
            bits = int.from_bytes(data[at + 14:at + 22], "big")  # rate 20, channels 3, depth 5, samples 36
            info = (bits >> 44, ((bits >> 41) & 7) + 1, bits & ((1 << 36) - 1))
        elif info is None:
            raise AudioError("audio is unreadable: FLAC metadata does not start with STREAMINFO")
        at += 4 + size
        if last:
            break
    assert info is not None
    rate, channels, samples = info
    _check_layout("FLAC", rate, channels)
    if at >= len(data):
        raise AudioError("audio is empty: no FLAC frames after the metadata")
    if data[at] != 0xFF or data[at + 1:at + 2] not in (b"\xf8", b"\xf9"):
        raise AudioError("audio is unreadable: no FLAC frame follows the metadata")
    if samples == 0:  # a stream written before its length was known
        return Header("flac", rate, channels, trusted=False)
    return Header("flac", rate, channels, samples / rate)


# MPEG audio (MP3) and ADTS (AAC) frames ---------------------------------------------------------

_MPEG_KBPS = {  # (MPEG-1?, layer) -> kbit/s by bitrate index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


@dataclass(frozen=True)
class _Frame:
    kind: str  # "mp3" (any MPEG audio layer) or "aac" (ADTS)
    key: tuple[int, ...]  # what every frame of one stream shares
    length: int
    samples: int
    rate: int
    channels: int
    kbps: int


def _frame(data: bytes, at: int) -> _Frame | None:
    """The MPEG audio or ADTS frame header at ``at``, or None."""
    if at + 7 > len(data) or data[at] != 0xFF or data[at + 1] & 0xE0 != 0xE0:
        return None
    b1, b2, b3 = data[at + 1], data[at + 2], data[at + 3]
    layer_bits = (b1 >> 1) & 3
    if layer_bits == 0:  # ADTS: sync is 12 bits, the layer always 0
        if b1 & 0xF0 != 0xF0:
            return None
        index = (b2 >> 2) & 0xF
        channels = ((b2 & 1) << 2) | (b3 >> 6)
        length = ((b3 & 3) << 11) | (data[at + 4] << 3) | (data[at + 5] >> 5)
        header = 7 if b1 & 1 else 9
        if index >= len(_ADTS_RATES) or length <= header:
            return None
        blocks = (data[at + 6] & 3) + 1
        return _Frame("aac", (b1 & 0xF6, index, channels), length, 1024 * blocks, _ADTS_RATES[index],
                      channels or 2, 0)
    version = (b1 >> 3) & 3
    layer = 4 - layer_bits
    bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
    if version == 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    kbps = _MPEG_KBPS[(mpeg1, layer if mpeg1 or layer == 1 else 2)][bitrate_index - 1]
    rate = _MPEG_RATES[version][rate_index]
    padding = (b2 >> 1) & 1
    if layer == 1:
        length, samples = (12 * kbps * 1000 // rate + padding) * 4, 384
    else:
        per = 144 if mpeg1 or layer == 2 else 72
        length, samples = per * kbps * 1000 // rate + padding, 1152 if mpeg1 or layer == 2 else 576
    return _Frame("mp3", (version, layer, rate_index), length, samples, rate, 1 if b3 >> 6 == 3 else 2, kbps)


def _frames_at(data: bytes, at: int) -> Header | None:
    """MPEG audio or ADTS when three frames follow each other from ``at`` (or the file ends
    after one or two); None otherwise."""
    first = _frame(data, at)
    if first is None:
        return None
    pos, seen = at, 0
    while seen < 3 and pos < len(data):
        frame = _frame(data, pos)
        if frame is None or frame.key != first.key:
            return None
        pos += frame.length
        seen += 1
    if pos > len(data) and seen < 2:
        return None
    return (_mp3 if first.kind == "mp3" else _adts)(data, at, first)


def _walk(data: bytes, at: int, end: int, key: tuple[int, ...]) -> tuple[int, int, int, set[int], bool]:
    """Frames from ``at``: (frames, samples, bytes walked, bitrates seen, reached the end)."""
    frames = samples = 0
    rates: set[int] = set()
    pos = at
    while frames < _WALK:
        frame = _frame(data, pos)
        if frame is None or frame.key != key:
            break
        frames, samples, pos = frames + 1, samples + frame.samples, pos + frame.length
        rates.add(frame.kbps)
    return frames, samples, min(pos, end) - at, rates, pos >= end


def _tail_tags(data: bytes) -> int:
    """Bytes of ID3v1 and APE tags at the end of an MP3."""
    end = len(data)
    if data.startswith(b"TAG", end - 128):
        end -= 128
    if end >= 32 and data.startswith(b"APETAGEX", end - 32):  # size counts the footer, a flag the header
        end -= _u32(data, end - 20) + (32 if _u32(data, end - 12) & 0x80000000 else 0)
    return len(data) - max(end, 0)


def _mp3(data: bytes, at: int, first: _Frame) -> Header:
    end = len(data) - _tail_tags(data)
    channels, rate = first.channels, first.rate
    side = (17 if channels == 1 else 32) if first.key[0] == 3 else (9 if channels == 1 else 17)
    tag = at + 4 + side
    if data[tag:tag + 4] in (b"Xing", b"Info") and tag + 12 <= len(data):
        flags = _u32(data, tag + 4, ">")
        if flags & 1:
            frames = _u32(data, tag + 8, ">")
            trim = 0
            lame = tag + 8 + 4 * (flags & 1) + 4 * ((flags >> 1) & 1) + 100 * ((flags >> 2) & 1) + 4 * ((flags >> 3) & 1)
            if data[lame:lame + 4].isalnum() and lame + 24 <= len(data):  # a LAME tag ("LAME", "Lavc"...)
                bits = int.from_bytes(data[lame + 21:lame + 24], "big")
                trim = (bits >> 12) + (bits & 0xFFF)
            return Header("mp3", rate, channels, max(0, frames * first.samples - trim) / rate)
    vbri = at + 4 + 32
    if data[vbri:vbri + 4] == b"VBRI" and vbri + 18 <= len(data):
        return Header("mp3", rate, channels, _u32(data, vbri + 14, ">") * first.samples / rate)
    frames, samples, walked, rates, whole = _walk(data, at, end, first.key)
    if whole:
        return Header("mp3", rate, channels, samples / rate)
    constant = len(rates) == 1 and all(_same_bitrate(data, at + (end - at) * k // 4, first) for k in (1, 2, 3))
    seconds = (end - at) * 8 / (first.kbps * 1000) if constant else (end - at) / walked * samples / rate
    return Header("mp3", rate, channels, seconds, estimated=True, trusted=constant)


def _same_bitrate(data: bytes, near: int, first: _Frame) -> bool:
    """Whether the first frame found at or after ``near`` has ``first``'s bitrate."""
    pos = data.find(b"\xff", near, near + 8192)
    while pos >= 0:
        if (frame := _frame(data, pos)) is not None and frame.key == first.key:
            after = _frame(data, pos + frame.length)
            if after is not None and after.key == first.key:
                return frame.kbps == first.kbps and after.kbps == first.kbps
        pos = data.find(b"\xff", pos + 1, near + 8192)
    return True  # nothing found there to say otherwise


def _adts(data: bytes, at: int, first: _Frame) -> Header:
    frames, samples, walked, _rates, whole = _walk(data, at, len(data), first.key)
    if whole:
        return Header("aac", first.rate, first.channels, samples / first.rate)
    seconds = (len(data) - at) / walked * samples / first.rate
    return Header("aac", first.rate, first.channels, seconds, estimated=True, trusted=False)


# Ogg ---------------------------------------------------------------------------------------------

_OGG_HEADERS = {b"\x01vorbis": 3, b"OpusHead": 2, b"Speex   ": 2}
_OGG_NOT_AUDIO = (b"\x80theora", b"fishead\x00", b"\x80kate", b"fisbone\x00")


def _ogg_page(data: bytes, at: int) -> tuple[int, int, int, list[int]] | None:
    """(serial, granule, header type, lacing values) of the page at ``at``, None if none is there."""
    if not data.startswith(b"OggS", at) or at + 27 > len(data) or data[at + 4] != 0:
        return None
    segments = data[at + 26]
    if at + 27 + segments > len(data):
        return None
    granule, serial = struct.unpack_from("<qI", data, at + 6)
    return serial, granule, data[at + 5], list(data[at + 27:at + 27 + segments])


def _ogg(data: bytes) -> Header:
    """Walk the pages from the start until the first audio stream's header packets are whole."""
    at = 0
    packets: dict[int, list[bytes]] = {}
    partial: dict[int, bytes] = {}
    audio: int | None = None
    while audio is None or len(packets[audio]) < _ogg_needs(packets[audio][0]):
        page = _ogg_page(data, at)
        if page is None:
            if at >= len(data):
                raise AudioError("audio is unreadable: the file ends inside its Ogg headers")
            raise AudioError(f"audio is unreadable: Ogg pages do not follow each other (at byte {at})")
        serial, _granule, kind, lacing = page
        body = at + 27 + len(lacing)
        if body + sum(lacing) > len(data):
            raise AudioError("audio is unreadable: the file ends inside its Ogg headers")
        piece = partial.pop(serial, b"")
        for size in lacing:
            piece += data[body:body + size]
            body += size
            if size < 255:
                packets.setdefault(serial, []).append(piece)
                piece = b""
        if piece:
            partial[serial] = piece
        at = body
        if audio is None:
            firsts = [(s, p[0]) for s, p in packets.items() if p]
            audio = next((s for s, p in firsts if _ogg_needs(p)), None)
            if audio is None and any(not p.startswith(_OGG_NOT_AUDIO) for _s, p in firsts):
                return Header("ogg", trusted=False)  # a codec this check does not know: ffmpeg will tell
            if audio is None and not kind & 2:  # past every stream's first page, and none is audio
                raise AudioError("not audio: the Ogg file holds no audio stream")
    ident = packets[audio][0]
    skip = 0
    if ident.startswith(b"OpusHead") and len(ident) >= 19:
        channels, rate, skip = ident[9], 48000, _u16(ident, 10)  # Opus always decodes at 48 kHz
    elif ident.startswith(b"\x01vorbis") and len(ident) >= 16:
        channels, rate = ident[11], _u32(ident, 12)
    elif ident.startswith(b"Speex   ") and len(ident) >= 52:
        rate, channels = _u32(ident, 36), _u32(ident, 48)
    elif ident.startswith(b"\x7fFLAC") and len(ident) >= 35 and ident[9:13] == b"fLaC":
        bits = int.from_bytes(ident[27:35], "big")  # STREAMINFO starts at 17
        rate, channels = bits >> 44, ((bits >> 41) & 7) + 1
    else:
        raise AudioError("audio is unreadable: its Ogg identification header is too short")
    _check_layout("Ogg", rate, channels)
    granule = _last_granule(data, audio)
    if granule is None:
        return Header("ogg", rate, channels, trusted=False)
    return Header("ogg", rate, channels, max(0, granule - skip) / rate)


def _ogg_needs(ident: bytes) -> int:
    """How many header packets the stream whose first packet is ``ident`` has (0: not audio)."""
    for magic, count in _OGG_HEADERS.items():
        if ident.startswith(magic):
            return count
    if ident.startswith(b"\x7fFLAC") and len(ident) >= 9:
        return 1 + _u16(ident, 7, ">")
    return 0


def _last_granule(data: bytes, serial: int) -> int | None:
    """The granule position of the last page of ``serial`` that ends a packet (Ogg pages are at
    most 65,307 bytes, so the last one starts in the last 64 KB)."""
    end = len(data)
    floor = max(0, len(data) - 4 * 65536)
    while end > floor:
        at = data.rfind(b"OggS", floor, end)
        if at < 0:
            return None
        page = _ogg_page(data, at)
        if page is not None and page[0] == serial and page[1] >= 0:
            return page[1]
        end = at
    return None


# MP4 / M4A / MOV -------------------------------------------------------------------------------


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """The boxes from ``start`` to ``end``: (type, payload start, payload end); one that runs
    past ``end`` is cut off, and ends the list."""
    out = []
    at = start
    while at + 8 <= end:
        size, kind = _u32(data, at, ">"), data[at + 4:at + 8]
        head = 8
        if size == 1:
            if at + 16 > end:
                break
            size, head = int.from_bytes(data[at + 8:at + 16], "big"), 16
        elif size == 0:
            size = end - at
        if size < head:
            raise AudioError(f"audio is unreadable: an MP4 box of {size} bytes")
        if at + size > end:  # cut off: not there
            break
        out.append((kind, at + head, at + size))
        at += size
    return out


def _child(data: bytes, box: tuple[bytes, int, int], *path: bytes) -> tuple[bytes, int, int] | None:
    for name in path:
        found = [b for b in _boxes(data, box[1], box[2]) if b[0] == name]
        if not found:
            return None
        box = found[0]
    return box


def _mp4(data: bytes) -> Header:
    top = _boxes(data, 0, len(data))
    moov = next((b for b in top if b[0] == b"moov"), None)
    if moov is None:
        raise AudioError("audio is unreadable: the MP4 file has no moov box (it may be cut off)")
    for trak in (b for b in _boxes(data, moov[1], moov[2]) if b[0] == b"trak"):
        hdlr = _child(data, trak, b"mdia", b"hdlr")
        if hdlr is None or data[hdlr[1] + 8:hdlr[1] + 12] != b"soun":
            continue
        mdhd = _child(data, trak, b"mdia", b"mdhd")
        stsd = _child(data, trak, b"mdia", b"minf", b"stbl", b"stsd")
        rate = channels = None
        if stsd is not None and stsd[1] + 8 + 36 <= stsd[2]:
            entry = stsd[1] + 8  # version, flags, entry count; then the first sample entry
            channels, rate = _u16(data, entry + 24, ">"), _u32(data, entry + 32, ">") >> 16
        if mdhd is None or mdhd[1] + (32 if data[mdhd[1]] == 1 else 20) > mdhd[2]:
            return Header("mp4", rate, channels, trusted=False)
        if data[mdhd[1]] == 1:
            scale, length = _u32(data, mdhd[1] + 20, ">"), int.from_bytes(data[mdhd[1] + 24:mdhd[1] + 32], "big")
        else:
            scale, length = _u32(data, mdhd[1] + 12, ">"), _u32(data, mdhd[1] + 16, ">")
        if not scale or length in (0, 0xFFFFFFFF, (1 << 64) - 1):  # fragmented: the fragments say
            return Header("mp4", rate, channels, trusted=False)
        return Header("mp4", rate, channels, length / scale)
    raise AudioError("not audio: the MP4 file has no audio track")


# WebM / Matroska -------------------------------------------------------------------------------

_SEGMENT, _INFO, _TRACKS, _CLUSTER = 0x18538067, 0x1549A966, 0x1654AE6B, 0x1F43B675


def _vint(data: bytes, at: int, keep_marker: bool) -> tuple[int, int]:
    """An EBML variable-length integer at ``at``: (value, length); -1 for an unknown size."""
    if at >= len(data) or data[at] == 0:
        raise AudioError(f"audio is unreadable: a broken EBML element at byte {at}")
    length = 9 - data[at].bit_length()
    if keep_marker and length > 4:
        raise AudioError(f"audio is unreadable: a broken EBML element at byte {at}")
    if at + length > len(data):
        raise AudioError("audio is unreadable: the file ends inside its WebM header")
    value = int.from_bytes(data[at:at + length], "big")
    if keep_marker:
        return value, length
    value &= (1 << (7 * length)) - 1
    return (-1 if value == (1 << (7 * length)) - 1 else value), length


def _elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """EBML elements from ``start`` to ``end``: (id, payload start, payload end), up to the first
    cluster or the first element of unknown size."""
    out = []
    at = start
    while at < end:
        eid, n = _vint(data, at, True)
        size, m = _vint(data, at + n, False)
        body = at + n + m
        if eid == _CLUSTER or size < 0:
            out.append((eid, body, end))
            break
        out.append((eid, body, body + size))
        at = body + size
    return out


def _uint(data: bytes, el: tuple[int, int, int]) -> int:
    return int.from_bytes(data[el[1]:el[2]], "big")


def _float(data: bytes, el: tuple[int, int, int]) -> float:
    raw = data[el[1]:el[2]]
    return float(struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0]) if len(raw) in (4, 8) else 0.0


def _webm(data: bytes) -> Header:
    ebml_size, n = _vint(data, 4, False)
    at = 4 + n + max(ebml_size, 0)
    segment = next((e for e in _elements(data, at, len(data)) if e[0] == _SEGMENT), None)
    if segment is None:
        raise AudioError("audio is unreadable: the WebM file has no Segment")
    scale, duration, track = 1_000_000, None, None
    for eid, start, end in _elements(data, segment[1], len(data)):
        if end > len(data) and eid in (_INFO, _TRACKS):
            raise AudioError("audio is unreadable: the file ends inside its WebM header")
        if eid == _INFO:
            for el in _elements(data, start, end):
                if el[0] == 0x2AD7B1:
                    scale = _uint(data, el)
                elif el[0] == 0x4489:
                    duration = _float(data, el)
        elif eid == _TRACKS:
            for entry in (e for e in _elements(data, start, end) if e[0] == 0xAE):
                fields = {e[0]: e for e in _elements(data, entry[1], entry[2])}
                if 0x83 in fields and _uint(data, fields[0x83]) == 2:
                    track = fields
                    break
            if track is None:
                raise AudioError("not audio: the WebM file has no audio track")
            break
        elif eid == _CLUSTER:
            break
    if track is None:
        raise AudioError("audio is unreadable: no WebM Tracks before its first Cluster or the end of the file")
    rate = channels = None
    if 0xE1 in track:
        sound = {e[0]: e for e in _elements(data, track[0xE1][1], track[0xE1][2])}
        rate = int(_float(data, sound[0xB5])) if 0xB5 in sound else 8000
        channels = _uint(data, sound[0x9F]) if 0x9F in sound else 1
        _check_layout("WebM", rate, channels)
    if duration is None:  # a live recording (a browser's MediaRecorder) writes none
        return Header("webm", rate, channels, trusted=False)
    return Header("webm", rate, channels, duration * scale / 1e9)


# dispatch --------------------------------------------------------------------------------------

_CONTAINERS: list[tuple[bytes, int, Callable[[bytes], Header]]] = [
    (b"RIFF", 0, lambda d: _riff(d)), (b"RF64", 0, _wav), (b"fLaC", 0, _flac), (b"OggS", 0, _ogg),
    (b"ftyp", 4, _mp4), (b"\x1a\x45\xdf\xa3", 0, _webm), (b"FORM", 0, _aiff), (b".snd", 0, _au),
]


def _riff(data: bytes) -> Header:
    if data.startswith(b"WAVE", 8):
        return _wav(data)
    if data.startswith(b"WEBP", 8):
        raise AudioError("not audio: the file is a WebP image")
    if data.startswith(b"AVI ", 8):
        return Header("avi", trusted=False)  # a video that may have sound: ffmpeg will tell
    raise AudioError(f"audio is unreadable: a RIFF file of form {data[8:12]!r}, not WAVE")



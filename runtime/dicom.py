"""DICOM frames through pydicom: one file, a folder (a series) or a multi-frame cine, as uint8 frames.

Every frame comes out uint8 (H, W) gray or (H, W, 3) RGB, like every other source. Per frame:

- MONOCHROME1 / MONOCHROME2, BitsAllocated 8: the stored values as they are (display-ready, like the
  video frames models are trained on), scaled by 255 / (2**BitsStored - 1) when fewer than 8 bits are
  stored (1-bit data: 0/255); MONOCHROME1 is then inverted (255 - v), so its top stored value is black.
- MONOCHROME1 / MONOCHROME2, more than 8 bits: Modality LUT or rescale (slope/intercept, also from
  enhanced multi-frame functional groups), then the VOI: a VOI LUT (looked up here, any entry size) or the
  first WindowCenter/WindowWidth (DICOM LINEAR, LINEAR_EXACT or SIGMOID, straight to 0..255). Without a
  VOI: min-max over **all frames of the file** (one scale per file, so that a cine does not flicker;
  each file of a folder gets its own scale, since a folder's files need not share an acquisition).
  MONOCHROME1 is inverted after the VOI.
- RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT: RGB (pydicom 3 converts YBR_FULL*, pydicom 2 through
  `convert_color_space`; the JPEG 2000 decoders undo RCT/ICT themselves); more than 8 bits is scaled
  by 2**BitsStored - 1.
- PALETTE COLOR: pydicom `apply_color_lut` -> RGB, 16-bit LUT entries scaled to 8 bits.

Compressed transfer syntaxes decode where a decoder is installed (`edgeclf[dicom]` brings Pillow for
JPEG baseline and pylibjpeg-openjpeg for JPEG 2000); otherwise the source refuses to open with a
one-line SourceError naming the transfer syntax and the package that decodes it. 12-bit JPEG Extended
(X-rays) needs pylibjpeg-libjpeg or gdcm: Pillow decodes 8-bit samples only.

Frames are decoded one at a time, with pydicom 3 (iter_pixels) and pydicom 2 (each frame handed to it
as a one-frame data set): a cine's memory is one decoded frame plus, for compressed data, the file's
compressed pixel data. A Deflated Explicit VR Little Endian file is inflated whole in memory (its pixel
data cannot be read in place); a file whose data set is not encoded as its transfer syntax says (an
implicit VR data set under a JPEG syntax, as some writers made) is read whole by dcmread, as pydicom does.

Frame meta never carries names, IDs or dates: it is built from a whitelist (`META_KEYS`): modality,
photometric interpretation, bits, the frame's index in its file, the transfer syntax, `sop_uid_hash` (12 hex of
the HMAC-SHA256 of the SOPInstanceUID under the install's source key, `sources.source_hash`: a plain hash of a UID
could be matched against a PACS export's UID list, or UIDs enumerated from their root and timestamp; the key's
holder recomputes it to find the instance) and `key_id`, which key that is (as in the audit's source fact).
Header values are copied only when they have the form their VR allows (a
Modality that is not a DICOM-defined modality code, a transfer syntax that is not a UID, becomes None),
so that a misfiled value (a name typed into the wrong field) cannot ride along. Errors name files by their index
in the series, never by name (file names may carry patient names).

Python 3.8 compatible; pydicom (2.4 or 3.x; pydicom 3 needs Python 3.10, so Python 3.8 on JetPack 5 has
pydicom 2.4) is imported inside the functions that need it.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from numpy.typing import NDArray

from edgeclf.errors import SourceError, require
from edgeclf.runtime.sources import (
    BaseSource,
    Image,
    Size,
    _dicom_marker,
    _listdir,
    _short_hash,
    _warn_subfolders,
    natural_key,
    source_hash,
    source_key_info,
)

__all__ = [
    "DicomSource",
    "DicomFile",
    "is_dicom_file",
    "DICOM_EXTENSIONS",
    "META_KEYS",
]

logger = logging.getLogger(__name__)

DICOM_EXTENSIONS: Tuple[str, ...] = (".dcm", ".dicom")

# Everything a DICOM frame's meta may hold: no names, IDs, dates or raw UIDs (a UID only as a short keyed hash,
# with the key_id of its key).
META_KEYS: Tuple[str, ...] = (
    "source", "source_id", "file_index", "pass", "file_frame", "file_frames", "modality", "photometric",
    "bits_allocated", "bits_stored", "transfer_syntax", "sop_uid_hash", "key_id", "voi",
)
_UID_FORM = re.compile(r"[0-9]+(\.[0-9]+)*")
# Modality (0008,0060): the DICOM defined terms (PS3.3 C.7.3.1.1.1), retired ones included for old files.
# A list, not a pattern: a name typed into Modality ("ZYQUIST ORVILLE") has the form of a CS value too.
_MODALITIES = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DG", "DMS", "DOC", "DX",
    "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER",
    "KO", "LEN", "LS", "M3D", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV",
    "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE",
    "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR",
    "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
    # retired
    "AS", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST",
    "VF",
})
_MONO = ("MONOCHROME1", "MONOCHROME2")
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_SUPPORTED_PI = _MONO + _RGB_LIKE + ("PALETTE COLOR",)
# Every PhotometricInterpretation DICOM defines (PS3.3 C.7.6.3.1.2, retired ones included): only these are
# echoed in an error; anything else may be free text typed into the field (a name), and is not.
_KNOWN_PI = frozenset(_SUPPORTED_PI + ("HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "YBR_PARTIAL_420"))
_UNCOMPRESSED = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
)
_DEFLATED = "1.2.840.10008.1.2.1.99"  # the whole data set is deflated: pixel data cannot be read in place
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # 8 or 12 bits per sample; Pillow decodes only 8
_J2K = "pylibjpeg pylibjpeg-openjpeg (part of edgeclf[dicom])"
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg (GPL-3.0) or python-gdcm"
_DECODER_PACKAGES: Dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pillow (part of edgeclf[dicom])",
    "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": "pyjpegls, or " + _LIBJPEG,
    "1.2.840.10008.1.2.4.81": "pyjpegls, or " + _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K,
    "1.2.840.10008.1.2.4.202": _J2K,
    "1.2.840.10008.1.2.4.203": _J2K,
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle (pydicom >= 2.4 also decodes RLE with numpy alone)",
}
_VIDEO_SYNTAX_PREFIX = "1.2.840.10008.1.2.4.10"  # MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265 (.100 - .108)


class _WithholdValues(logging.Filter):
    """pydicom quotes header values it finds invalid ("Invalid value for VR IS: 'DOE^JOHN'"), lists them
    unquoted ("... does not allow code extensions, ignoring: DOE JOHN") and names the file it read ("... in file
    /data/DOE^JOHN/IM1"): the record is kept, its values and path are not (`_withhold`: a name typed into the
    wrong field, or a folder named after the patient, must not reach a log). A traceback attached to the record
    (its exception's text may quote a value too) is dropped; a record that cannot be formatted is replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - logging would print the raw message and its arguments
            msg = "pydicom logged a message that could not be formatted"
        record.msg, record.args = _withhold(msg), None
        if record.exc_info or record.exc_text or record.stack_info:
            exc = record.exc_info[1] if record.exc_info else None
            record.msg = f"{record.msg} ({type(exc).__name__})" if exc is not None else record.msg
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_WITHHELD = "<withheld>"
_IN_FILE = re.compile(r" in file .*", re.S)  # pydicom's "<problem> in file <path>": the path runs to the end
_SEE = re.compile(r"(.*?)( Please see <https://dicom\.nema\.org/[^<>\s]*> for allowed values for each VR\.)", re.S)
_VRS = frozenset((
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW",
    "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
))
# Specific Character Set defined terms (PS3.3 C.12.1.1.2) and the Python codecs pydicom maps them to: the
# only character-set values a message may repeat (anything else in that element may be a misfiled name).
_CHARSETS = frozenset(
    [f"ISO_IR {n}" for n in (6, 13, 100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 192)]
    + [f"ISO 2022 IR {n}" for n in (6, 13, 58, 87, 100, 101, 109, 110, 126, 127, 138, 144, 148, 149, 159, 166)]
    + ["GB18030", "GBK", "ISO 2022 GBK", "ISO 2022 58"]
    + ["iso8859", "shift_jis", "latin_1", "iso8859_2", "iso8859_3", "iso8859_4", "iso_ir_126", "iso_ir_127",
       "iso_ir_138", "iso_ir_144", "iso_ir_148", "iso_ir_166", "iso2022_jp", "euc_kr", "iso2022_jp_2", "iso_ir_58",
       "UTF8", "utf_8", "GB2312", "ascii"]
)
_NUMBER = re.compile(r"-?(?:0x)?[0-9A-Fa-f]{1,20}")
_TAG = re.compile(r"\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)")


def _is_charsets(text: str) -> bool:
    return all(item.strip() in _CHARSETS for item in text.split(","))


# What a placeholder of a known message may be shown as; any other text in its place is withheld.
_SAFE_VALUE: Dict[str, Callable[[str], bool]] = {
    "v": lambda t: False,  # a header value: always withheld
    "n": lambda t: bool(_NUMBER.fullmatch(t)),  # a length, count or file position pydicom computed
    "vr": lambda t: t in _VRS,
    "tag": lambda t: bool(_TAG.fullmatch(t)),
    "cs": _is_charsets,
    "pi": lambda t: t in _KNOWN_PI,
    "ie": lambda t: t in ("implicit", "explicit"),
    "plugin": lambda t: t in ("pillow", "pylibjpeg", "gdcm", "pyjpegls", "numpy"),
}
# pydicom's messages (3.x; 2.4 words most of them alike) that carry header values, as fixed text with {kind}
# placeholders. A message none of them matches is cut at its first text that is not plain words (`_prefix`).
_KNOWN_MESSAGES: Tuple[str, ...] = (
    "Invalid value for VR {vr}: {v}.",
    "Invalid value for VR {vr}: {v}",
    "The value length ({n}) exceeds the maximum length of {n} allowed for VR {vr}.",
    "The value length ({n}) exceeds the maximum length of {n} allowed for VR {vr}. Invalid value for VR {vr}: {v}.",
    "The PN component length ({n}) exceeds the maximum allowed length of {n}.",
    "The number of PN components length ({n}) exceeds the maximum allowed number of {n}.",
    "Invalid value: a value for a tag with VR {vr} must be between {n} and {n}.",
    "Invalid value length {n}: the value length for a tag with VR {vr} must be a multiple of {n}.",
    'Value "{v}" is not valid for elements with a VR of {vr}',
    "Unknown encoding '{cs}' - using default encoding instead",
    "Incorrect value for Specific Character Set '{v}' - assuming '{cs}'",
    "Value '{cs}' for Specific Character Set does not allow code extensions, ignoring: {cs}",
    "Failed to decode byte string with encoding '{cs}' - using replacement characters in decoded string",
    "Failed to decode byte string with encodings: {cs} - using replacement characters in decoded string",
    "Found unknown escape sequence in encoded string value - using encoding {cs}",
    "Failed to encode value with encodings: {cs} - using replacement characters in encoded string",
    "Unknown DICOM tag {tag} - setting VR to 'UN'",
    "Unknown VR '0x{n}' assuming implicit VR encoding",
    "Unknown VR '{v}' assuming explicit VR encoding with 2-byte length",
    "Expected {ie} VR, but found {ie} VR - using {ie} VR for reading",
    "Expected 0x00000000 after delimiter, found 0x{n}, at position 0x{n}",
    "Expected 0x00000000 after delimiter, found 0x{n}, at data position 0x{n}",
    "Expected sequence item with tag {tag} at file position 0x{n}",
    "Expected length to be multiple of 4 for VR 'AT', got length {n}",
    "Expected length between {n} and {n}, got length {n}",
    "A value of '{v}' for (0028,0008) 'Number of Frames' is invalid, assuming 1 frame",
    "A value of {v} for (0028,0008) 'Number of Frames' is non-conformant. It's recommended that this value be "
    "changed to 1",
    "The (0028,0004) 'Photometric Interpretation' value is '{pi}' however the encoded image's codestream uses "
    "component IDs that indicate it should be 'RGB'",
    "The (0028,0004) 'Photometric Interpretation' value is '{pi}' however the encoded image's codestream contains "
    "a JFIF APP marker which indicates it should be '{pi}'",
    "The decoding plugin '{plugin}' failed to decode the frame at index {n}",
    "The pixel data is {n} bytes long, which indicates it contains {n} bytes of excess padding to be removed",
    "The decoded RLE segment contains non-conformant padding - {n} vs. {n} bytes expected",
    "'datetime.datetime' doesn't allow a value of '60' for the seconds component, changing to '59'",
    "'datetime.time' doesn't allow a value of '60' for the seconds component, changing to '59'",
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile_message(template: str) -> Tuple[Any, List[str]]:
    """(regex of the whole message, its fixed parts and placeholder kinds alternating)."""
    parts = _PLACEHOLDER.split(template)  # fixed, kind, fixed, kind, ..., fixed
    pattern = "".join(re.escape(p) if i % 2 == 0 else "(.*?)" for i, p in enumerate(parts))
    return re.compile(pattern, re.S), parts


_KNOWN = [_compile_message(t) for t in sorted(_KNOWN_MESSAGES, key=len, reverse=True)]  # the longest form first
# Plain text a message may keep up to where it is cut: spaces and punctuation, words (don't, non-conformant,
# EOI/EOC), tags, and quoted text (kept only when it is a DICOM element or UID name, see _prefix).
_TOKEN = re.compile(
    r"[ \t\r\n,.;]+|-(?= )|[A-Za-z]+(?:'[a-z]{1,2}(?![A-Za-z]))?(?:[-/_][A-Za-z]+)*|\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)"
    r"|'[^\r\n]{1,80}?'(?=[\s,.;:)]|$)"
)
# Capitalised words of pydicom's own text; any other word in capitals may be a name (DICOM writes names so).
_ACRONYMS = frozenset((
    "A", "I", "DICOM", "DICOMDIR", "VR", "UID", "UIDs", "JPEG", "JPEG-LS", "RLE", "JFIF", "APP", "EOI", "EOC", "SOI",
    "LUT", "VOI", "RGB", "YBR", "FULL", "ICC", "BOT", "EOT", "ID", "IDs", "ASCII", "UTF", "OK", "NOT", "OB", "OW",
))
_NAMES: List[FrozenSet[str]] = []  # [set of DICOM element names, keywords and UID names], built on first use


def _dicom_names() -> FrozenSet[str]:
    if not _NAMES:
        names: Set[str] = set()
        try:
            import pydicom.datadict
            import pydicom.uid

            elements: Dict[Any, Any] = getattr(pydicom.datadict, "DicomDictionary", {})
            uids: Dict[Any, Any] = getattr(pydicom.uid, "UID_dictionary", {})
            names.update(str(v[2]) for v in elements.values())
            names.update(str(v[4]) for v in elements.values())
            names.update(str(v[0]) for v in uids.values())
        except Exception:  # noqa: BLE001 - without the dictionary no quoted text is kept
            pass
        names.update(_KNOWN_PI)
        _NAMES.append(frozenset(n for n in names if n))
    return _NAMES[0]


def _plain_word(word: str) -> bool:
    for part in re.split(r"[-/_']", word):
        if len(part) > 1 and part.isupper() and part not in _ACRONYMS and part not in _VRS:
            return False
    return True


def _prefix(text: str) -> str:
    """`text` up to its first part that is not plain text (a number, a colon, an equals sign, quoted text other
    than a DICOM element or UID name, a word in capitals that is not pydicom's own), then "<withheld>"."""
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            break
        tok = m.group(0)
        if tok.startswith("'") and tok[1:-1] not in _dicom_names():
            break
        if tok[0].isalpha() and not _plain_word(tok):
            break
        i = m.end()
    if i >= len(text):
        return text
    kept = text[:i].rstrip(" \t\r\n,;-")
    return f"{kept} {_WITHHELD}" if kept else _WITHHELD


def _withhold(text: str) -> str:
    """`text` (a pydicom message or a decoder's error text) without the header values and file paths it may
    carry. A message pydicom is known to word so keeps its fixed text, with each value withheld unless it has a
    form no name has (a VR, a tag, a number pydicom computed, a character set's defined term); any other message
    is cut at its first part that is not plain text (`_prefix`). A path after " in file " is withheld."""
    tail = ""
    m = _IN_FILE.search(text)
    if m is not None:
        text, tail = text[: m.start()], f" in file {_WITHHELD}"
    see = _SEE.fullmatch(text)
    if see is not None:
        text, tail = see.group(1), see.group(2) + tail
    for pattern, parts in _KNOWN:
        got = pattern.fullmatch(text)
        if got is None:
            continue
        out: List[str] = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                out.append(part)
                continue
            value = got.group(i // 2 + 1)
            out.append(value if _SAFE_VALUE.get(part, _SAFE_VALUE["v"])(value) else _WITHHELD)
        return "".join(out) + tail
    return _prefix(text) + tail


_PYDICOM_MODULES = r"pydicom(\.|$)"
_WITHHOLD = _WithholdValues()


_SWEPT = [-1]  # how many loggers existed at the last sweep


def _filter_pydicom_loggers() -> None:
    """A logger's filter sees only records logged on that logger, not those its children propagate, and
    pydicom logs from modules' own loggers too (pydicom.pixels.*, imported when pixels are first decoded):
    every pydicom logger that exists gets the filter (addFilter skips one it already has). Swept again only
    when loggers were added: this runs for every frame decoded (through _utils)."""
    known = logging.Logger.manager.loggerDict
    if len(known) == _SWEPT[0]:
        return
    _SWEPT[0] = len(known)
    logging.getLogger("pydicom").addFilter(_WITHHOLD)
    for name in list(known):
        if name.startswith("pydicom."):
            lg = logging.getLogger(name)
            if _WITHHOLD not in lg.filters:
                lg.addFilter(_WITHHOLD)


def _pydicom() -> Any:
    mod = require("pydicom", "dicom")
    _filter_pydicom_loggers()  # a pydicom module imported since has its own logger (a no-op when none was)
    _quiet_pydicom_warnings()
    return mod


def _quiet_pydicom_warnings() -> None:
    """pydicom's warnings quote header values ("Invalid value for VR PN: 'DOE^JOHN'", "Unknown encoding
    'DOE^JOHN'") and paths, on stderr, and a warning's text cannot be rewritten: none is shown. pydicom 3
    logs each one too (warn_and_log; filtered above), pydicom 2 then says nothing. Checked at every call,
    not once: a catch_warnings() block around the first read would take a once-set filter away with it."""
    for action, _, category, module, _ in warnings.filters:
        if action == "ignore" and category is UserWarning and module is not None and module.pattern == _PYDICOM_MODULES:
            return
    warnings.filterwarnings("ignore", category=UserWarning, module=_PYDICOM_MODULES)


def _major() -> int:
    version = str(getattr(_pydicom(), "__version__", "2"))
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 2


def _uid_hash(uid: Any) -> Optional[str]:
    """12 hex of the keyed hash (`source_hash`) of a UID: a plain sha256 could be matched against a UID list."""
    if not uid:
        return None
    return source_hash(str(uid), 12)


def is_dicom_file(path: str) -> bool:
    """True when `path` is a regular file with the DICOM Part 10 'DICM' marker at byte 128."""
    return _dicom_marker(path)


def _number(value: Any) -> Optional[float]:
    """A DICOM DS/IS/US value (or the first of a multi-valued one) as float; None if absent or bad."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return None
            value = value[0]
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _fps_of(ds: Any) -> Optional[float]:
    """Frames per second from FrameTime (ms), FrameTimeVector, CineRate or RecommendedDisplayFrameRate."""
    frame_time = _number(ds.get("FrameTime"))
    if frame_time is not None and frame_time > 0:
        return 1000.0 / frame_time
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        try:
            steps = [float(v) for v in list(vector)[1:] if float(v) > 0]  # the first entry is 0
        except (TypeError, ValueError):
            steps = []
        if steps:
            return 1000.0 / (sum(steps) / len(steps))
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _number(ds.get(key))
        if rate is not None and rate > 0:
            return rate
    return None


def _uid_or_none(value: Any) -> Optional[str]:
    """A UID as text when it has the form of one (digits and dots, at most 64), else None."""
    text = str(value).strip() if value is not None else ""
    return text if len(text) <= 64 and _UID_FORM.fullmatch(text) else None


def _modality_or_none(value: Any) -> Optional[str]:
    """A DICOM-defined modality code, else None: free text never reaches the meta."""
    text = str(value).strip() if value is not None else ""
    return text if text in _MODALITIES else None


def _whitelisted(meta: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in meta.items() if k in META_KEYS}


def _syntax_name(uid: str) -> str:
    if _uid_or_none(uid) is None:
        return "(not a valid UID)"  # a damaged header's text is never echoed: it could hold anything
    try:
        name = str(_pydicom().uid.UID(uid).name)
    except Exception:  # noqa: BLE001 - a name is cosmetic
        name = uid
    return f"{name} ({uid})" if name != uid else uid


def _decoder_problem(uid: str, bits_stored: int = 8, bits_allocated: int = 8) -> Optional[str]:
    """Why pixel data in transfer syntax `uid` cannot be decoded here, or None when it can.

    JPEG Extended with samples other than 8 bits (12-bit X-rays): pydicom lists Pillow as its decoder, but
    Pillow refuses such data at the first frame (pydicom 3 when BitsStored != 8, pydicom 2 when
    BitsAllocated != 8); another plugin (pylibjpeg-libjpeg, gdcm) must be there, or the file fails here."""
    if uid in _UNCOMPRESSED:
        return None
    name = _syntax_name(uid)
    if uid.startswith(_VIDEO_SYNTAX_PREFIX):
        return (
            f"transfer syntax {name} is a video stream that pydicom does not decode; "
            "extract the encapsulated stream with a DICOM toolkit (e.g. GDCM's gdcmraw) and open the video file"
        )
    hint = _DECODER_PACKAGES.get(uid, "a decoder plugin for it (see pydicom's 'supported transfer syntaxes')")
    pydicom = _pydicom()
    if _major() >= 3:
        try:
            decoder = pydicom.pixels.get_decoder(uid)
        except (NotImplementedError, ValueError):
            return f"transfer syntax {name} is not supported by pydicom {pydicom.__version__}; install {hint}"
        plugins = set(getattr(decoder, "available_plugins", ()) or ())
        if uid == _JPEG_EXTENDED and bits_stored != 8:
            if plugins - {"pillow"}:
                return None
            return _twelve_bit_problem(name, bits_stored, plugins)
        if decoder.is_available:
            return None
        return f"no installed decoder handles transfer syntax {name}; install {hint}"
    pillow_fails = uid == _JPEG_EXTENDED and bits_allocated != 8
    pillow_there = False
    handlers = getattr(pydicom.config, "pixel_data_handlers", [])
    for handler in handlers:
        try:
            if not (handler.is_available() and handler.supports_transfer_syntax(uid)):
                continue
            if pillow_fails and str(getattr(handler, "__name__", "")).endswith("pillow_handler"):
                pillow_there = True
                continue
            if str(getattr(handler, "__name__", "")).endswith("pylibjpeg_handler"):
                # pydicom 2 claims every pylibjpeg syntax once pylibjpeg is there; the plugin decides
                for syntaxes, flag in (
                    ("_LIBJPEG_SYNTAXES", "HAVE_LIBJPEG"),
                    ("_OPENJPEG_SYNTAXES", "HAVE_OPENJPEG"),
                    ("_RLE_SYNTAXES", "HAVE_RLE"),
                ):
                    if uid in getattr(handler, syntaxes, ()) and not getattr(handler, flag, True):
                        break
                else:
                    return None
                continue
            return None
        except Exception:  # noqa: BLE001 - a broken optional handler is just not available
            continue
    if pillow_fails:
        return _twelve_bit_problem(name, bits_stored, {"pillow"} if pillow_there else set())
    return f"no installed decoder handles transfer syntax {name}; install {hint}"


def _twelve_bit_problem(name: str, bits_stored: int, plugins: Any) -> str:
    only = "Pillow, the decoder installed, decodes only 8-bit samples" if "pillow" in plugins else "no decoder is installed"
    return (f"transfer syntax {name} with {bits_stored} bits stored: {only}; install {_LIBJPEG}")


def _fg_value(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
    """`keyword` from the top level, else from the enhanced multi-frame functional groups for `frame`."""
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    for groups_kw, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups is None or i >= len(groups):
            continue
        seq = groups[i].get(sequence)
        if seq is None or len(seq) == 0:
            continue
        value = seq[0].get(keyword)
        if value is not None and value != "":
            return value
    return None


def _window(values: NDArray[np.float64], center: float, width: float, function: str) -> NDArray[np.float64]:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) straight to the output range 0..255 (float)."""
    if function == "SIGMOID":
        out: NDArray[np.float64] = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return out
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    # LINEAR (the default): width >= 1; width 1 is a threshold at center - 0.5
    if width <= 1.0:
        return np.where(values <= center - 0.5, 0.0, 255.0)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0) * 255.0


def _damaged_header(where: str, exc: BaseException) -> SourceError:
    """A header element pydicom cannot convert (a damaged VR or value). Only the error's type is named:
    pydicom's message may quote the element's value."""
    return SourceError(f"{where} has a damaged header element ({type(exc).__name__}); the file may be damaged; "
                       "check it with a DICOM toolkit (e.g. dcmdump) or export it again")


def _sop_class(ds: Any) -> Optional[str]:
    """The file's SOP class UID (file meta first: it comes first in the file), or None."""
    meta = getattr(ds, "file_meta", None)
    return _uid_or_none((meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID"))


def _image_class(ds: Any) -> bool:
    """Whether the file's SOP class is an image storage class, whose files always hold pixel data (unlike
    a DICOMDIR, report or presentation state)."""
    uid = _sop_class(ds)
    if uid is None:
        return False
    try:
        name = str(_pydicom().uid.UID(uid).name)
    except Exception:  # noqa: BLE001 - an unknown class is not known to be an image
        return False
    return "Image Storage" in name


def _fit_stored(arr: NDArray[Any], bits_stored: int, signed: bool) -> NDArray[Any]:
    """Integer pixels of `bits_stored` bits in a wider sample (12 of 16): signed data sign-extended from its
    top stored bit (the unused high bits may be left zero, PS3.5 8.1.1: pydicom 2 does not extend them, so
    stored -2048 would read as 2048), unsigned data masked to its stored bits. Data already extended (pydicom
    3) or with zero high bits comes back unchanged; anything not an integer array is returned as it is."""
    if arr.dtype.kind not in "iu":
        return arr
    width = arr.dtype.itemsize * 8
    if not 0 < bits_stored < width:
        return arr
    if signed:
        as_signed = arr.astype(np.dtype(arr.dtype.str.replace("u", "i")), copy=False)
        shift = as_signed.dtype.type(width - bits_stored)
        extended: NDArray[Any] = np.right_shift(np.left_shift(as_signed, shift), shift)
        return extended
    masked: NDArray[Any] = np.bitwise_and(arr, arr.dtype.type((1 << bits_stored) - 1))
    return masked


_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian as every encapsulated syntax is
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)


def _count_items(f: Any, end: int, *, delimited: bool) -> Tuple[int, bool, bool]:
    """(items, whether `end` comes inside an item or before the sequence delimiter, whether an item header is
    damaged) of encapsulated pixel data read from `f`'s position on; only the 8-byte item headers are read.
    `delimited`: the value as in the file (ends with the delimiter), else as pydicom keeps it (without)."""
    count = 0
    pos = f.tell()
    while True:
        head = f.read(8)
        if len(head) < 8:
            return count, delimited or len(head) > 0, False
        if head[:4] == _SEQUENCE_END:
            return count, False, False
        size = int.from_bytes(head[4:], "little")
        if head[:4] != _ITEM or size == _UNDEFINED:
            return count, False, True
        pos += 8 + size
        if pos > end:
            return count, True, False
        f.seek(pos)
        count += 1


_PALETTE_DATA = (0x00281201, 0x00281202, 0x00281203)  # Red, Green, Blue Palette Color Lookup Table Data
_SEGMENTED_DATA = (0x00281221, 0x00281222, 0x00281223)  # Segmented Red, Green, Blue Palette Color LUT Data


def _value_length(ds: Any, tag: int) -> Optional[int]:
    """The byte length of element `tag`'s value, without reading a value left on disk; None when absent."""
    elem = getattr(ds, "_dict", {}).get(tag)
    if elem is None:
        return None
    value = getattr(elem, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if value is None:
        length = getattr(elem, "length", None)
        return int(length) if isinstance(length, int) and length != _UNDEFINED else 0
    return 2 * len(value) if hasattr(value, "__len__") else 2  # read as US: 2 bytes an entry


def _palette_problem(ds: Any) -> Optional[str]:
    """What a PALETTE COLOR file lacks for pydicom's apply_color_lut (what the frames go through), or None.
    As it reads them: the red descriptor (entries, first value, bits), then the three LUT Data of one entry
    size (8 or 16 bits) and length, or else the three Segmented LUT Data."""
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    if desc is None or not hasattr(desc, "__len__") or len(desc) != 3:
        return "no 3-value Red Palette Color Lookup Table Descriptor"
    entries = int(desc[0]) or 65536  # 0 means 2**16 entries
    sizes = [_value_length(ds, tag) for tag in _PALETTE_DATA]
    if any(sizes):
        if not all(sizes) or len(set(sizes)) != 1 or sizes[0] not in (entries, 2 * entries):
            return (f"its Lookup Table Data hold {'/'.join(str(n or 0) for n in sizes)} bytes where the descriptor "
                    f"says {entries} entries of 8 or 16 bits each")
        return None
    segmented = [_value_length(ds, tag) for tag in _SEGMENTED_DATA]
    if not any(segmented):
        return "no Palette Color Lookup Table Data"
    if not all(segmented) or int(desc[2]) not in (8, 16):
        return "its Segmented Lookup Table Data are incomplete, or not of 8 or 16 bits"
    return None


def _to_u8(values: NDArray[Any]) -> Image:
    out: Image = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


class DicomFile:
    """One DICOM file's header facts (no pixels kept), and its frames decoded on demand.

    `probe(path)` returns None for files that are not DICOM; it raises SourceError for DICOM files
    that hold no image (no PixelData) or an image this module cannot turn into frames.
    `iter_frames(start)` yields `(image, meta)` for frames start..frames-1.
    """

    def __init__(self, path: str, ds: Any, where: str) -> None:
        self.path = path
        self.where = where
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        self.transfer_syntax: str = str(syntax).strip() if syntax else "1.2.840.10008.1.2"
        self.frames: int = max(1, int(_number(ds.get("NumberOfFrames")) or 1))
        self.rows: int = int(_number(ds.get("Rows")) or 0)
        self.cols: int = int(_number(ds.get("Columns")) or 0)
        self.samples: int = int(_number(ds.get("SamplesPerPixel")) or 1)
        self.photometric: str = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        self.bits_allocated: int = int(_number(ds.get("BitsAllocated")) or 0)
        self.bits_stored: int = int(_number(ds.get("BitsStored")) or self.bits_allocated)
        self.signed: bool = int(_number(ds.get("PixelRepresentation")) or 0) == 1
        self.modality: Optional[str] = _modality_or_none(ds.get("Modality"))
        self.instance_number: Optional[int] = (
            int(_number(ds.get("InstanceNumber")) or 0) if _number(ds.get("InstanceNumber")) is not None else None
        )
        self.sop_hash: Optional[str] = _uid_hash(ds.get("SOPInstanceUID"))
        self.key_id: str = source_key_info()["key_id"]  # the key of sop_hash and source_id
        self.fps: Optional[float] = _fps_of(ds)

    @property
    def size(self) -> Size:
        """(width, height)"""
        return (self.cols, self.rows)

    @classmethod
    def probe(
        cls, path: str, where: Optional[str] = None, *, force: bool = False, images_only: bool = False
    ) -> Optional[DicomFile]:
        """Read the header of `path` (pixel data stays on disk). None when it is not DICOM.

        `force` also tries files without the Part 10 preamble (a .dcm file named as such by the user).
        A DICOM file without pixel data (DICOMDIR, report) raises SourceError, or gives None with
        `images_only` (folders, where such files are skipped). Unusable images, and files with the 'DICM'
        marker that are damaged or cut short (an image SOP class without pixel data), raise SourceError.
        """
        pydicom = _pydicom()
        where = where or "DICOM file"
        if not force and not is_dicom_file(path):
            return None
        try:
            # Values over 1 KiB (the pixel data) stay on disk: read later, frame by frame.
            ds = pydicom.dcmread(path, defer_size=1024, force=force)
        except OSError as exc:
            raise SourceError(f"{where} could not be read ({type(exc).__name__}); check that it is readable") from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a file that is not DICOM
            if is_dicom_file(path):  # says it is DICOM but cannot be parsed: damaged, not to be skipped
                raise _damaged_header(where, exc) from None
            return None
        try:
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                # pydicom stops quietly at the end of a half-copied file, and reads garbage after a
                # 'DICM' marker as an empty data set: both are damaged files, not files to skip
                if _image_class(ds) or (_sop_class(ds) is None and is_dicom_file(path)):
                    raise SourceError(
                        f"{where} is a DICOM file cut short or damaged (an image without its Pixel Data, or no "
                        "readable header; e.g. a half-finished copy); supported: complete files; copy or export it again"
                    )
                if images_only or ("SOPClassUID" not in ds and "Rows" not in ds):
                    return None  # a DICOMDIR/report in a folder, or what a forced read makes of another file
                raise SourceError(
                    f"{where} holds no image (no Pixel Data; e.g. a DICOMDIR, report or presentation state); "
                    "supported: DICOM images; point at the image files"
                )
            out = cls(path, ds, where)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom converts values lazily: a damaged element fails here
            raise _damaged_header(where, exc) from None
        out.check()
        try:
            out._check_data(ds)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged LUT descriptor met while checking the palette
            raise _damaged_header(where, exc) from None
        return out

    def check(self) -> None:
        """Raise SourceError when the frames cannot be produced here (photometric, bits, decoder)."""
        where = self.where
        if self.photometric not in _SUPPORTED_PI:
            # only a value DICOM defines is echoed: free text there (a name typed into it) is not
            shown = repr(self.photometric) if self.photometric in _KNOWN_PI else (
                "'(none)'" if not self.photometric else "(not a DICOM-defined value)")
            raise SourceError(
                f"{where} has PhotometricInterpretation {shown}; supported: "
                + ", ".join(_SUPPORTED_PI)
                + "; convert it with a DICOM toolkit"
            )
        if self.bits_allocated not in (1, 8, 16, 32) or self.rows <= 0 or self.cols <= 0:
            raise SourceError(
                f"{where} has {self.bits_allocated} bits allocated and {self.cols}x{self.rows} pixels; "
                "supported: 8, 16 or 32 bits and a non-empty image; the file may be damaged"
            )
        problem = _decoder_problem(self.transfer_syntax, self.bits_stored, self.bits_allocated)
        if problem is not None:
            raise SourceError(f"{where} cannot be decoded: {problem}")

    def _check_data(self, ds: Any) -> None:
        """Raise SourceError when the file does not hold what its header says, found from the header and the
        file's size without decoding (so a file cut short fails when the source opens, not after other files'
        results were written): native pixel data shorter than frames x rows x columns x samples x bits (a file
        that ends inside it, or a header that claims more frames), encapsulated pixel data with fewer fragments
        than frames or a fragment the file ends inside, PALETTE COLOR without its lookup tables."""
        if self.photometric == "PALETTE COLOR":
            problem = _palette_problem(ds)
            if problem is not None:
                raise SourceError(
                    f"{self.where} is PALETTE COLOR without its palette ({problem}); supported: PALETTE COLOR with its "
                    "Red, Green and Blue Palette Color Lookup Table Descriptor and Data; the file may be damaged; "
                    "export it again"
                )
        elem = getattr(ds, "_dict", {}).get(_PIXEL_DATA)
        if elem is None:
            return  # Float/Double Float Pixel Data: not checked here
        value = getattr(elem, "value", None)
        held = bytes(value) if isinstance(value, (bytes, bytearray)) else None
        length = getattr(elem, "length", None)
        offset = getattr(elem, "value_tell", None)  # where the value starts in the file (a raw element)
        undefined = length == _UNDEFINED or bool(getattr(elem, "is_undefined_length", False))
        if self.transfer_syntax in _UNCOMPRESSED:
            if not undefined:
                self._check_native(held, length, offset)
        elif undefined:
            self._check_fragments(held, offset)

    def _check_native(self, held: Optional[bytes], length: Any, offset: Any) -> None:
        if held is not None:
            have, ends_inside = len(held), isinstance(length, int) and len(held) < length
        elif isinstance(length, int) and isinstance(offset, int) and self.transfer_syntax != _DEFLATED:
            # the value was left on disk: the file may end before the length its element header gives
            on_disk = max(0, os.path.getsize(self.path) - offset)
            have, ends_inside = min(length, on_disk), on_disk < length
        else:
            return  # a deflated file's value lies in the inflated stream: inflating it checked it
        frame_bits = self.rows * self.cols * self.samples * self.bits_allocated
        if self.photometric == "YBR_FULL_422" and self.samples == 3:
            frame_bits = frame_bits // 3 * 2  # two samples a pixel on disk
        if frame_bits <= 0 or have * 8 >= frame_bits * self.frames:  # odd lengths are padded: more is fine
            return
        whole = have * 8 // frame_bits
        self._refuse_short(whole, ends_inside)

    def _check_fragments(self, held: Optional[bytes], offset: Any) -> None:
        """Encapsulated pixel data: a Basic Offset Table item, then fragments, each frame in one or more of its
        own (PS3.5 A.4): fewer fragments than frames cannot be decoded. Only the item headers are read."""
        if held is not None:
            found, ends_inside, bad = _count_items(io.BytesIO(held), len(held), delimited=False)
        elif isinstance(offset, int):
            with open(self.path, "rb", buffering=0) as f:  # unbuffered: 8-byte reads far apart
                f.seek(offset)
                found, ends_inside, bad = _count_items(f, os.fstat(f.fileno()).st_size, delimited=True)
        else:
            return
        if bad:
            raise SourceError(
                f"{self.where} has damaged encapsulated pixel data (not a sequence of items); supported: pixel data "
                f"as its transfer syntax {_syntax_name(self.transfer_syntax)} encodes it; the file may be damaged; "
                "copy or export it again"
            )
        fragments = max(0, found - 1)  # the first item is the Basic Offset Table
        if ends_inside:
            raise SourceError(
                f"{self.where} is cut short: the file ends inside its pixel data, after {fragments} complete "
                f"fragment(s) of its {self.frames} frame(s) (e.g. a half-finished copy); supported: complete files; "
                "copy or export it again"
            )
        if fragments < self.frames:
            raise SourceError(
                f"{self.where} is damaged: its pixel data holds {fragments} fragment(s) for the {self.frames} frames "
                f"its header says (Number of Frames; every frame has one fragment or more; "
                f"{_syntax_name(self.transfer_syntax)}); supported: pixel data for every frame; copy or export it again"
            )

    def _refuse_short(self, whole: int, ends_inside: bool) -> None:
        what = f"{self.cols}x{self.rows}, {self.samples} sample(s) of {self.bits_allocated} bits a pixel"
        if ends_inside:
            raise SourceError(
                f"{self.where} is cut short: its pixel data holds {whole} of the {self.frames} frames its header says "
                f"({what}; the file ends inside its pixel data, e.g. a half-finished copy); supported: complete "
                "files; copy or export it again"
            )
        raise SourceError(
            f"{self.where} is damaged: its pixel data holds {whole} of the {self.frames} frames its header says "
            f"(Number of Frames; {what}); supported: pixel data for every frame; copy or export it again"
        )

    def _meta(self, k: int, voi: str) -> Dict[str, Any]:
        return _whitelisted({
            "source": "dicom",
            "file_frame": k,
            "file_frames": self.frames,
            "modality": self.modality,
            "photometric": self.photometric,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "transfer_syntax": _uid_or_none(self.transfer_syntax),
            "sop_uid_hash": self.sop_hash,
            "key_id": self.key_id,
            "voi": voi,
        })

    # ------------------------------------------------------------------------------------ decoding

    def iter_frames(self, start: int = 0) -> Iterator[Tuple[Image, Dict[str, Any]]]:
        """Frames start..frames-1 as (uint8 image, meta). Decode failures raise a one-line SourceError."""
        pydicom = _pydicom()
        try:
            ds = pydicom.dcmread(self.path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{self.where} could not be read again ({type(exc).__name__}); was it changed?") from None
        lo_hi: Optional[Tuple[float, float]] = None
        try:
            if self._mono_voi and not self._has_voi(ds):
                lo, hi = np.inf, -np.inf
                for i, raw in self._raw_frames(0):
                    values = self._modality(raw, ds, i)
                    lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
                lo_hi = (lo, hi)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged element met while reading the value range
            raise _damaged_header(self.where, exc) from None
        for i, raw in self._raw_frames(start):
            try:
                image, voi = self._display(raw, ds, i, lo_hi)
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001 - LUT helpers raise ValueError, IndexError, ...
                first = _withhold(" ".join(str(exc).split()))[:200]  # a decoder may name the path
                raise SourceError(
                    f"{self.where} frame {i} could not be converted to 8 bits ({type(exc).__name__}: {first}); "
                    f"photometric {self.photometric}, {self.bits_stored} bits stored; the file's LUTs may be damaged"
                ) from None
            yield image, self._meta(i, voi)

    @property
    def _mono_voi(self) -> bool:
        """Monochrome data that goes through modality LUT and VOI (more than 8 bits, or signed)."""
        return self.photometric in _MONO and (self.bits_allocated > 8 or self.signed)

    def _has_voi(self, ds: Any) -> bool:
        if ds.get("VOILUTSequence"):
            return True
        for k in range(self.frames if ds.get("PerFrameFunctionalGroupsSequence") else 1):
            center = _number(_fg_value(ds, k, "FrameVOILUTSequence", "WindowCenter"))
            width = _number(_fg_value(ds, k, "FrameVOILUTSequence", "WindowWidth"))
            if center is None or width is None or width <= 0:
                return False
        return True

    def _raw_frames(self, start: int) -> Iterator[Tuple[int, NDArray[Any]]]:
        """(index, decoded array) per frame, colour already RGB for RGB/YBR data. One frame at a time
        (pydicom 2 too): a long cine is never decoded whole."""
        if start >= self.frames:
            return
        # monochrome samples wider than their stored bits: sign-extended or masked here, under pydicom 2 and 3
        # alike, so that the value range read before the first frame sees the same values as the frames
        fit = self.photometric in _MONO and self.bits_allocated > 1 and 0 < self.bits_stored < self.bits_allocated
        frames: Any = None
        try:
            frames = self._v3_frames(start) if _major() >= 3 else self._v2_frames(start)
            for k, arr in frames:
                yield k, (_fit_stored(arr, self.bits_stored, self.signed) if fit else arr)
        except SourceError:
            raise
        except GeneratorExit:
            raise
        except MemoryError:
            raise SourceError(f"{self.where} is too large to decode in memory; split or downsample it") from None
        except Exception as exc:  # noqa: BLE001 - decoder plugins raise anything
            first = _withhold(" ".join(str(exc).split()))[:200]  # a decoder may name the path
            raise SourceError(
                f"{self.where} could not be decoded ({type(exc).__name__}: {first}); transfer syntax "
                f"{_syntax_name(self.transfer_syntax)}; the file may be damaged or need another decoder"
            ) from None
        finally:
            if frames is not None:
                frames.close()  # the decoder's generator closed with this one (a source closed early)

    def _v3_frames(self, start: int) -> Iterator[Tuple[int, NDArray[Any]]]:
        """pydicom 3: frames read from the file one by one (pydicom's iter_pixels on the path).

        iter_pixels on a path reads the data set in the encoding its transfer syntax names, while dcmread
        also copes with files that break it (an implicit VR data set under a JPEG syntax, as some writers
        made): when reading from the path fails before the first frame, the frames are decoded once more
        from the data set dcmread makes of the file (pixel data in memory, as compressed in the file)."""
        source = self._v3_source()
        yielded = False
        try:
            for item in self._v3_iter(source, start):
                yielded = True
                yield item
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - whatever iter_pixels raised: dcmread may still read the file
            if yielded or not isinstance(source, str):
                raise
            logger.debug("%s: read again as a whole data set after reading it in place failed", self.where)
            yield from self._v3_iter(self._whole_data_set(), start)

    def _v3_whole(self) -> bool:
        """Native multi-frame data that pydicom 3.0's iter_pixels cannot split into frames (it fails with
        "cannot reshape"), while its pixel_array decodes the whole: YBR_FULL_422 (2 bytes a pixel on disk)
        and 1-bit frames that do not end on a byte."""
        if self.frames <= 1 or self.transfer_syntax not in _UNCOMPRESSED:
            return False
        if self.photometric == "YBR_FULL_422":
            return True
        return self.bits_allocated == 1 and (self.rows * self.cols * self.samples) % 8 != 0

    def _v3_iter(self, source: Any, start: int) -> Iterator[Tuple[int, NDArray[Any]]]:
        if self._v3_whole():
            # decoded whole, as pydicom 2's path does for such data; colour converted as iter_pixels does
            arr: NDArray[Any] = _utils().pixel_array(source, raw=False)
            for k in range(start, self.frames):
                yield k, arr[k]
            return
        gen: Any = _utils().iter_pixels(source, indices=range(start, self.frames), raw=False)
        try:
            for k, arr in enumerate(gen):
                yield start + k, arr
        finally:
            gen.close()

    def _v3_source(self) -> Any:
        """What pydicom 3 decodes from: the path (read frame by frame), or the data set read whole for a
        deflated file (iter_pixels reads a path as it lies on disk, and a deflated data set must be
        inflated first: the file is inflated in memory) or for a file without the Part 10 header (a bare
        data set named .dcm: its transfer syntax filled in)."""
        if _dicom_marker(self.path) and self.transfer_syntax != _DEFLATED:
            return self.path
        return self._whole_data_set()

    def _whole_data_set(self) -> Any:
        """The data set read whole by dcmread, a bare data set given the transfer syntax it was read as."""
        pydicom = _pydicom()
        ds = pydicom.dcmread(self.path, force=True)
        self._fill_syntax(ds)
        return ds

    @staticmethod
    def _fill_syntax(ds: Any) -> None:
        pydicom = _pydicom()
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            return
        uid = pydicom.uid
        if _major() >= 3:
            implicit, little = getattr(ds, "original_encoding", (True, True))
            syntax = uid.ImplicitVRLittleEndian if implicit else (
                uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
            )
        else:
            syntax = uid.ImplicitVRLittleEndian if ds.is_implicit_VR else uid.ExplicitVRLittleEndian
        ds.file_meta = pydicom.dataset.FileMetaDataset() if meta is None else meta
        ds.file_meta.TransferSyntaxUID = syntax

    def _v2_frames(self, start: int) -> Iterator[Tuple[int, NDArray[Any]]]:
        """pydicom 2 (Python 3.8, JetPack 5: pydicom 3 needs Python 3.10): one frame at a time as well.

        pydicom 2 decodes only all frames at once (ds.pixel_array), so each frame is handed to it as a data
        set of its own: the file's header with one frame's pixel data. Native data is read from the file
        frame by frame (the Pixel Data stays on disk, except in a deflated file, inflated in memory);
        encapsulated data is read whole as compressed in the file and split into its frames. A single frame,
        1-bit frames that do not end on a byte, and odd-length big endian frames are decoded whole."""
        pydicom = _pydicom()
        from pydicom.pixel_data_handlers.util import get_expected_length

        native = self.transfer_syntax in _UNCOMPRESSED
        ds = pydicom.dcmread(self.path, force=True, defer_size=None if self.transfer_syntax == _DEFLATED else 1024)
        self._fill_syntax(ds)
        if self.frames == 1 or "PixelData" not in ds:
            if self.frames == 1 and "NumberOfFrames" in ds:
                ds.NumberOfFrames = 1  # a 0 there is read as 1 frame (as pydicom 3 does); pydicom 2 cannot reshape it
            yield from self._v2_whole(ds, start)
            return
        # pydicom 2's raw element: value None and value_tell (its offset in the file) when read deferred.
        # (Dataset.get_item would read it: the element is taken from the data set's dict, as pydicom 2.4,
        # the last pydicom 2, keeps it.)
        elem = getattr(ds, "_dict", {}).get(0x7FE00010)
        if native:
            ds.NumberOfFrames = 1
            frame_len = int(get_expected_length(ds, "bytes"))
            ds.NumberOfFrames = self.frames
            in_memory = getattr(elem, "value", None)  # bytes, or None when left on disk
            offset = getattr(elem, "value_tell", None)
            total = int(getattr(elem, "length", 0) or 0)
            bits = self.rows * self.cols * self.samples * self.bits_allocated
            if (
                (in_memory is None and not isinstance(offset, int))
                or not frame_len * self.frames <= total < 0xFFFFFFFF
                or (self.bits_allocated == 1 and bits % 8 != 0)
                or (not getattr(ds, "is_little_endian", True) and frame_len % 2 != 0)
            ):
                yield from self._v2_whole(ds, start)  # pydicom 2's own checks and errors
                return
            del ds[0x7FE00010]  # setting a deferred element's value would read it whole first
            ds.NumberOfFrames = 1
            with open(self.path, "rb") as f:
                for k in range(start, self.frames):
                    if in_memory is not None:
                        data = bytes(in_memory[k * frame_len:(k + 1) * frame_len])
                    else:
                        f.seek(int(offset or 0) + k * frame_len)
                        data = f.read(frame_len)
                    yield k, self._v2_one(ds, data, "OW" if self.bits_allocated > 8 else "OB", False)
            return
        from pydicom.encaps import encapsulate, generate_pixel_data_frame

        stream = ds.PixelData  # as compressed in the file
        ds.NumberOfFrames = 1
        found = 0
        for k, frame in enumerate(generate_pixel_data_frame(stream, self.frames)):
            if k >= self.frames:
                break
            found = k + 1
            if k >= start:
                yield k, self._v2_one(ds, encapsulate([frame]), "OB", True)
        if found < self.frames:
            raise ValueError(f"the pixel data holds {found} frames where Number of Frames says {self.frames}")

    def _v2_one(self, ds: Any, data: bytes, vr: str, encapsulated: bool) -> NDArray[Any]:
        """One frame's pixels through pydicom 2, colour as RGB. `data` is a new object while the previous
        frame's is still the data set's value: pydicom 2 caches pixel_array by the id of the Pixel Data, and
        two live objects never share an id."""
        ds.PixelData = data
        ds["PixelData"].VR = vr
        if encapsulated:
            ds["PixelData"].is_undefined_length = True
        arr: NDArray[Any] = ds.pixel_array
        out: NDArray[Any] = self._v2_color(arr[None])[0]
        return out

    def _v2_whole(self, ds: Any, start: int) -> Iterator[Tuple[int, NDArray[Any]]]:
        arr: NDArray[Any] = ds.pixel_array
        if self.frames == 1:
            arr = arr[None]
        arr = self._v2_color(arr)
        for k in range(start, self.frames):
            yield k, arr[k]

    def _v2_color(self, arr: NDArray[Any]) -> NDArray[Any]:
        """(frames, rows, cols[, 3]) with YBR_FULL* converted to RGB (pydicom 2 leaves it to the caller)."""
        if self.photometric in ("YBR_FULL", "YBR_FULL_422") and arr.ndim == 4:
            from pydicom.pixel_data_handlers.util import convert_color_space

            out: NDArray[Any] = convert_color_space(arr, self.photometric, "RGB", per_frame=True)
            return out
        return arr

    def _modality(self, raw: NDArray[Any], ds: Any, k: int) -> NDArray[np.float64]:
        """Stored values -> modality values (Modality LUT, or rescale slope/intercept), float64."""
        if ds.get("ModalityLUTSequence"):
            out: NDArray[np.float64] = np.asarray(_utils().apply_modality_lut(raw, ds), np.float64)
            return out
        slope = _number(_fg_value(ds, k, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _number(_fg_value(ds, k, "PixelValueTransformationSequence", "RescaleIntercept"))
        values = raw.astype(np.float64)
        if slope is not None and slope != 0:
            values = values * slope
        if intercept is not None:
            values = values + intercept
        return values

    def _display(
        self, raw: NDArray[Any], ds: Any, k: int, lo_hi: Optional[Tuple[float, float]]
    ) -> Tuple[Image, str]:
        pi = self.photometric
        if pi in _MONO:
            if raw.ndim != 2:
                raw = raw.reshape(raw.shape[0], raw.shape[1])
            if not self._mono_voi:
                # 8 bits allocated: the stored values, scaled from 0..2**BitsStored-1 to 0..255 when fewer
                # than 8 bits are stored (1-bit data: 0/1 -> 0/255), so that the top stored value is white
                # (MONOCHROME2) or, inverted below, black (MONOCHROME1; PS3.3 C.7.6.3.1.2)
                bits = 1 if (self.bits_allocated == 1 or raw.dtype == np.bool_) else self.bits_stored
                if 1 <= bits < 8:
                    image = _to_u8(raw.astype(np.float64) * (255.0 / (2 ** bits - 1)))
                else:
                    image = raw.astype(np.uint8)
                voi = "none"
            else:
                image, voi = self._voi(raw, ds, k, lo_hi)
            if pi == "MONOCHROME1":
                image = 255 - image
            return np.ascontiguousarray(image), voi
        if pi == "PALETTE COLOR":
            rgb = _utils().apply_color_lut(raw, ds)
            bits = 16
            desc = ds.get("RedPaletteColorLookupTableDescriptor")
            if desc is not None and len(desc) == 3 and int(desc[2]) == 8:
                bits = 8
            if rgb.dtype == np.uint8 or bits == 8:
                return np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8)), "palette"
            return _to_u8(rgb.astype(np.float64) * (255.0 / 65535.0)), "palette"
        # RGB-like
        if raw.ndim != 3 or raw.shape[2] != 3:
            raise SourceError(
                f"{self.where} frame {k} decoded to shape {raw.shape}; expected (rows, cols, 3) for {pi}; "
                "the file may be damaged"
            )
        if raw.dtype == np.uint8:
            return np.ascontiguousarray(raw), "none"
        top = float(2 ** min(max(self.bits_stored, 1), 32) - 1)
        return _to_u8(raw.astype(np.float64) * (255.0 / top)), "none"

    def _voi(
        self, raw: NDArray[Any], ds: Any, k: int, lo_hi: Optional[Tuple[float, float]]
    ) -> Tuple[Image, str]:
        values = self._modality(raw, ds, k)
        if ds.get("VOILUTSequence"):
            out, bits = self._voi_lut(values, ds)
            top = float(2 ** max(1, min(bits, 16)) - 1)
            return _to_u8(out * (255.0 / top)), "lut"
        center = _number(_fg_value(ds, k, "FrameVOILUTSequence", "WindowCenter"))
        width = _number(_fg_value(ds, k, "FrameVOILUTSequence", "WindowWidth"))
        if center is not None and width is not None and width > 0:
            function = str(_fg_value(ds, k, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").strip().upper()
            return _to_u8(_window(values, center, width, function)), "window"
        lo, hi = lo_hi if lo_hi is not None else (float(values.min()), float(values.max()))
        if hi <= lo:
            return np.zeros(values.shape, np.uint8), "minmax"
        return _to_u8((values - lo) * (255.0 / (hi - lo))), "minmax"

    def _voi_lut(self, values: NDArray[np.float64], ds: Any) -> Tuple[NDArray[np.float64], int]:
        """The first VOI LUT applied to modality values: (output values, bits per LUT entry).

        Looked up here rather than by pydicom's apply_voi_lut, which builds its index in the LUT entries'
        dtype (uint8 for 8-bit entries), so that inputs over 255 wrap around to wrong pixels."""
        item = ds.VOILUTSequence[0]
        desc = item.get("LUTDescriptor")
        if desc is None or len(desc) != 3 or "LUTData" not in item:
            raise SourceError(f"{self.where} has a VOI LUT without a 3-value LUT Descriptor or LUT Data; "
                              "the file's LUTs may be damaged; export it again")
        entries = int(desc[0]) or 65536  # 0 means 2**16 entries
        first = int(desc[1])
        if self.signed and first >= 32768:  # read as US where the file meant SS
            first -= 65536
        bits = int(desc[2])
        raw = item.LUTData
        if isinstance(raw, (bytes, bytearray)):  # OW: 16-bit words, in the data set's byte order
            order = ">" if getattr(ds, "is_little_endian", True) is False else "<"
            if len(raw) == entries and bits <= 8:  # some writers pack 8-bit entries one per byte
                lut = np.frombuffer(bytes(raw), np.uint8).astype(np.float64)
            else:
                lut = np.frombuffer(bytes(raw[: len(raw) // 2 * 2]), order + "u2").astype(np.float64)
        else:  # US: one number or a list of them
            lut = np.asarray(raw if hasattr(raw, "__len__") else [raw], np.float64).ravel()
        if lut.size < entries:
            raise SourceError(f"{self.where} has a VOI LUT with {lut.size} entries where its descriptor says "
                              f"{entries}; the file's LUTs may be damaged; export it again")
        index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)
        return lut[index], bits


def _utils() -> Any:
    """pydicom's LUT helpers (pydicom.pixels in 3.x, pydicom.pixel_data_handlers.util in 2.x)."""
    _pydicom()
    if _major() >= 3:
        import pydicom.pixels as px

        return px
    from pydicom.pixel_data_handlers import util

    return util


# -------------------------------------------------------------------------------------------- source


def _ext_label(ext: str) -> str:
    """A file's extension for messages: only a known one. What splitext calls the extension of "Jane.Doe"
    or "DOE.JOHN.1" is part of a name."""
    if not ext:
        return "no extension"
    return ext if ext in DICOM_EXTENSIONS else "another extension"


def _series_files(folder: str) -> Tuple[List[str], int, int]:
    """Candidate files of a folder (not hidden, regular), how many were left out as hidden, and how many
    subfolders it holds (not hidden; not read: a series is the files directly in the folder)."""
    names = []
    hidden = folders = 0
    for name in _listdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            folders += int(not name.startswith(".") and os.path.isdir(path))
            continue
        if name.startswith("."):
            hidden += 1
            continue
        names.append(path)
    return names, hidden, folders


def _empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False  # unreadable: probe says so


class DicomSource(BaseSource):
    """A DICOM file or a folder of DICOM files (a series); every frame of every file, in order.

    Folder: files sorted by InstanceNumber, then by name (natural sort); hidden files, files that are
    not DICOM (no 'DICM' marker and not named .dcm/.dicom) and DICOM files without pixel data
    (DICOMDIR, reports) are skipped and counted in `skipped` (and `stats()`, for the run summary); a
    damaged or cut-short DICOM file (an empty .dcm too) is an error, never skipped (a series must not
    lose a file without a word). Subfolders are not read: counted in `folders_skipped` (in `stats()` when
    any) and warned about once, never by name. A multi-frame file (cine) yields each frame. `frame_count` is the sum of
    NumberOfFrames, `fps` the first file's FrameTime / CineRate / RecommendedDisplayFrameRate, `size`
    the first file's (width, height). Every file is checked when the source opens (photometric
    interpretation, bits, an installed decoder for its transfer syntax, and from its header and size
    without decoding: pixel data for every frame its header says, every fragment complete, a PALETTE
    COLOR file's lookup tables), so that an unusable file fails at once with a one-line SourceError
    naming its index, before any frame is read, not in the middle of a run. (A file that passes can
    still fail to decode, e.g. damaged compressed data: that error comes when its frames are read.)
    """

    kind = "dicom"

    def __init__(
        self,
        path: Union[str, Sequence[str]],
        *,
        loop: bool = False,
        size: Optional[Size] = None,
        source_id: str = "",
    ) -> None:
        self.skipped = 0
        self.folders_skipped = 0
        files = self._collect(path)
        self._files = files
        # Frames of each file, in order: a folder of single-frame films is independent images, a file with
        # several frames a cine (the pipeline smooths only cines).
        self.file_frames: Tuple[int, ...] = tuple(int(f.frames) for f in files)
        self._loop = loop
        self._file_pos = 0
        self._frames: Optional[Iterator[Tuple[Image, Dict[str, Any]]]] = None
        self.passes = 1
        first = files[0]
        super().__init__(
            fps=first.fps,
            size=first.size,
            frame_count=sum(f.frames for f in files),
            live=False,
            target_size=size,
            source_id=source_id or _short_hash(first.path),
        )
        logger.info(
            "opened DICOM %s: %d files (%d skipped), %d frames, %s fps, %dx%d %s",
            self.source_id,
            len(files),
            self.skipped,
            self.frame_count,
            self.fps,
            first.cols,
            first.rows,
            first.photometric,
        )
        _warn_subfolders(logger, self.folders_skipped)

    def stats(self) -> Dict[str, int]:
        """Files read, files skipped (hidden, not DICOM, no pixel data), passes and, when there were any,
        folders_skipped: subfolders of the folder, not read (for the run summary)."""
        out = {"files": len(self._files), "skipped": self.skipped, "passes": self.passes}
        if self.folders_skipped:
            out["folders_skipped"] = self.folders_skipped
        return out

    def _collect(self, path: Union[str, Sequence[str]]) -> List[DicomFile]:
        if isinstance(path, str) and os.path.isdir(path):
            candidates, hidden, self.folders_skipped = _series_files(path)
            self.skipped += hidden
            explicit = False
        elif isinstance(path, str):
            if not os.path.isfile(path):
                # the path is not quoted: file and folder names may carry a patient's name
                raise SourceError("the DICOM file given does not exist; check the path")
            candidates, explicit = [path], True
        else:
            candidates, explicit = list(path), True
        found: List[Tuple[Tuple[Any, ...], DicomFile]] = []
        count = len(candidates)
        candidates.sort(key=lambda p: natural_key(os.path.basename(p)))
        for i, p in enumerate(candidates):
            ext = os.path.splitext(p)[1].lower()
            where = f"DICOM file {i} of {count} ({_ext_label(ext)}, 0-based in name order)"
            if count == 1:
                where = "DICOM file"
            force = explicit or ext in DICOM_EXTENSIONS
            if force and _empty(p):
                # a copy that never got its bytes: cut short, not "not DICOM" (it would be skipped)
                raise SourceError(
                    f"{where} is empty (0 bytes; e.g. a half-finished copy); supported: complete DICOM files; "
                    "copy or export it again"
                )
            try:
                df = DicomFile.probe(p, where, force=force, images_only=not explicit)
            except SourceError:
                raise
            if df is None:
                if explicit:
                    raise SourceError(
                        f"{where} is not a DICOM file (no 'DICM' marker and no readable data set); "
                        "supported: DICOM Part 10 files; check the file"
                    )
                self.skipped += 1
                logger.debug("skipped a file that is not DICOM (%s)", _ext_label(ext))
                continue
            order = df.instance_number
            found.append(((order is None, order if order is not None else 0, natural_key(os.path.basename(p))), df))
        if not found:
            held = f"; it holds {self.folders_skipped} subfolder(s): subfolders are not read" if self.folders_skipped else ""
            raise SourceError(
                f"the source folder has no DICOM images ({self.skipped} files skipped: hidden, not DICOM or no pixel "
                f"data{held}); supported: a folder of DICOM Part 10 image files (.dcm or with the 'DICM' marker), "
                "without its subfolders; point at the series"
            )
        found.sort(key=lambda item: item[0])
        ordered = [df for _, df in found]
        for n, df in enumerate(ordered):
            if len(ordered) > 1:
                df.where = f"DICOM file {n} of {len(ordered)} (0-based in series order)"
        return ordered

    def _read(self, timeout: Optional[float]) -> Optional[Tuple[Image, Dict[str, Any]]]:
        while True:
            if self._frames is None:
                if self._file_pos >= len(self._files):
                    if not self._loop:
                        return None
                    self._file_pos = 0
                    self.passes += 1
                self._frames = self._files[self._file_pos].iter_frames()
            try:
                image, meta = next(self._frames)
            except StopIteration:
                self._frames = None
                self._file_pos += 1
                continue
            except SourceError:
                self._close_frames()
                raise
            meta["source_id"] = self.source_id
            meta["file_index"] = self._file_pos
            meta["pass"] = self.passes - 1
            return image, _whitelisted(meta)

    def _close_frames(self) -> None:
        frames, self._frames = self._frames, None
        if frames is not None and hasattr(frames, "close"):
            frames.close()

    def _release(self) -> None:
        self._close_frames()

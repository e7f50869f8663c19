"""Audio input: decode a file to 16 kHz mono, cut it into 30 s clips, and compute the log-mel
features and soft-token counts exactly as transformers 5.23's Gemma 4 feature extractor and
processor do (spec §5.1, §5.6).

Decoding uses libsndfile through `soundfile`: its wheels bundle libsndfile 1.2 with FLAC,
Ogg/Vorbis, Ogg/Opus and MP3 (mpg123) built in, with no ffmpeg install; the audio of M4A/MP4/WebM
containers, which it does not read, is decoded to WAV first by PyAV (whose wheels bundle FFmpeg).
Resampling uses libsoxr through `soxr` (a small numpy-only wheel, band-limited high-quality
filter, and a streaming API so long files never need a second full copy). Both are decoded block
by block: the peak memory is the 16 kHz float32 output plus one block.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import ffmpeg_url, media_file

SAMPLE_RATE = 16_000
MAX_CLIP_SAMPLES = 480_000  # 30 s: the feature extractor's max_length; longer audio is split
MAX_AUDIO_SECONDS = 2 * 60 * 60  # longest input load_audio accepts (2 h = 460 MB at 16 kHz)
MAX_SOFT_TOKENS_PER_CLIP = 750  # processor's audio_seq_length
# Samples are nominally in [-1, 1]; a float file past 1e4 (+80 dB over full scale) holds corrupt
# data, and values near float32's limit overflow the resampler and the FFT into NaN and inf.
MAX_SAMPLE_AMPLITUDE = 1e4

FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
NUM_MEL_BINS = 128
MEL_FLOOR = 1e-3
PAD_TO_MULTIPLE = 128  # the feature extractor's pad_to_multiple_of

_BLOCK_FRAMES = 1 << 16  # decode block (frames at the file's own rate)
# libsndfile decodes a container cut short as shorter audio; its log keeps the declared size of
# the chunk holding the samples: "<chunk> : <declared> (should be <available>)" (W64 names its
# whole-file chunk, its data line does not say), and for RF64 its 'ds64' frame count.
_CUT_CHUNK = {"WAV": "data", "WAVEX": "data", "W64": "riff", "AIFF": "SSND", "AU": "Data Size"}
_SHORT_CHUNK = {fmt: re.compile(rf"^\s*{chunk}\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
                for fmt, chunk in _CUT_CHUNK.items()}
_SHORT_RF64 = re.compile(r"Calculated frame count (\d+) does not match value from 'ds64' chunk of (\d+)")
_OGG_TAIL = 70_000  # bytes read from the end: more than one maximal Ogg page (65,307 bytes)


class AudioInputError(ValueError):
    """Audio we cannot use; the message is one line naming the input and the problem."""


# How the files libsndfile reads begin (its formats with a signature). Anything else it hands to
# its MPEG decoder as a last resort, which prints "Note: Illegal Audio-MPEG-Header" lines to the
# process's stderr and then fails with "File does not exist or is not a regular file".
_SIGNATURES = (b"RIFF", b"RIFX", b"RF64", b"BW64", b"riff", b"FORM", b".snd", b"dns.", b"fLaC", b"OggS",
               b"caff", b"Creative Voice File", b"NIST_1A", b" paf", b"fap ", b"2BIT", b"PVF1",
               b"Extended Instrument:", b"MATLAB 5.0", b"ALawSoundFile**", b"ID3")
_IRCAM = {bytes.fromhex(h) for h in ("64a30100", "0001a364", "64a30200", "0002a364", "64a30300", "0003a364",
                                     "64a30400", "0004a364")}


def _is_mpeg_frame(head: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, then no reserved version, layer, bitrate or rate."""
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 3, (head[1] >> 1) & 3
    return version != 1 and layer != 0 and head[2] >> 4 != 15 and (head[2] >> 2) & 3 != 3


def _known_audio(head: bytes) -> bool:
    return head.startswith(_SIGNATURES) or head[:4] in _IRCAM or _is_mpeg_frame(head)


def is_container(head: bytes) -> bool:
    """WebM/Matroska (EBML) or MP4/M4A (`ftyp`): files libsndfile cannot read; PyAV decodes them."""
    return head[:4] == b"\x1a\x45\xdf\xa3" or head[4:8] == b"ftyp"


def container_to_wav(source: io.BytesIO | str, label: str, charge: Callable[[float], None] | None = None) -> bytes:
    """Decode the first audio stream of a WebM/Matroska/MP4 file with PyAV (FFmpeg) to a mono
    float WAV at the file's own rate (then resampled as any other file). Decoding stops as soon as
    the audio is longer than MAX_AUDIO_SECONDS; `charge` hears the seconds decoded so far (the
    server's per-request budget raises from it)."""
    import av
    import soundfile as sf

    chunks, total, rate = [], 0, 0
    try:
        with av.open(ffmpeg_url(source) if isinstance(source, str) else source, mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioInputError(f"{label}: the file has no audio stream")
            if stream.codec_context is None:  # FFmpeg knows no decoder for it (PyAV then has no .rate)
                raise AudioInputError(f"{label}: the audio stream's codec is not supported")
            rate = int(stream.codec_context.sample_rate or 0)
            if rate <= 0:
                raise AudioInputError(f"{label}: the audio stream has no sample rate")
            # Packed float ("flt"): one interleaved plane whatever the channel count. Planar frames
            # of more than 8 channels keep their planes in FFmpeg's extended_data, which PyAV's
            # to_ndarray does not read: it read past the frame and crashed the process (fuzzing,
            # a 10-channel WAV sent as MP4).
            resampler = av.AudioResampler(format="flt", rate=rate)
            for frame in _with_end(container.decode(stream)):
                for out in resampler.resample(frame):
                    channels = max(1, out.layout.nb_channels)
                    samples = out.to_ndarray().reshape(-1, channels)  # (n, channels)
                    chunks.append(samples.mean(axis=1, dtype=np.float32))
                    total += samples.shape[0]
                    if charge is not None:
                        charge(total / rate)
                    if total > MAX_AUDIO_SECONDS * rate:
                        raise AudioInputError(f"{label}: audio exceeds the {MAX_AUDIO_SECONDS} s maximum")
    except AudioInputError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError, OSError) as e:
        raise AudioInputError(f"{label}: cannot decode audio ({' '.join(str(e).split())})") from None
    if not total:
        raise AudioInputError(f"{label}: the audio is empty")
    wave = np.concatenate(chunks)
    if not np.isfinite(wave).all():
        raise AudioInputError(f"{label}: contains non-finite (NaN/inf) samples")
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _with_end(frames):
    """The decoded frames, then None (which flushes the resampler)."""
    yield from frames
    yield None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_audio(source: str | Path | bytes | np.ndarray, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode WAV / FLAC / Ogg (Vorbis, Opus) / MP3, or M4A / MP4 / WebM audio (through PyAV), to
    mono float32 at `target_rate`.

    Channels are averaged; the rate is converted with soxr (HQ). A 1-D array (numpy, torch or a
    list) is taken as mono samples already at `target_rate`, as transformers' processor takes it.
    Raises AudioInputError for missing, empty, undecodable, truncated, non-finite, absurdly loud
    (> MAX_SAMPLE_AMPLITUDE) or over-long (> MAX_AUDIO_SECONDS) input.
    """
    import soundfile as sf

    if not isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        return _waveform(source, target_rate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = "<audio bytes>"
        data = bytes(source)
        if len(data) == 0:
            raise AudioInputError(f"{label}: empty input (0 bytes)")
        handle: object = io.BytesIO(data)
        head, tail = data[:32], data[-_OGG_TAIL:]
    else:
        path, label, size = media_file(source, AudioInputError)
        handle = str(path)
        with open(path, "rb") as raw:
            head = raw.read(32)
            raw.seek(max(0, size - _OGG_TAIL))
            tail = raw.read()
    if is_container(head):  # WebM/MP4/M4A: PyAV decodes them to a WAV that libsndfile reads
        wav = container_to_wav(handle, label)
        handle, head = io.BytesIO(wav), wav[:32]
    if not _known_audio(head):
        raise AudioInputError(f"{label}: not audio: its bytes begin as no WAV, FLAC, Ogg, MP3, M4A, WebM or "
                              "other format the decoders read")
    if target_rate <= 0:
        raise AudioInputError(f"{label}: target rate {target_rate} must be positive")
    try:
        with sf.SoundFile(handle) as f:
            if f.format == "OGG":
                _check_ogg_end(tail, label)
            return _decode(f, label, target_rate)
    except (sf.SoundFileError, RuntimeError) as e:
        reason = getattr(e, "error_string", None) or str(e).splitlines()[0]
        raise AudioInputError(
            f"{label}: cannot decode: not audio, or corrupt/truncated ({reason.strip()})"
        ) from None


def _waveform(samples, rate: int) -> np.ndarray:
    """Samples given as an array: checked as a decoded file's are, never resampled."""
    import torch

    label = f"<audio {type(samples).__name__}>"
    if isinstance(samples, torch.Tensor):  # not any object with a detach(): an open file has one
        samples = samples.detach().cpu()
        samples = (samples.float() if samples.is_floating_point() else samples).numpy()
    if isinstance(samples, np.ndarray) and samples.dtype.kind in "iub":
        # int16 PCM read as amplitudes: garbage when quiet, refused as too loud when not
        raise AudioInputError(f"{label}: integer samples ({samples.dtype}); give floats in [-1, 1] "
                              "(16-bit PCM: divide by 32768)")
    if not isinstance(samples, (np.ndarray, list, tuple)):
        raise AudioInputError(f"{label}: audio must be a file path, the file's bytes, or a 1-D array of "
                              f"{rate} Hz samples")
    try:
        wave = np.asarray(samples, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise AudioInputError(f"{label}: not an array of numbers ({' '.join(str(e).split())})") from None
    if wave.ndim != 1:
        raise AudioInputError(f"{label}: samples of shape {tuple(wave.shape)}; want one channel, a 1-D array "
                              f"of {rate} Hz samples (average the channels first)")
    if wave.size == 0:
        raise AudioInputError(f"{label}: contains no audio samples")
    if wave.size > MAX_AUDIO_SECONDS * rate:
        raise AudioInputError(f"{label}: {wave.size / rate:.0f} s of audio exceeds the {MAX_AUDIO_SECONDS} s maximum")
    _check_amplitude(wave, label)
    return np.array(wave, dtype=np.float32, copy=True)  # never the caller's buffer


def _check_amplitude(samples: np.ndarray, label: str) -> None:
    """AudioInputError for NaN/inf samples or ones far past full scale (MAX_SAMPLE_AMPLITUDE)."""
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if not peak <= MAX_SAMPLE_AMPLITUDE:  # NaN fails this too
        if not math.isfinite(peak):
            raise AudioInputError(f"{label}: contains non-finite (NaN/inf) samples")
        raise AudioInputError(f"{label}: contains samples of amplitude {peak:.3g}, far outside [-1, 1]")


def _decode(f, label: str, target_rate: int) -> np.ndarray:
    """Stream-decode an open SoundFile: block -> mono -> resample -> preallocated output."""
    import soxr

    rate, channels, declared = int(f.samplerate), int(f.channels), int(f.frames)
    if rate <= 0 or channels <= 0:
        raise AudioInputError(f"{label}: invalid header (rate {rate}, {channels} channels)")
    max_frames = MAX_AUDIO_SECONDS * rate
    if declared > max_frames:
        raise AudioInputError(
            f"{label}: {declared / rate:.0f} s of audio exceeds the {MAX_AUDIO_SECONDS} s maximum"
        )
    _check_container_length(f, label)
    resampler = (
        None if rate == target_rate else soxr.ResampleStream(rate, target_rate, 1, "float32", "HQ")
    )
    out = np.empty(math.ceil(max(declared, 1) * target_rate / rate) + 16, dtype=np.float32)
    filled = decoded = 0
    while True:
        block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (n, channels)
        last = len(block) < _BLOCK_FRAMES
        decoded += len(block)
        if decoded > max_frames:
            raise AudioInputError(f"{label}: audio exceeds the {MAX_AUDIO_SECONDS} s maximum")
        _check_amplitude(block, label)
        if channels == 1:
            mono = np.ascontiguousarray(block[:, 0])  # (n,)
        else:
            mono = block.mean(axis=1, dtype=np.float32)  # (n,) average of the channels
        chunk = resampler.resample_chunk(mono, last=last) if resampler is not None else mono
        if filled + len(chunk) > len(out):  # header under-declared the length: grow
            grown = np.empty(max(2 * len(out), filled + len(chunk)), dtype=np.float32)
            grown[:filled] = out[:filled]
            out = grown
        out[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
        if last:
            break
    if decoded == 0 or filled == 0:
        raise AudioInputError(f"{label}: contains no audio samples")
    if resampler is not None:  # the reference's length (librosa's): zero-padded or cut to ceil(n * target / rate)
        want = math.ceil(decoded * target_rate / rate)
        if want > len(out):
            out = np.concatenate((out[:filled], np.zeros(want - filled, dtype=np.float32)))
        else:
            out[filled:want] = 0
        filled = want
    # MP3 lengths come from a Xing/LAME tag or a bitrate estimate: allow 2% and two MPEG frames.
    slack = max(2 * 1152, declared // 50) if f.format == "MP3" else 0
    if declared - decoded > slack:
        raise AudioInputError(
            f"{label}: truncated or corrupt (header declares {declared} frames, decoded {decoded})"
        )
    return out[:filled] if filled > 0.9 * len(out) else out[:filled].copy()


def _check_container_length(f, label: str) -> None:
    """libsndfile silently shortens a WAV/W64/RF64/AIFF/AU file whose sample data runs past the end
    of the file; its log keeps the declared size. Streamed files declare 0 or 0xFFFFFFFF bytes and
    are fine."""
    if f.format == "RF64":
        m = _SHORT_RF64.search(f.extra_info)
        if m is not None and int(m.group(2)) > int(m.group(1)):
            raise AudioInputError(f"{label}: truncated (header declares {m.group(2)} frames, file has {m.group(1)})")
        return
    pattern = _SHORT_CHUNK.get(f.format)
    m = pattern.search(f.extra_info) if pattern is not None else None
    if m is None:
        return
    declared, available = int(m.group(1)), int(m.group(2))
    if 0 < declared < 0xFFFFFFF0 and declared > available:
        raise AudioInputError(
            f"{label}: truncated ({_CUT_CHUNK[f.format]} chunk declares {declared} bytes, file has {available})"
        )


def _check_ogg_end(tail: bytes, label: str) -> None:
    """libsndfile decodes a cut Ogg stream up to its last whole page without complaint. A complete
    stream ends with a whole page flagged end-of-stream (RFC 3533); check that page's header."""
    i = tail.rfind(b"OggS")
    if i < 0 or len(tail) - i < 27 or len(tail) - i < 27 + tail[i + 26]:
        raise AudioInputError(f"{label}: truncated (last Ogg page header is cut)")
    segments = tail[i + 26]
    end = i + 27 + segments + sum(tail[i + 27 : i + 27 + segments])
    if end > len(tail):
        raise AudioInputError(
            f"{label}: truncated (last Ogg page is cut, {end - len(tail)} bytes missing)"
        )
    if not tail[i + 5] & 0x04:
        raise AudioInputError(f"{label}: truncated (Ogg stream has no end-of-stream page)")


def split_clips(wave: np.ndarray) -> list[np.ndarray]:
    """Consecutive clips of at most MAX_CLIP_SAMPLES (views, no copies).

    The reference feature extractor truncates at 30 s; we split instead so nothing is dropped.
    A final clip shorter than 161 samples (~10 ms) yields no mel frame and so no soft token: it
    is left out (it would be an empty <|audio><audio|> block in the prompt).
    """
    if wave.ndim != 1:
        raise ValueError(f"split_clips expects a 1-D waveform, got shape {tuple(wave.shape)}")
    clips = [wave[i : i + MAX_CLIP_SAMPLES] for i in range(0, len(wave), MAX_CLIP_SAMPLES)]
    return [clip for clip in clips if num_audio_soft_tokens(len(clip))]


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _mel_filters() -> np.ndarray:
    """HTK triangular filterbank, (257, 128) float64, no area normalisation (as
    transformers.audio_utils.mel_filter_bank builds it, operation for operation)."""
    mel_min = 2595.0 * np.log10(1.0 + (0.0 / 700.0))
    mel_max = 2595.0 * np.log10(1.0 + (SAMPLE_RATE / 2 / 700.0))
    mel_freqs = np.linspace(mel_min, mel_max, NUM_MEL_BINS + 2)
    filter_freqs = 700.0 * (np.power(10, mel_freqs / 2595.0) - 1.0)
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, FFT_LENGTH // 2 + 1)
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))


_WINDOW = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)  # periodic Hann, (320,)
_MEL_FILTERS = _mel_filters()  # (257, 128) float64


def log_mel_features(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One clip (<= MAX_CLIP_SAMPLES at 16 kHz) -> (features float32 [T, 128], mask bool [T]).

    Same arithmetic and dtypes as the reference: float32 frames and window, float32 rfft
    magnitude, float64 mel matmul and log, cast to float32, invalid frames zeroed.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"log_mel_features expects a 1-D waveform, got shape {tuple(wave.shape)}")
    n = len(wave)
    if n > MAX_CLIP_SAMPLES:
        raise ValueError(f"clip has {n} samples, more than {MAX_CLIP_SAMPLES}; use split_clips")
    padded = -(-n // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    pad_left = FRAME_LENGTH // 2  # semicausal
    signal = np.zeros(pad_left + padded, dtype=np.float32)
    signal[pad_left : pad_left + n] = wave
    window_size = FRAME_LENGTH + 1
    num_frames = (len(signal) - window_size) // HOP_LENGTH + 1
    if num_frames <= 0:
        return np.zeros((0, NUM_MEL_BINS), np.float32), np.zeros(0, bool)
    frames = np.lib.stride_tricks.as_strided(
        signal, (num_frames, window_size), (signal.strides[0] * HOP_LENGTH, signal.strides[0])
    )[:, :-1]  # (T, 320)
    magnitude = np.abs(np.fft.rfft(frames * _WINDOW, n=FFT_LENGTH, axis=-1))  # (T, 257)
    log_mel = np.log(np.matmul(magnitude, _MEL_FILTERS) + np.float64(MEL_FLOOR)).astype(np.float32)
    # Frame i is real iff the last sample of its 321-window (padded index 160 i + 320) is real.
    last_sample = np.arange(num_frames) * HOP_LENGTH + window_size - 1
    mask = last_sample < pad_left + n  # (T,)
    return log_mel * mask[:, None], mask


def num_audio_soft_tokens(num_samples: int) -> int:
    """Soft tokens for one clip of `num_samples` at 16 kHz (the processor's arithmetic, §5.6):
    mel frames, then two stride-2 convolutions, capped at 750."""
    t = (num_samples + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1
    if t <= 0:
        return 0
    for _ in range(2):
        t = (t + 2 - 3) // 2 + 1
    return min(t, MAX_SOFT_TOKENS_PER_CLIP)


def batch_features(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Features of several clips, right-padded to the longest: ([B, T, 128] float32, [B, T] bool).
    Identical to the reference extractor's batched output (padding frames are zero/False)."""
    per_clip = [log_mel_features(c) for c in clips]
    t_max = max((len(m) for _, m in per_clip), default=0)
    feats = np.zeros((len(clips), t_max, NUM_MEL_BINS), np.float32)
    masks = np.zeros((len(clips), t_max), bool)
    for b, (f, m) in enumerate(per_clip):
        feats[b, : len(m)] = f
        masks[b, : len(m)] = m
    return feats, masks

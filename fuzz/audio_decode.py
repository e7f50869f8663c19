"""Fuzz target: audio bytes from a stranger, decoded to 16 kHz and turned into features
(byte level, atheris).

The first input byte picks the path: `load_audio` straight (libsndfile: WAV, FLAC, Ogg
Vorbis/Opus, MP3, AIFF...), or first the server's `audio_bytes`, which sends WebM/MP4 (sniffed,
or named by the request's format) through PyAV to WAV. The decoded wave is split into clips and
the first two become log-mel features. Seeds are tiny valid files of each kind. Contract: a
finite mono float32 wave and finite features, or a one-line AudioInputError.
"""

from __future__ import annotations

import io

from _harness import instrumented, main, run_contract

with instrumented():
    import numpy as np

    from gemmarun.processing.audio import AudioInputError, batch_features, load_audio, split_clips
    from gemmarun.server.inputs import audio_bytes

NAME = "audio_decode"
SECONDS_PER_INPUT = 20.0
SERVER_FORMATS = (None, "webm", "mp4", "wav")


def _check(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        body = audio_bytes(body, SERVER_FORMATS[(mode >> 1) % len(SERVER_FORMATS)], "input_audio")
    wave = load_audio(body)
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) > 0 and np.isfinite(wave).all()
    features, mask = batch_features(split_clips(wave)[:2])
    assert np.isfinite(features).all() and features.shape[:2] == mask.shape


def test_one_input(data: bytes) -> None:
    run_contract(lambda: _check(data), (AudioInputError,), SECONDS_PER_INPUT)


def _pyav(container: str, codec: str, rate: int, wave: np.ndarray) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


def seeds() -> dict[str, bytes]:
    import soundfile as sf

    t = np.arange(960, dtype=np.float32)
    wave = (0.3 * np.sin(t / 7)).astype(np.float32)
    out = {}
    for name, data, rate, fmt, subtype in [
        ("mono16.wav", wave, 16000, "WAV", "PCM_16"), ("stereo-float.wav", np.stack([wave, -wave], 1), 22050,
                                                        "WAV", "FLOAT"),
        ("u8.wav", wave, 8000, "WAV", "PCM_U8"), ("mono.flac", wave, 44100, "FLAC", "PCM_16"),
        ("vorbis.ogg", wave, 16000, "OGG", "VORBIS"), ("opus.ogg", wave, 48000, "OGG", "OPUS"),
        ("mono.mp3", wave, 16000, "MP3", "MPEG_LAYER_III"), ("mono.aiff", wave, 11025, "AIFF", "PCM_24"),
    ]:
        buffer = io.BytesIO()
        sf.write(buffer, data, rate, format=fmt, subtype=subtype)
        out[name] = b"\x00" + buffer.getvalue()
    out["opus.webm"] = b"\x01" + _pyav("webm", "libopus", 48000, np.tile(wave, 2))
    out["aac.mp4"] = b"\x05" + _pyav("mp4", "aac", 16000, wave)
    return out


if __name__ == "__main__":
    main(NAME, test_one_input, seeds, max_len=8192)

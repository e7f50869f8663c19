"""Audio: decoding real formats, features and token counts vs transformers 5.23, and the audio
tower + embedder vs the reference on a tiny random config (spec §5)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gemmarun.config import ConfigError
from gemmarun.model.audio import AudioEmbedder, AudioTower, audio_config_from_hf
from gemmarun.processing.audio import (
    MAX_CLIP_SAMPLES,
    AudioInputError,
    batch_features,
    load_audio,
    log_mel_features,
    num_audio_soft_tokens,
    split_clips,
)

SR = 16_000
RNG = np.random.default_rng(1234)


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(round(seconds * SR)))).astype(
        np.float32
    )


# --------------------------------------------------------------------------------------------
# Features and token counts vs the reference extractor / processor
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


@pytest.mark.parametrize("seconds", [0.08, 1.0, 1.3, 30.0])
def test_features_match_reference(extractor, seconds):
    wave = _noise(seconds, seed=int(seconds * 100))
    ref = extractor([wave], return_tensors="np")
    feats, mask = log_mel_features(wave)
    assert feats.dtype == np.float32 and feats.shape[1] == 128 and mask.dtype == bool
    assert feats.shape == ref["input_features"][0].shape
    np.testing.assert_array_equal(mask, ref["input_features_mask"][0])
    assert np.abs(feats - ref["input_features"][0]).max() <= 1e-5


def test_batch_features_match_reference(extractor):
    waves = [_noise(1.0, 1), _noise(0.31, 2), _noise(1.3, 3)]
    ref = extractor(waves, return_tensors="np")
    feats, mask = batch_features(waves)
    np.testing.assert_array_equal(mask, ref["input_features_mask"])
    assert np.abs(feats - ref["input_features"]).max() <= 1e-5
    assert not mask[1].all()  # the short clip really is padded


def test_features_reject_overlong_clip():
    with pytest.raises(ValueError, match="split_clips"):
        log_mel_features(np.zeros(MAX_CLIP_SAMPLES + 1, np.float32))


@pytest.mark.parametrize(
    "seconds,tokens", [(1.0, 25), (1.3, 33), (30.0, 750), (0.08, 2), (0.5, 13), (2.77, 69)]
)
def test_soft_token_count_matches_processor(extractor, seconds, tokens):
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    n = int(round(seconds * SR))
    assert num_audio_soft_tokens(n) == tokens
    fake = SimpleNamespace(
        feature_extractor=extractor,
        audio_seq_length=750,
        boa_token="<",
        eoa_token=">",
        audio_token="a",
    )
    assert Gemma4Processor._compute_audio_num_tokens(fake, np.zeros(n), SR) == tokens
    # The placeholder expansion counts the sub-sampled feature mask instead; same number.
    inputs = extractor([np.zeros(n, np.float32)], return_tensors="np")
    assert Gemma4Processor.replace_audio_token(fake, inputs, 0) == "<" + "a" * tokens + ">"


def test_split_clips_is_consecutive_and_lossless():
    wave = np.arange(2 * MAX_CLIP_SAMPLES + 1234, dtype=np.float32)
    clips = split_clips(wave)
    assert [len(c) for c in clips] == [MAX_CLIP_SAMPLES, MAX_CLIP_SAMPLES, 1234]
    np.testing.assert_array_equal(np.concatenate(clips), wave)
    assert all(np.shares_memory(c, wave) for c in clips)  # views, no copies
    assert len(split_clips(wave[:200])) == 1 and split_clips(wave[:0]) == []
    # a tail too short for one mel frame (<= 160 samples) gives no soft token: no empty clip
    assert [len(c) for c in split_clips(wave[: MAX_CLIP_SAMPLES + 160])] == [MAX_CLIP_SAMPLES]
    assert [len(c) for c in split_clips(wave[: MAX_CLIP_SAMPLES + 161])] == [MAX_CLIP_SAMPLES, 161]
    assert split_clips(wave[:100]) == []


# --------------------------------------------------------------------------------------------
# Tower + embedder vs transformers on a tiny random config
# --------------------------------------------------------------------------------------------

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    subsampling_conv_channels=[128, 8],
    conv_kernel_size=5,
    output_proj_dims=48,
    use_clipped_linears=True,
)
TEXT_HIDDEN = 24


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every weight, norm weight, per_dim_scale and clip bound random (defaults hide mistakes).
    Clip bounds sit inside the value range so that they actually clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name):
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
            elif name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in module.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("input_min", "output_min"):
                b.fill_(-float(1.2 + torch.rand((), generator=g)))
            elif leaf in ("input_max", "output_max"):
                b.fill_(float(1.2 + torch.rand((), generator=g)))


def _build_pair(**overrides):
    """(reference tower, reference embedder, our tower, our embedder) with identical weights."""
    from transformers import Gemma4AudioConfig, Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4AudioModel,
        Gemma4MultimodalEmbedder,
    )

    torch.manual_seed(0)
    acfg = Gemma4AudioConfig(**{**TINY, **overrides})
    acfg._attn_implementation = "eager"
    tcfg = Gemma4TextConfig(
        hidden_size=TEXT_HIDDEN,
        vocab_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=8,
        layer_types=["full_attention"],
    )
    tower = Gemma4AudioModel(acfg).eval()
    embed = Gemma4MultimodalEmbedder(acfg, tcfg).eval()
    _randomise(tower, 1)
    _randomise(embed, 2)

    cfg = audio_config_from_hf(acfg.to_dict())
    ours = AudioTower(cfg).eval()
    ours.load_state_dict(tower.state_dict(), strict=True)  # identity name map
    ours_embed = AudioEmbedder(cfg.output_proj_dims, TEXT_HIDDEN, cfg.rms_norm_eps).eval()
    ours_embed.load_state_dict(embed.state_dict(), strict=True)
    return tower, embed, ours, ours_embed


@pytest.fixture(scope="module")
def reference_audio():
    return _build_pair()


def _reference_soft_tokens(tower, embed, feats, mask) -> list[torch.Tensor]:
    with torch.no_grad():
        out = tower(torch.from_numpy(feats), torch.from_numpy(mask), return_dict=True)
        soft = embed(out.last_hidden_state)
    return [soft[i][out.attention_mask[i]] for i in range(soft.shape[0])]


def _ours(ours, ours_embed, feats, mask) -> list[torch.Tensor]:
    return [ours_embed(t) for t in ours(torch.from_numpy(feats), torch.from_numpy(mask))]


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-6)
    assert ((a - b).abs().max() / scale).item() <= 1e-4, ((a - b).abs().max() / scale).item()


@pytest.mark.parametrize("seconds", [0.08, 0.5, 1.3, 3.1])
def test_tower_matches_reference_single(reference_audio, seconds):
    tower, embed, ours, ours_embed = reference_audio
    wave = _noise(seconds, seed=7)
    feats, mask = batch_features([wave])
    ref = _reference_soft_tokens(tower, embed, feats, mask)
    got = _ours(ours, ours_embed, feats, mask)
    assert got[0].shape == (num_audio_soft_tokens(len(wave)), TEXT_HIDDEN)
    _assert_close(got[0], ref[0])


def test_tower_matches_reference_batch(reference_audio):
    tower, embed, ours, ours_embed = reference_audio
    waves = [_noise(1.3, 11), _noise(0.62, 12)]
    feats, mask = batch_features(waves)
    ref = _reference_soft_tokens(tower, embed, feats, mask)
    got = _ours(ours, ours_embed, feats, mask)
    assert [g.shape[0] for g in got] == [33, 16]
    for g, r in zip(got, ref, strict=True):
        _assert_close(g, r)
    # Padding does not leak: the short clip alone gives the same tokens.
    f1, m1 = batch_features(waves[1:])
    _assert_close(_ours(ours, ours_embed, f1, m1)[0], got[1])


def test_tower_matches_reference_with_a_large_eps():
    """The reference builds the feed-forward and conformer-layer norms without eps (always 1e-6)
    and the others with the config's: a config eps far from 1e-6 tells them apart."""
    tower, embed, ours, ours_embed = _build_pair(rms_norm_eps=0.5)
    feats, mask = batch_features([_noise(0.9, 31)])
    _assert_close(_ours(ours, ours_embed, feats, mask)[0], _reference_soft_tokens(tower, embed, feats, mask)[0])


def test_tower_matches_reference_other_chunking():
    """Non-released chunking (block 5, 7-frame left context, 2-frame right context) still
    matches: the blocked attention is ported literally, not specialised to 12/13/0."""
    tower, embed, ours, ours_embed = _build_pair(
        attention_chunk_size=5, attention_context_left=7, attention_context_right=2
    )
    feats, mask = batch_features([_noise(1.3, 21), _noise(0.7, 22)])
    ref = _reference_soft_tokens(tower, embed, feats, mask)
    for g, r in zip(_ours(ours, ours_embed, feats, mask), ref, strict=True):
        _assert_close(g, r)


def test_tower_window_and_clipping_are_exercised(reference_audio):
    """Guards the test itself: the clip bounds clamp, and a 13-frame window would differ."""
    tower, embed, ours, ours_embed = reference_audio
    feats, mask = batch_features([_noise(1.3, 5)])
    base = _ours(ours, ours_embed, feats, mask)[0]
    import copy
    from dataclasses import replace

    wide = AudioTower(replace(ours.cfg, context_left=14)).eval()
    wide.load_state_dict(ours.state_dict())
    assert (_ours(wide, ours_embed, feats, mask)[0] - base).abs().max() > 1e-3
    unclipped = copy.deepcopy(ours)
    for name, b in unclipped.named_buffers():
        b.fill_(float("inf") if name.endswith("max") else -float("inf"))
    assert (_ours(unclipped, ours_embed, feats, mask)[0] - base).abs().max() > 1e-3


def test_audio_config_parsing():
    from transformers import Gemma4AudioConfig

    cfg = audio_config_from_hf(Gemma4AudioConfig().to_dict())
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (1024, 12, 8, 128)
    assert (cfg.chunk_size, cfg.max_past, cfg.context_size, cfg.output_proj_dims) == (
        12,
        12,
        24,
        1536,
    )
    with pytest.raises(ConfigError, match="hidden_act"):
        audio_config_from_hf({"hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="subsampling_conv_channels"):
        audio_config_from_hf({"subsampling_conv_channels": [64, 32]})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        audio_config_from_hf({"hidden_size": 30, "num_attention_heads": 4})
    for key, value, words in [("rms_norm_eps", -1, "rms_norm_eps=-1 must be a positive number"),
                              ("num_attention_heads", 0, "num_attention_heads=0 must be an integer in 1"),
                              ("num_hidden_layers", 10**6, r"num_hidden_layers=1000000 must be an integer in 1\.\.1024"),
                              ("conv_kernel_size", 2**62, "conv_kernel_size=4611686018427387904 must be an integer"),
                              ("attention_context_right", -1, "attention_context_right=-1 must be an integer in 0"),
                              ("use_clipped_linears", 1, "use_clipped_linears=1 must be true or false"),
                              ("subsampling_conv_channels", "ab", "subsampling_conv_channels='ab' must be a list")]:
        with pytest.raises(ConfigError, match=f"audio_config.{words}"):
            audio_config_from_hf({key: value})
    assert audio_config_from_hf({"attention_context_right": 0, "attention_invalid_logits_value": -1e9}).context_right == 0


# --------------------------------------------------------------------------------------------
# Decoding real files
# --------------------------------------------------------------------------------------------

# (label, container, subtype, rate, channels)
FORMATS = [
    ("wav-pcm16-22k", "WAV", "PCM_16", 22_050, 1),
    ("wav-float-48k", "WAV", "FLOAT", 48_000, 1),
    ("wav-pcm16-stereo-44k", "WAV", "PCM_16", 44_100, 2),
    ("flac-44k", "FLAC", "PCM_16", 44_100, 1),
    ("ogg-vorbis-44k", "OGG", "VORBIS", 44_100, 1),
    ("ogg-opus-48k", "OGG", "OPUS", 48_000, 1),
    ("mp3-44k", "MP3", "MPEG_LAYER_III", 44_100, 1),
]
EXT = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "W64": "w64", "RF64": "wav", "AIFF": "aiff",
       "AU": "au"}


def _soundfile():
    sf = pytest.importorskip("soundfile", reason="soundfile (libsndfile) not installed")
    pytest.importorskip("soxr", reason="soxr not installed")
    return sf


def _write(sf, path, signal: np.ndarray, rate: int, container: str, subtype: str) -> None:
    if not sf.check_format(container, subtype):
        pytest.skip(
            f"this libsndfile ({sf.__libsndfile_version__}) cannot write {container}/{subtype}"
        )
    sf.write(str(path), signal, rate, format=container, subtype=subtype)


def _tone(rate: int, seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_hz(x: np.ndarray, rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize(
    "label,container,subtype,rate,channels", FORMATS, ids=[f[0] for f in FORMATS]
)
def test_decode_tone(tmp_path, label, container, subtype, rate, channels):
    sf = _soundfile()
    tone = _tone(rate, 1.0, 1000.0)
    # Stereo: right channel at half amplitude, so averaging (0.75) differs from taking one channel.
    signal = np.stack([tone, 0.5 * tone], axis=1) if channels == 2 else tone
    path = tmp_path / f"{label}.{EXT[container]}"
    _write(sf, path, signal, rate, container, subtype)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR) <= 0.01 * SR, len(wave)
    assert abs(_dominant_hz(wave) - 1000.0) <= 3.0
    mid = wave[2000:14000]
    amplitude = np.sqrt(2 * np.mean(mid.astype(np.float64) ** 2))
    expected = 0.375 if channels == 2 else 0.5
    assert abs(amplitude - expected) <= (0.03 if container in ("WAV", "FLAC") else 0.1) * expected
    # Same bytes from memory.
    np.testing.assert_array_equal(load_audio(path.read_bytes()), wave)


@pytest.mark.parametrize(
    "container,subtype,rate",
    [("WAV", "PCM_16", 44_100), ("OGG", "OPUS", 48_000), ("MP3", "MPEG_LAYER_III", 44_100)],
)
def test_decode_chirp(tmp_path, container, subtype, rate):
    """A rising 300 -> 3000 Hz chirp keeps its frequency track through codec and resampler."""
    sf = _soundfile()
    t = np.arange(int(rate * 2.0)) / rate
    f0, f1, dur = 300.0, 3000.0, 2.0
    chirp = (0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * dur) * t**2))).astype(np.float32)
    path = tmp_path / f"chirp.{EXT[container]}"
    _write(sf, path, chirp, rate, container, subtype)
    wave = load_audio(path)
    assert abs(len(wave) - 2 * SR) <= 0.01 * SR
    for start in (0.2, 0.9, 1.6):  # 0.2 s windows; instantaneous frequency at the window centre
        seg = wave[int(start * SR) : int((start + 0.2) * SR)]
        expected = f0 + (f1 - f0) * (start + 0.1) / dur
        assert abs(_dominant_hz(seg) - expected) <= 0.05 * expected


def _assert_one_line(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and name in msg, msg


def test_bad_inputs(tmp_path, capfd):
    sf = _soundfile()
    text = tmp_path / "notes.wav"
    text.write_text("this is a text file, not audio\n" * 20)
    with pytest.raises(AudioInputError) as e:
        load_audio(text)
    _assert_one_line(e, "notes.wav")
    # bytes of no format libsndfile knows went to its MPEG decoder, which printed "Note: Illegal
    # Audio-MPEG-Header" lines to stderr, then failed with "File does not exist"
    capfd.readouterr()
    for name, data in (("notes.mp3", b"this is not audio at all\n" * 80), ("noise.mp3", bytes(range(256)) * 40)):
        fake = tmp_path / name
        fake.write_bytes(data)
        with pytest.raises(AudioInputError, match="not audio: its bytes begin as no WAV") as e:
            load_audio(fake)
        _assert_one_line(e, name)
    assert capfd.readouterr().err == ""

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioInputError, match="empty") as e:
        load_audio(empty)
    _assert_one_line(e, "empty.wav")

    no_samples = tmp_path / "silence0.wav"
    sf.write(str(no_samples), np.zeros(0, np.float32), SR, subtype="PCM_16")
    with pytest.raises(AudioInputError, match="no audio samples") as e:
        load_audio(no_samples)
    _assert_one_line(e, "silence0.wav")

    missing = tmp_path / "missing.flac"
    with pytest.raises(AudioInputError, match="no such file") as e:
        load_audio(missing)
    _assert_one_line(e, "missing.flac")

    with pytest.raises(AudioInputError):
        load_audio(b"")

    # an open file has a detach() too: it had been taken for a torch tensor, detached (the
    # caller's file left unusable) and failed with "'_io.FileIO' object has no attribute 'cpu'"
    wav = tmp_path / "tone.wav"
    sf.write(str(wav), np.zeros(1600, np.float32), SR)
    with open(wav, "rb") as handle:
        with pytest.raises(AudioInputError, match="file path") as e:
            load_audio(handle)
        _assert_one_line(e, "BufferedReader")
        assert handle.read(4) == b"RIFF"  # still the caller's, readable
    with pytest.raises(AudioInputError, match="file path"):
        load_audio(io.BytesIO(wav.read_bytes()))
    # int16 PCM had been read as amplitudes: garbage when quiet, "far outside [-1, 1]" when loud
    for pcm in (np.full(1600, 8192, np.int16), torch.full((1600,), 8192, dtype=torch.int16)):
        with pytest.raises(AudioInputError, match=r"integer samples \(.*int16\); give floats in \[-1, 1\] "
                                                  r"\(16-bit PCM: divide by 32768\)") as e:
            load_audio(pcm)
        _assert_one_line(e, "int16")
    assert load_audio([0.0, 0.25] * 800).size == 1600  # a list of numbers stays samples

    # a name the OS refuses (a data URL taken for a path, say): one line, the name cut short
    with pytest.raises(AudioInputError, match="cannot read") as e:
        load_audio("data:audio/wav;base64," + "A" * 5000)
    _assert_one_line(e, "data:audio/wav")
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("rate,seconds", [(44_100, 0.05), (22_050, 0.1), (12_345, 0.2), (48_000, 1.0)])
def test_resampled_length_and_samples_are_the_references(tmp_path, rate, seconds):
    """transformers pads soxr's output (or cuts it) to ceil(n * 16000 / rate) samples, as librosa
    does; the streamed resampler's own length is often one short, one soft token fewer at times."""
    sf = _soundfile()
    from transformers.audio_utils import _load_audio_soundfile

    path = tmp_path / "tone.wav"
    rng = np.random.default_rng(rate)
    for n in range(int(rate * seconds), int(rate * seconds) + 6):
        sf.write(str(path), (0.3 * rng.standard_normal(n)).astype(np.float32), rate, subtype="FLOAT")
        ours, theirs = load_audio(path), _load_audio_soundfile(str(path), SR)
        assert len(ours) == len(theirs) == -(-n * SR // rate)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "container,subtype,rate",
    [
        ("WAV", "PCM_16", 44_100),
        ("FLAC", "PCM_16", 44_100),
        ("OGG", "VORBIS", 44_100),
        ("OGG", "OPUS", 48_000),
        ("MP3", "MPEG_LAYER_III", 44_100),
        ("W64", "PCM_16", 44_100),
        ("RF64", "PCM_16", 44_100),
        ("AIFF", "PCM_16", 44_100),
        ("AU", "PCM_16", 44_100),
    ],
)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, container, subtype, rate, keep):
    sf = _soundfile()
    if not sf.check_format(container, subtype):
        pytest.skip(f"this libsndfile cannot write {container}/{subtype}")
    buf = io.BytesIO()
    sf.write(buf, _tone(rate, 2.0, 440.0), rate, format=container, subtype=subtype)
    data = buf.getvalue()
    path = tmp_path / f"cut.{EXT[container]}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(AudioInputError) as e:
        load_audio(path)
    _assert_one_line(e, path.name)


def test_ogg_cut_at_page_boundary(tmp_path):
    """A cut between two whole Ogg pages leaves no end-of-stream page."""
    sf = _soundfile()
    buf = io.BytesIO()
    sf.write(buf, _tone(48_000, 2.0, 440.0), 48_000, format="OGG", subtype="OPUS")
    data = buf.getvalue()
    path = tmp_path / "paged.opus"
    path.write_bytes(data[: data.rfind(b"OggS")])
    with pytest.raises(AudioInputError, match="end-of-stream") as e:
        load_audio(path)
    _assert_one_line(e, "paged.opus")


def test_overlong_audio_rejected(tmp_path):
    """Over MAX_AUDIO_SECONDS is refused from the header, before decoding (1 kHz keeps it small)."""
    sf = _soundfile()
    from gemmarun.processing.audio import MAX_AUDIO_SECONDS

    path = tmp_path / "long.wav"
    with sf.SoundFile(str(path), "w", 1000, 1, subtype="PCM_16") as f:
        f.write(np.zeros((MAX_AUDIO_SECONDS + 5) * 1000, np.int16))
    with pytest.raises(AudioInputError, match="maximum") as e:
        load_audio(path)
    _assert_one_line(e, "long.wav")


def test_hour_of_audio_streams_and_splits(tmp_path):
    """One hour of 8 kHz FLAC: decoded and resampled block by block (peak memory about the 16 kHz
    output itself), then split into 120 clips of 30 s, each worth 750 soft tokens."""
    sf = _soundfile()
    import tracemalloc

    rate = 8000
    path = tmp_path / "hour.flac"
    minute = (0.1 * _tone(rate, 60.0, 440.0)).astype(np.float32)
    with sf.SoundFile(str(path), "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(minute)
    tracemalloc.start()
    try:
        wave = load_audio(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(wave) == 3600 * SR
    assert peak <= wave.nbytes + 32 * 2**20, peak  # output + a few blocks, never a second copy
    clips = split_clips(wave)
    assert len(clips) == 120 and all(len(c) == MAX_CLIP_SAMPLES for c in clips)
    assert all(np.shares_memory(c, wave) for c in clips)
    assert sum(num_audio_soft_tokens(len(c)) for c in clips) == 120 * 750
    feats, mask = log_mel_features(clips[-1])
    assert feats.shape == (2999, 128) and mask.all()


@pytest.mark.parametrize("rate", [22050, SR])
def test_absurdly_loud_float_samples_are_refused(rate):
    # found by fuzz/audio_decode.py: samples near float32's limit are finite, but the resampler
    # turned them into NaN (22.05 kHz) and the FFT into inf features (16 kHz)
    sf = _soundfile()
    signal = np.full(2000, 3e38, dtype=np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([signal, signal], axis=1), rate, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioInputError, match="amplitude 3e\\+38, far outside"):
        load_audio(buf.getvalue())


def container_bytes(fmt: str, codec: str, rate: int = 48000, seconds: float = 1.0) -> bytes:
    """A 440 Hz tone encoded with PyAV: M4A (mp4, aac), WebM (libopus) as browsers record."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        stream = c.add_stream(codec, rate=rate, layout="mono")
        t = np.arange(int(rate * seconds)) / rate
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                           format="fltp", layout="mono")
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            c.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("name, fmt, codec", [("clip.m4a", "mp4", "aac"), ("clip.webm", "webm", "libopus")])
def test_m4a_and_webm_audio_load_everywhere_as_the_server_loads_them(tmp_path, monkeypatch, name, fmt,
                                                                     codec):
    """The server decoded M4A/MP4/WebM with PyAV, but load_audio (the CLI's --audio, transcribe,
    chat's /audio, the Python API) called them "not audio"."""
    from gemmarun.server.inputs import audio_bytes

    data = container_bytes(fmt, codec)
    path = tmp_path / name
    path.write_bytes(data)
    from_file = load_audio(path)
    assert abs(from_file.size - SR) < SR // 10 and 0.1 < np.abs(from_file).max() < 0.5
    assert np.array_equal(load_audio(data), from_file)
    assert np.array_equal(load_audio(audio_bytes(data, None, "input_audio")), from_file)
    monkeypatch.chdir(tmp_path)  # relative names with a colon are not taken for FFmpeg protocols
    for colon in ("rec-12:30", "pipe:0"):
        (tmp_path / f"{colon}-{name}").write_bytes(data)
        assert np.array_equal(load_audio(f"{colon}-{name}"), from_file)
    if fmt == "mp4":  # (WebM is a stream: MediaRecorder's files declare no length to miss)
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) // 8])
        with pytest.raises(AudioInputError) as e:
            load_audio(cut)
        _assert_one_line(e, f"cut-{name}")

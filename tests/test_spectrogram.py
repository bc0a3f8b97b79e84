"""Tests for mirasol3b.encoders.spectrogram against librosa (the reference)."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import jax
import librosa
import numpy as np
import pytest

from mirasol3b.encoders.spectrogram import (
    LogMelSpec,
    log_mel_spectrogram,
    mel_filterbank,
    mel_frequencies,
)

# Max |ours - librosa| in dB, checked over every bin. librosa gets the same
# samples as float64, so it is the f64 reference; ours is float32 throughout.
# Bins within LOUD_RANGE_DB of the example's peak must agree to DB_TOL.
LOUD_RANGE_DB = 60.0
DB_TOL = 1e-3
# Fainter bins (60-80 dB down, i.e. the seeded noise floor ~72 dB below the
# tones, down to the top_db floor) get DB_TOL_FAINT: f32 rounding in the
# 400-term DFT sums is ~1e-7 of the loud tones' amplitude, which is a visible
# fraction of a bin 70+ dB down (measured ~4e-3 dB; an f64-accumulating
# matmul with the same f32 bases gets 5e-4, so this is f32 arithmetic, not a
# semantic difference). Bins clipped by top_db agree because both peaks agree
# to ~1e-5 dB and both sides clip at peak - top_db.
DB_TOL_FAINT = 1e-2


def _assert_db_close(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Checks [..., frames, n_mels] dB arrays; returns (loud, faint) max errors."""
    assert ours.shape == ref.shape
    below_peak = ref.max(axis=(-2, -1), keepdims=True) - ref
    loud = below_peak <= LOUD_RANGE_DB
    err = np.abs(ours.astype(np.float64) - ref)
    loud_err = float(err[loud].max(initial=0.0))
    faint_err = float(err[~loud].max(initial=0.0))
    print(f"max |dB diff|: loud bins {loud_err:.3g}, faint bins {faint_err:.3g}")
    assert loud_err < DB_TOL
    assert faint_err < DB_TOL_FAINT
    return loud_err, faint_err


# Filterbank weights are O(1e-3); librosa builds them in float32 too.
FILTERBANK_TOL = 1e-6


def _librosa_log_mel(wave: np.ndarray, spec: LogMelSpec) -> np.ndarray:
    """librosa reference, transposed to [frames, n_mels]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. empty-filter warnings.
        mel = librosa.feature.melspectrogram(
            y=wave.astype(np.float64), sr=spec.sample_rate, n_fft=spec.n_fft,
            hop_length=spec.hop_length, win_length=spec.win_length, window="hann",
            center=True, pad_mode="constant", power=2.0, n_mels=spec.n_mels,
            fmin=spec.fmin, fmax=spec.fmax, htk=False, norm="slaney")
        db = librosa.power_to_db(mel, ref=1.0, amin=spec.amin, top_db=spec.top_db)
    return db.T


def _two_tones(seconds: float, sr: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    wave = (0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.3 * np.sin(2 * np.pi * 2750.0 * t)
            + 1e-3 * rng.standard_normal(t.shape))
    return wave.astype(np.float32)


def test_librosa_default_pad_mode_is_constant():
    # Our center padding is zeros; guard against librosa changing its default.
    assert inspect.signature(librosa.stft).parameters["pad_mode"].default == "constant"


@pytest.mark.parametrize(
    "spec, seconds",
    [
        (LogMelSpec(), 1.0),
        (LogMelSpec(n_fft=400, hop_length=160, n_mels=32, fmax=8000.0), 0.2),
        # win_length < n_fft exercises pad_center and the support-only gather.
        (LogMelSpec(n_fft=512, win_length=400, hop_length=160, n_mels=64, fmin=50.0,
                    fmax=7600.0), 0.2),
    ],
    ids=["default_1s", "tiny_0.2s", "win_lt_nfft"],
)
@pytest.mark.parametrize("dft", ["matmul", "fft"])
def test_matches_librosa(spec, seconds, dft):
    spec = dataclasses.replace(spec, dft=dft)
    wave = _two_tones(seconds, spec.sample_rate, seed=0)
    ours = np.asarray(log_mel_spectrogram(wave, spec))
    ref = _librosa_log_mel(wave, spec)
    assert ours.shape == ref.shape == (1 + wave.shape[-1] // spec.hop_length, spec.n_mels)
    assert ours.dtype == np.float32
    # The signal is well above the floor, so most bins are unclipped and the
    # comparison genuinely exercises the spectrum, not just the top_db clamp.
    assert np.mean(ref > ref.max() - spec.top_db) > 0.5
    _assert_db_close(ours, ref)


def test_matches_librosa_without_top_db():
    spec = LogMelSpec(n_mels=32, top_db=None)
    wave = _two_tones(0.2, spec.sample_rate, seed=1)
    ref = _librosa_log_mel(wave, spec)
    # Without top_db nothing is clipped: make sure no bin is so faint that the
    # tiers above would not describe it.
    assert ref.max() - ref.min() < 80.0
    _assert_db_close(np.asarray(log_mel_spectrogram(wave, spec)), ref)


@pytest.mark.parametrize(
    "spec",
    [LogMelSpec(), LogMelSpec(n_mels=32, fmax=8000.0),
     LogMelSpec(n_fft=512, win_length=400, n_mels=80, fmin=125.0, fmax=7600.0),
     LogMelSpec(sample_rate=22050, n_fft=1024, win_length=1024, n_mels=128)],
)
def test_filterbank_matches_librosa(spec):
    ours = mel_filterbank(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = librosa.filters.mel(sr=spec.sample_rate, n_fft=spec.n_fft, n_mels=spec.n_mels,
                                  fmin=spec.fmin, fmax=spec.fmax, htk=False, norm="slaney")
    assert ours.shape == (spec.n_fft // 2 + 1, spec.n_mels)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.T, rtol=0, atol=FILTERBANK_TOL)


def test_tone_lands_in_nearest_mel_bin():
    spec = LogMelSpec()
    sr = spec.sample_rate
    t = np.arange(sr) / sr
    wave = np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    out = np.asarray(log_mel_spectrogram(wave, spec))
    centres = mel_frequencies(spec.n_mels + 2, spec.fmin, spec.resolved_fmax)[1:-1]
    expected = int(np.argmin(np.abs(centres - 1000.0)))
    np.testing.assert_array_equal(out.argmax(axis=-1), np.full(out.shape[0], expected))


def test_batch_rows_are_independent():
    spec = LogMelSpec(n_mels=32)
    loud = _two_tones(0.2, spec.sample_rate, seed=2)
    # 26 dB quieter: pooling top_db over the batch would raise this row's
    # floor by ~26 dB and clip many of its bins.
    quiet = 0.05 * _two_tones(0.2, spec.sample_rate, seed=3)
    batch = np.stack([loud, quiet])
    out = np.asarray(log_mel_spectrogram(batch, spec))
    assert out.shape == (2, 1 + loud.shape[-1] // spec.hop_length, spec.n_mels)
    # Not bit-exact: XLA may pick a different dot kernel for a different
    # number of rows, so faint bins differ at f32 rounding level. Pooling
    # top_db would instead move the quiet row's floor by ~60 dB.
    for i, row in enumerate(batch):
        _assert_db_close(out[i], np.asarray(log_mel_spectrogram(row, spec)))
        _assert_db_close(out[i], _librosa_log_mel(row, spec))
    for i in range(2):
        assert out[i].min() >= out[i].max() - spec.top_db - 1e-4
    # The quiet row keeps bins that a batch-pooled floor would have clipped.
    assert out[1].min() < out[0].max() - spec.top_db - 5.0


@pytest.mark.parametrize("num_samples", [3200, 3201, 3359, 401])
def test_jit_and_shape(num_samples):
    spec = LogMelSpec(n_mels=32)
    wave = np.random.default_rng(4).standard_normal((2, 3, num_samples)).astype(np.float32)
    fn = jax.jit(log_mel_spectrogram, static_argnames=("spec", "center"))
    out = fn(wave, spec)
    assert out.shape == (2, 3, 1 + num_samples // spec.hop_length, spec.n_mels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(log_mel_spectrogram(wave, spec)),
                               rtol=0, atol=1e-4)


def test_center_false_frames():
    spec = LogMelSpec(n_mels=32)
    wave = np.zeros(1000, np.float32)
    out = log_mel_spectrogram(wave, spec, center=False)
    assert out.shape == (1 + (1000 - spec.n_fft) // spec.hop_length, spec.n_mels)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(win_length=401), "win_length"),
        (dict(win_length=0), "win_length"),
        (dict(hop_length=0), "hop_length"),
        (dict(hop_length=-160), "hop_length"),
        (dict(n_fft=0), "n_fft"),
        (dict(n_mels=0), "n_mels"),
        (dict(sample_rate=0), "sample_rate"),
        (dict(fmax=8001.0), "fmax"),
        (dict(fmin=8000.0), "fmin"),
        (dict(fmin=-1.0), "fmin"),
        (dict(amin=0.0), "amin"),
        (dict(top_db=-1.0), "top_db"),
    ],
)
def test_bad_spec_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LogMelSpec(**kwargs)


def test_short_waveform_raises():
    spec = LogMelSpec()
    with pytest.raises(ValueError, match="samples"):
        log_mel_spectrogram(np.zeros(spec.n_fft - 1, np.float32), spec, center=False)
    with pytest.raises(ValueError, match="samples"):
        log_mel_spectrogram(np.zeros(0, np.float32), spec)
    with pytest.raises(ValueError, match="waveform"):
        log_mel_spectrogram(np.float32(0.0), spec)

"""Log-mel spectrogram front end for the audio encoder.

Numerically matches ``librosa.power_to_db(librosa.feature.melspectrogram(...))``
(Hann window, ``center=True`` with zero padding, power 2, Slaney mel scale and
Slaney area normalisation), transposed to ``[frames, n_mels]``.

The STFT is by default a gather plus two real matmuls rather than ``jnp.fft``
(``dft="matmul"``): FFTs are slow on TPU while dense matmuls use the MXU. On a
CPU the FFT is the cheaper one (``dft="fft"``: the tiny model's step is ~40%
STFT FLOPs as matmuls); both give the same spectrogram. All constants
(window, DFT bases, mel filterbank) are numpy arrays built at trace time, so
the function has no parameters and is safe under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
DFT_METHODS = ("matmul", "fft")


@dataclasses.dataclass(frozen=True)
class LogMelSpec:
    """Settings for `log_mel_spectrogram`; hashable so it can be a static arg."""

    sample_rate: int = 16000
    n_fft: int = 400  # FFT size.
    win_length: int = 400  # Hann window length, zero-padded centred to n_fft.
    hop_length: int = 160
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None  # None -> sample_rate / 2.
    top_db: float | None = 80.0
    amin: float = 1e-10
    dft: str = "matmul"  # "matmul" (TPU/GPU) or "fft" (CPU); same result

    def __post_init__(self):
        def _check(ok: bool, field: str, msg: str):
            if not ok:
                raise ValueError(f"LogMelSpec.{field}={getattr(self, field)!r}: {msg}")

        _check(self.sample_rate > 0, "sample_rate", "must be > 0")
        _check(self.n_fft > 0, "n_fft", "must be > 0")
        _check(self.win_length > 0, "win_length", "must be > 0")
        _check(self.win_length <= self.n_fft, "win_length", f"must be <= n_fft={self.n_fft}")
        _check(self.hop_length > 0, "hop_length", "must be > 0")
        _check(self.n_mels > 0, "n_mels", "must be > 0")
        _check(self.fmin >= 0, "fmin", "must be >= 0")
        nyquist = self.sample_rate / 2
        if self.fmax is not None:
            _check(self.fmax <= nyquist, "fmax", f"must be <= sample_rate / 2 = {nyquist}")
        _check(self.fmin < self.resolved_fmax, "fmin", f"must be < fmax={self.resolved_fmax}")
        _check(self.amin > 0, "amin", "must be > 0")
        _check(self.dft in DFT_METHODS, "dft", f"must be one of {DFT_METHODS}")
        if self.top_db is not None:
            _check(self.top_db >= 0, "top_db", "must be >= 0 or None")

    @property
    def resolved_fmax(self) -> float:
        return self.sample_rate / 2 if self.fmax is None else float(self.fmax)

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1


# --- Slaney mel scale (same formulas as librosa.hz_to_mel / mel_to_hz). ---
# Linear below 1 kHz, logarithmic above; kept in float64 so the filterbank
# edges match librosa to rounding.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(freqs) -> np.ndarray:
    """Hz -> Slaney mels (float64)."""
    freqs = np.asarray(freqs, dtype=np.float64)
    mels = freqs / _F_SP
    log_region = freqs >= _MIN_LOG_HZ
    safe = np.where(log_region, freqs, _MIN_LOG_HZ)  # Avoid log(0) warnings.
    return np.where(log_region, _MIN_LOG_MEL + np.log(safe / _MIN_LOG_HZ) / _LOGSTEP, mels)


def mel_to_hz(mels) -> np.ndarray:
    """Slaney mels -> Hz (float64)."""
    mels = np.asarray(mels, dtype=np.float64)
    freqs = _F_SP * mels
    return np.where(
        mels >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - _MIN_LOG_MEL)), freqs)


def mel_frequencies(n: int, fmin: float, fmax: float) -> np.ndarray:
    """`n` frequencies (Hz) evenly spaced on the Slaney mel scale."""
    mels = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n)
    return mel_to_hz(mels)


@functools.lru_cache(maxsize=32)
def _mel_filterbank(spec: LogMelSpec) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(spec.n_fft, d=1.0 / spec.sample_rate)
    # n_mels + 2 edges: filter i rises from edge i to i+1, falls to i+2.
    edges = mel_frequencies(spec.n_mels + 2, spec.fmin, spec.resolved_fmax)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney normalisation: each triangle has unit area in Hz, so energy per
    # band is roughly independent of bandwidth.
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    out = weights.T.astype(np.float32)
    out.flags.writeable = False
    return out


def mel_filterbank(spec: LogMelSpec) -> np.ndarray:
    """Slaney mel filterbank, `[n_fft // 2 + 1, n_mels]` float32 (numpy).

    Equals ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False,
    norm="slaney").T``.
    """
    return _mel_filterbank(spec).copy()


def hann_window(spec: LogMelSpec) -> np.ndarray:
    """Periodic Hann of `win_length`, zero-padded centred to `[n_fft]` (float64)."""
    n = spec.win_length
    if n == 1:
        win = np.ones(1)  # scipy.signal.get_window's length-1 convention.
    else:
        win = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    lpad = (spec.n_fft - n) // 2
    return np.pad(win, (lpad, spec.n_fft - n - lpad))


@functools.lru_cache(maxsize=32)
def _windowed_dft_bases(spec: LogMelSpec) -> tuple[np.ndarray, np.ndarray]:
    """`window*cos` and `window*sin` bases, `[win_length, n_freqs]` each.

    Rows outside the window's support are zero, so they are dropped and the
    frames are gathered only over the support: this saves
    `(n_fft - win_length) / n_fft` of the matmul flops.
    """
    lpad = (spec.n_fft - spec.win_length) // 2
    n = np.arange(lpad, lpad + spec.win_length)
    k = np.arange(spec.n_freqs)
    # Reduce k*n modulo n_fft in exact integer arithmetic before scaling, so
    # the phase stays accurate for large indices.
    phase = 2.0 * np.pi * (np.outer(n, k) % spec.n_fft) / spec.n_fft
    win = hann_window(spec)[lpad:lpad + spec.win_length, None]
    cos = (win * np.cos(phase)).astype(np.float32)
    sin = (win * np.sin(phase)).astype(np.float32)
    cos.flags.writeable = False
    sin.flags.writeable = False
    return cos, sin


def num_frames(num_samples: int, spec: LogMelSpec, center: bool = True) -> int:
    """Number of STFT frames; `1 + num_samples // hop_length` for even n_fft."""
    padded = num_samples + (2 * (spec.n_fft // 2) if center else 0)
    return 1 + (padded - spec.n_fft) // spec.hop_length


def log_mel_spectrogram(waveform, spec: LogMelSpec, *, center: bool = True) -> jax.Array:
    """Log-mel power spectrogram in dB, `[..., samples] -> [..., frames, n_mels]`.

    Leading dims are independent examples; the `top_db` floor is relative to
    each example's own maximum. Output is float32.
    """
    if not isinstance(spec, LogMelSpec):
        raise ValueError(f"spec must be a LogMelSpec, got {type(spec).__name__}")
    waveform = jnp.asarray(waveform)
    if waveform.ndim < 1:
        raise ValueError(f"waveform must have shape [..., samples], got {waveform.shape}")
    if not (jnp.issubdtype(waveform.dtype, jnp.floating)
            or jnp.issubdtype(waveform.dtype, jnp.integer)):
        raise ValueError(f"waveform must be real-valued, got {waveform.dtype}")
    waveform = waveform.astype(jnp.float32)
    num_samples = waveform.shape[-1]
    if center:
        # Zero ("constant") padding, librosa >= 0.10's default pad_mode.
        min_samples = max(1, spec.n_fft - 2 * (spec.n_fft // 2))
    else:
        min_samples = spec.n_fft
    if num_samples < min_samples:
        raise ValueError(
            f"waveform has {num_samples} samples, need >= {min_samples} for "
            f"n_fft={spec.n_fft} with center={center}")

    if center:
        half = spec.n_fft // 2
        pad = [(0, 0)] * (waveform.ndim - 1) + [(half, half)]
        waveform = jnp.pad(waveform, pad)
    n_frames = num_frames(num_samples, spec, center)

    # Gather only the window's support; see _windowed_dft_bases.
    lpad = (spec.n_fft - spec.win_length) // 2
    starts = np.arange(n_frames) * spec.hop_length + lpad
    idx = starts[:, None] + np.arange(spec.win_length)[None, :]
    batch_shape = waveform.shape[:-1]
    # One 2-D [batch * frames, win_length] operand: a single large matmul
    # tiles well on the MXU.
    frames = waveform[..., idx].reshape(-1, spec.win_length)

    if spec.dft == "fft":
        window = hann_window(spec)[lpad:lpad + spec.win_length].astype(np.float32)
        padded = jnp.pad(frames * window, [(0, 0), (lpad, spec.n_fft - spec.win_length - lpad)])
        # The matmul bases index the frame from the window's start; the FFT from the padded
        # frame's start, lpad samples earlier: a phase shift only, which |.|^2 removes.
        spectrum = jnp.fft.rfft(padded, n=spec.n_fft, axis=-1)
        power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    else:
        cos, sin = _windowed_dft_bases(spec)
        real = jnp.matmul(frames, cos, precision=_HIGHEST)
        imag = jnp.matmul(frames, sin, precision=_HIGHEST)
        power = real * real + imag * imag  # [batch * frames, n_freqs]

    mel = jnp.matmul(power, _mel_filterbank(spec), precision=_HIGHEST)
    mel = mel.reshape(*batch_shape, n_frames, spec.n_mels)

    # power_to_db with ref=1.0.
    log_mel = 10.0 * jnp.log10(jnp.maximum(mel, spec.amin))
    log_mel = log_mel - 10.0 * math.log10(max(1.0, spec.amin))
    if spec.top_db is not None:
        peak = jnp.max(log_mel, axis=(-2, -1), keepdims=True)
        log_mel = jnp.maximum(log_mel, peak - spec.top_db)
    return log_mel.astype(jnp.float32)

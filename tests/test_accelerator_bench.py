"""benchmarks/accelerator.py on the CPU (`--allow-cpu`): the batch search, the overrides and the
figures it reports; on a GPU it ran as benchmarks/README.md "On a GPU" records."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import accelerator  # noqa: E402


def test_parse_overrides_reads_literals_and_strings():
    assert accelerator.parse_overrides(["model.attention_impl=xla", "data.batch_size=4", "model.use_audio=False"]) == {
        "model.attention_impl": "xla", "data.batch_size": 4, "model.use_audio": False}
    with pytest.raises(SystemExit, match="key=value"):
        accelerator.parse_overrides(["model.attention_impl"])


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_peak_is_the_device_s_own_not_a_name_it_contains():
    want = {"NVIDIA H200": 989, "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 NVL": 835, "NVIDIA H100 PCIe": 756,
            "NVIDIA A100-SXM4-80GB": 312, "NVIDIA L40": 181, "NVIDIA L40S": 362, "NVIDIA L4": 121,
            "NVIDIA GB200": 2500, "NVIDIA B200": 2250, "TPU v4": 275, "TPU v4 lite": 138, "TPU v5 lite": 197,
            "TPU v5p": 459, "TPU v6 lite": 918}
    got = {kind: round(accelerator.peak_flops(_Device(kind), None)[0] / 1e12) for kind in want}
    assert got == want
    assert accelerator.peak_flops(_Device("NVIDIA A10G"), None)[0] is None  # unknown: the measured matmul


def test_cpu_run_searches_the_batch_and_reports_mfu(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.jsonl"
    monkeypatch.setattr(sys, "argv", [
        "accelerator.py", "--allow-cpu", "--config", "configs/tiny.py", "--max-batch", "2", "--quick",
        "--no-write", "--summary", str(summary), "--set", "model.time_aligned.depth=1", "--set", "model.scan_layers=True"])
    accelerator.main()
    out = capsys.readouterr().out
    assert "batch    2, depths /1: compiled in" in out
    assert "transformer Combiner, remat dots_with_no_batch_dims_saveable, attention auto -> xla" in out
    checks = [json.loads(line) for line in summary.read_text().splitlines()]
    mfu = next(c for c in checks if c["figure"].startswith("MFU"))
    assert "batch 2" in mfu["figure"] and 0 < float(mfu["value"].rstrip("%")) < 100

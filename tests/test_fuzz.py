"""The payload decoder under fuzzing, bounded for CI: hypothesis over arbitrary bytes and
mutations of valid payloads, and a short coverage-guided atheris run of the real harness.
Every input must decode or raise a typed ``PladaError``; the long run is in RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_link import LINK_MODES, link_input, seed_link_inputs
from benchmarks.fuzz_target import (
    INTAKE_MODE,
    MODES,
    SIGNATURE,
    decode_input,
    intake_input,
    seed_inputs,
    seed_payloads,
)
from tests.conftest import ROOT

SEEDS = seed_payloads()


def test_seed_corpus_is_accepted_in_every_mode() -> None:
    """The seeds are valid: every signed one passes raw and re-signed, every unsigned one
    passes in development mode, so mutations start from deep inside the decoder."""
    assert len(SEEDS) >= 12
    for blob in SEEDS:
        if blob[8] == 3:
            assert decode_input(bytes([0]) + blob) == ("raw", "accepted")
            assert decode_input(bytes([1]) + blob[:-SIGNATURE]) == ("resigned", "accepted")
        else:
            assert decode_input(bytes([2]) + blob) == ("unsigned", "accepted")
            assert decode_input(bytes([0]) + blob) == ("raw", "UnsignedPayloadError")
    for mode in MODES:  # the seeds a one-mode campaign starts from
        assert {decode_input(data, mode)[1] for data in seed_inputs(mode)} == {"accepted"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_give_a_typed_error(data: bytes) -> None:
    mode, outcome = decode_input(data)
    assert mode in MODES and outcome.endswith("Error")


@st.composite
def mutated(draw) -> bytes:
    """A seed payload (as a raw, re-signed or unsigned input) with bytes flipped,
    inserted, deleted, truncated or spliced from another seed."""
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    if blob[8] == 3 and draw(st.booleans()):
        data = bytearray([1]) + blob[:-SIGNATURE]  # re-signed: reaches past the signature
    else:
        data = bytearray([2 if blob[8] != 3 else 0]) + blob
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(1, max(1, len(data) - 1)))
        if kind == "flip":
            data[at % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at % len(data)] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        else:
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_payloads_give_a_payload_or_a_typed_error(data: bytes) -> None:
    mode, outcome = decode_input(data)
    assert outcome == "accepted" or outcome.endswith("Error"), (mode, outcome)


def test_intake_takes_every_seed() -> None:
    outcomes = {intake_input(data) for data in seed_inputs(INTAKE_MODE)}
    assert outcomes <= {"accepted", "ReplayError"} and "accepted" in outcomes  # copies: replays


@st.composite
def inbox_entries(draw) -> bytes:
    """An inbox entry: any name of up to 255 bytes, and arbitrary or mutated content."""
    name = draw(st.binary(min_size=0, max_size=255))
    content = draw(st.binary(max_size=2048) | mutated().map(lambda data: data[1:]))
    return bytes([len(name)]) + name + content


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inbox_entries())
def test_inbox_entries_are_queued_or_quarantined_with_a_typed_reason(data: bytes) -> None:
    outcome = intake_input(data)
    assert outcome in ("accepted", "ignored") or outcome.endswith("Error"), outcome


def _atheris_run(tmp_path, runs: int, seed: int, *mode: str) -> dict:
    """A coverage-guided campaign of ``runs`` inputs through the real driver; its stats,
    once it has ended with status 0."""
    pytest.importorskip("atheris")
    stats = tmp_path / "stats.json"
    args = [*mode, "--runs", str(runs), "--seed", str(seed), "--stats", str(stats)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fuzz_payload", *args, "--corpus", str(tmp_path / "c")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(stats.read_text())


def test_bounded_atheris_run(tmp_path) -> None:
    """20,000 coverage-guided inputs through the real harness: no crash, no hang, and the
    run gets past the signature into the body decoders."""
    report = _atheris_run(tmp_path, 20000, 7)
    assert report["inputs"] == 20000 and report["crashes"] == 0
    outcomes = report["rejections_by_type"]
    assert report["accepted"] > 0 and report["modes"].keys() == set(MODES)
    deep = {"CorruptPayloadError", "DigestMismatchError", "PayloadLimitError"}
    assert deep <= outcomes.keys(), outcomes


@pytest.mark.parametrize("mode", LINK_MODES)
def test_the_link_seeds_reach_past_every_gate(mode: str) -> None:
    outcomes = {link_input(data, mode) for data in seed_link_inputs(mode)}
    reached = {"frame": "held", "frames-inbox": "decoded", "reply": "accepted"}[mode]
    assert reached in outcomes, outcomes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(LINK_MODES), data=st.binary(max_size=2048))
def test_arbitrary_link_input_gives_a_result_or_a_typed_error(mode: str, data: bytes) -> None:
    outcome = link_input(data, mode)
    assert outcome in ("held", "decoded", "accepted", "empty") or outcome.endswith("Error")


@pytest.mark.parametrize("mode", LINK_MODES)
def test_bounded_atheris_run_of_the_link(tmp_path, mode: str) -> None:
    """5,000 coverage-guided inputs of each link campaign: no crash, no hang."""
    report = _atheris_run(tmp_path, 5000, 3, "--mode", mode)
    assert report["inputs"] == 5000 and report["crashes"] == 0

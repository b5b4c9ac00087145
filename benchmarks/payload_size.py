"""Payload size: the paper's delta + zstd-19 scheme vs format v1 vs format v2, per scenario.

Scenarios are simulated ImageNet-21K selections (``benchmarks/selection_sim.py``:
clustered and uniform, k = 10/100/200/365, p = 0.5/1/5/10%) and, when
``make demo`` has run, the demo world's real payloads. Every size is the body
only (the index and label coding; the header with class names is the same for
all schemes). The information bound is ``log2 C(n, m) + m * H(labels)``.

    python -m benchmarks.payload_size [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from benchmarks.selection_sim import Selection, clustered, synset_sizes, uniform
from protocol.manifest import BlockLayout
from protocol.payload import (
    BLOCK_CODING,
    BODY_CODING,
    Payload,
    decode_header,
    decode_payload,
    encode_payload,
    information_bound_bytes,
)

KS = (10, 100, 200, 365)
KEEPS = (0.005, 0.01, 0.05, 0.10)
_FRAMING = 8 + 1 + 4 + 4 + 32  # magic, version, hlen, blen, digest


def paper_body_bytes(indices: np.ndarray, labels: np.ndarray, k: int) -> int:
    """The paper's scheme: deltas at the fixed width the largest needs, labels, zstd-19."""
    deltas = np.diff(indices, prepend=0)
    top = int(deltas.max())
    width = "<u1" if top < 1 << 8 else "<u2" if top < 1 << 16 else "<u4"
    raw = deltas.astype(width).tobytes() + labels.astype("<u1" if k <= 256 else "<u2").tobytes()
    return len(zstandard.ZstdCompressor(level=19).compress(raw))


def measure(sel: Selection) -> dict[str, Any]:
    """Sizes and times of every scheme for one selection."""
    fingerprint = bytes(32)
    layout = BlockLayout("sim", fingerprint, sel.n, sel.block_starts)
    payload = Payload(
        task="sim",
        reference_name="sim",
        reference_fingerprint=fingerprint,
        reference_size=sel.n,
        class_names=tuple(f"c{i}" for i in range(sel.k)),
        indices=sel.indices,
        labels=sel.labels,
        created=1,
    )
    paper = paper_body_bytes(sel.indices, sel.labels, sel.k)
    v1 = encode_payload(payload, codings=(BODY_CODING,))
    started = time.perf_counter()
    v2 = encode_payload(payload, reference=layout)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = decode_payload(v2, reference=layout, trust=None)
    decode_s = time.perf_counter() - started
    if not (
        np.array_equal(decoded.indices, sel.indices) and np.array_equal(decoded.labels, sel.labels)
    ):
        raise SystemExit(f"{sel.name}: v2 did not round-trip")
    v2_body = _body(v2)
    coding = decode_header(v2)["body"]
    return {
        "scenario": sel.name,
        "n": sel.n,
        "m": int(sel.indices.size),
        "k": sel.k,
        "paper_bytes": paper,
        "v1_bytes": _body(v1),
        "v2_bytes": v2_body,
        "bound_bytes": round(information_bound_bytes(sel.n, sel.labels, sel.k)),
        "v2_over_paper": v2_body / paper,
        "v2_over_bound": v2_body / information_bound_bytes(sel.n, sel.labels, sel.k),
        "v2_coding": coding.get("coding")
        if coding.get("coding") != BLOCK_CODING
        else (f"{BLOCK_CODING}:{coding.get('blocks')}{coding.get('block_size', '')}"),
        "encode_s": encode_s,
        "decode_s": decode_s,
    }


def _body(encoded: bytes) -> int:
    header_len = int.from_bytes(encoded[9:13], "little")
    return len(encoded) - _FRAMING - header_len


def demo_selections(work: Path) -> list[Selection]:
    """The demo world's payloads (written by ``make demo``), decoded against its manifest."""
    from protocol.reference.factory import open_reference

    payload_dir = work / "payloads"
    files = sorted(payload_dir.glob("*.plada")) if payload_dir.is_dir() else []
    if not files:
        return []
    manifest = open_reference("glyphs", cache_dir=work / "receiver-cache").manifest
    out = []
    for path in files:
        payload = decode_payload(path.read_bytes(), reference=manifest, trust=None)
        out.append(
            Selection(
                f"demo {path.stem}",
                payload.reference_size,
                manifest.block_starts(),
                payload.indices,
                payload.labels,
                len(payload.class_names),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="k=100 and p=1%%,10%% only")
    parser.add_argument("--demo-work", default="work/demo", help="where make demo wrote")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    ks, keeps = ((100,), (0.01, 0.10)) if args.quick else (KS, KEEPS)
    sizes = synset_sizes(0)
    print(
        f"reference: {sizes.size} synsets, n = {int(sizes.sum()):,} "
        f"(sizes {int(sizes.min())}..{int(sizes.max())}, median {int(np.median(sizes))})"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    header = (
        f"{'scenario':28s} {'m':>9s} {'paper B':>10s} {'v1 B':>10s} {'v2 B':>10s} "
        f"{'bound B':>10s} {'v2/paper':>8s} {'v2/bound':>8s} {'enc s':>6s} {'dec s':>6s}  coding"
    )
    print(header)
    rows = []
    selections = [
        *(clustered(k, p, sizes=sizes) for p in keeps for k in ks),
        *(uniform(k, p, sizes=sizes) for p in keeps for k in ks),
    ]
    for sel in [*selections, *demo_selections(Path(args.demo_work))]:
        row = measure(sel)
        rows.append(row)
        print(
            f"{row['scenario']:28s} {row['m']:9,d} {row['paper_bytes']:10,d} "
            f"{row['v1_bytes']:10,d} {row['v2_bytes']:10,d} {row['bound_bytes']:10,d} "
            f"{row['v2_over_paper']:8.3f} {row['v2_over_bound']:8.3f} "
            f"{row['encode_s']:6.2f} {row['decode_s']:6.2f}  {row['v2_coding']}",
            flush=True,
        )
    for kind in ("clustered", "uniform", "demo"):
        ratios = [r["v2_over_paper"] for r in rows if r["scenario"].startswith(kind)]
        if ratios:
            print(
                f"{kind:10s} v2/paper: median {statistics.median(ratios):.3f}, "
                f"min {min(ratios):.3f}, max {max(ratios):.3f} over {len(ratios)} scenarios"
            )
    big = [r for r in rows if r["n"] >= 14_000_000 and abs(r["m"] / r["n"] - 0.10) < 1e-3]
    if big:
        print(
            f"n = 14.2M, p = 10%: encode <= {max(r['encode_s'] for r in big):.2f} s, "
            f"decode <= {max(r['decode_s'] for r in big):.2f} s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

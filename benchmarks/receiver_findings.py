"""The receiver audit's findings, reproduced through the real CLI and readers of a
checkout: ``python benchmarks/receiver_findings.py [--checkout DIR]``.

Run it on this checkout and on one from before the receiver hardening (for example
``git worktree add /tmp/before aed7323``) to get the before/after table of
``benchmarks/RESULTS.md``. Each line is one finding and what that checkout did:
exit status, jobs (name, sequence, state), quarantine reasons (error, digest
prefix) or the measurement named. The checkout's code runs; only this driver is
shared. Takes about two minutes on 2 cores.
"""

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--checkout", default=str(Path(__file__).resolve().parents[1]))
parser.add_argument("--work", help="scratch directory (default /tmp/receiver-findings-NAME)")
parser.add_argument("--json", help="also write the outcomes here")
ARGS = parser.parse_args()
REPO = Path(ARGS.checkout).resolve()
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # `python -m` in the subprocesses puts the working directory first
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from protocol.payload import BODY_CODING, Payload, SenderStamp, decode_payload, encode_payload  # noqa: E402
from protocol.reference.factory import open_reference  # noqa: E402
from protocol.reference.image_folder import ImageFolderReference  # noqa: E402
from protocol.signing import SigningKey  # noqa: E402
from receiver.trust_store import add_key, load_trust_store  # noqa: E402

SPEC = "glyphs:per=20,concepts=digit-0+digit-1+digit-2+digit-3"
WORK = Path(ARGS.work or f"/tmp/receiver-findings-{REPO.name}")
subprocess.run(["rm", "-rf", str(WORK)], check=True)
WORK.mkdir(parents=True)
CACHE = WORK / "cache"
MANIFEST = open_reference(SPEC, CACHE).manifest
KEY = SigningKey.generate("station-a")
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO))
HELP = subprocess.run(
    [PY, "-m", "receiver.cli", "daemon", "--help"], env=ENV, capture_output=True, text=True
).stdout
NEW = "--reorder-seconds" in HELP  # options that only the hardened receiver has


def payload(sequence, count=30, expires_in=3600, seed=None):
    rng = np.random.default_rng(sequence if seed is None else seed)
    now = int(time.time())
    made = Payload(
        "t",
        MANIFEST.name,
        MANIFEST.fingerprint,
        len(MANIFEST),
        ("a", "b"),
        np.sort(rng.choice(len(MANIFEST), count, replace=False)),
        rng.integers(0, 2, count),
        created=now,
        sender=SenderStamp("station-a", sequence, now + expires_in),
    )
    return encode_payload(made, codings=(BODY_CODING,), signer=KEY)


def home(name):
    folder = WORK / name
    (folder / "inbox").mkdir(parents=True)
    add_key(folder / "trust", KEY.public)
    return folder


def daemon_args(folder, *extra):
    args = [
        PY,
        "-m",
        "receiver.cli",
        "daemon",
        "--home",
        str(folder),
        "--reference",
        SPEC,
        "--cache-dir",
        str(CACHE),
        "--settle-seconds",
        "0",
        "--poll-seconds",
        "0.1",
        "--min-steps",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--no-export",
        *extra,
    ]
    return args + (["--reorder-seconds", "0"] if NEW else [])


def run(folder, timeout=60):
    try:
        done = subprocess.run(
            daemon_args(folder, "--exit-when-idle"),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "hung"
    return done.returncode


def jobs(folder):
    with sqlite3.connect(folder / "queue.sqlite") as db:
        rows = db.execute("SELECT source_name, sequence, state FROM jobs").fetchall()
    return [(name[:30], sequence, state) for name, sequence, state in rows]


def reasons(folder):
    out = {}
    for path in (folder / "quarantine").glob("*.reason.json"):
        record = json.loads(path.read_text())
        out[record["file"][:30]] = (record["error"], (record.get("sha256") or "")[:8])
    return out


def put(folder, name, data):
    with open(os.path.join(os.fsencode(folder / "inbox"), os.fsencode(name)), "wb") as handle:
        handle.write(data)


def judge_for(trust):
    """How the checkout judges a payload under the trust store ``trust``: its acceptance
    object, or (checkouts from before it) its trust policy in the decoder."""
    try:
        from receiver.acceptance import AcceptanceRules, Received, open_acceptance
    except ImportError:
        from receiver import trust_store

        try:
            policy = trust_store.build_trust_policy(
                trust, trust_store.TrustOptions(), lambda sender: None
            )
        except AttributeError:  # before the hardening
            policy = trust_store.build_trust_policy(trust, False, True, lambda sender: None)
        return lambda blob: decode_payload(blob, reference=MANIFEST, trust=policy)
    acceptance = open_acceptance(trust, AcceptanceRules(), None, MANIFEST)
    return lambda blob: acceptance.examine(Received.of(blob, "finding.plada"))


def http_daemon(folder):
    """A daemon over ``folder`` with its HTTP endpoint, once it listens: (process, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        daemon_args(folder, "--http-port", str(port)), env=ENV, stderr=subprocess.DEVNULL
    )
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return process, port


results = {}
# 2. long names and a symlink loop
h = home("names")
put(h, "v" * 240 + ".plada", payload(10))
put(h, "k" * 250, b"junk")
os.symlink("loop-b", h / "inbox" / "loop-a")
os.symlink("loop-a", h / "inbox" / "loop-b")
results["2 long names + symlink loop"] = (
    run(h, 40),
    jobs(h) if (h / "queue.sqlite").exists() else None,
    reasons(h),
)
# 3. ordering in one pass
h = home("order")
put(h, "a.plada", payload(7))
put(h, "z.plada", payload(5))
results["3 one sender, two payloads in one pass"] = (run(h), jobs(h), reasons(h))
# 4. a symlink to a file the daemon should not read
h = home("links")
secret = WORK / "secret"
secret.write_bytes(b"private")
os.symlink(secret, h / "inbox" / "to-secret.plada")
os.symlink("/proc/self/status", h / "inbox" / "to-proc.plada")
results["4 symlinks in the inbox"] = (run(h), jobs(h), reasons(h))
# 7. replay after moving a damaged queue aside
h = home("replay")
old = payload(5)
put(h, "first.plada", old)
run(h)
(h / "queue.sqlite").rename(h / "queue.sqlite.damaged")
put(h, "again.plada", old)
results["7 replay after queue moved aside"] = (run(h), jobs(h), reasons(h))
# 15. a valid payload with a non-UTF-8 name
h = home("odd")
put(h, b"caf\xe9.plada", payload(9))
results["15 non-UTF-8 name"] = (
    run(h),
    jobs(h),
    reasons(h),
    sorted(p.name for p in (h / "spool").iterdir()),
)
# 18. a small payload asking for a huge job
h = home("caps")
put(h, "big-job.plada", payload(11, count=70))
extra = ["--max-job-images", "50"] if NEW else []
p = subprocess.run(
    daemon_args(h, "--exit-when-idle", *extra), env=ENV, capture_output=True, text=True, timeout=120
)
results["18 job of 70 images, cap 50"] = (p.returncode, jobs(h), reasons(h))
# 12. an all-zero public key
pub = WORK / "zero.pub"
pub.write_text(
    json.dumps(
        {
            "format": "plada-sender-key-v1",
            "sender": "evil",
            "algorithm": "ed25519",
            "public_key": "00" * 32,
        }
    )
)
p = subprocess.run(
    [PY, "-m", "receiver.cli", "trust", "add", str(pub), "--trust", str(WORK / "t")],
    env=ENV,
    capture_output=True,
    text=True,
)
results["12 trust add of an all-zero key"] = (p.returncode, (p.stdout + p.stderr).strip()[:100])
# 9. a PNG bomb through the reference decoder
code = (
    "import struct, zlib, resource, time\n"
    "from protocol.reference.encoded import decode_rgb\n"
    "side=12000\nraw=zlib.compress(b''.join(b'\\x00'+bytes(side) for _ in range(side)),9)\n"
    "c=lambda k,d: struct.pack('>I',len(d))+k+d+struct.pack('>I',zlib.crc32(k+d))\n"
    "png=b'\\x89PNG\\r\\n\\x1a\\n'+c(b'IHDR',struct.pack('>IIBBBBB',side,side,8,0,0,0,0))+c(b'IDAT',raw)+c(b'IEND',b'')\n"
    "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "try:\n    img=decode_rgb(png,'bomb.png'); out=f'decoded {img.size}'\n"
    "except Exception as e:\n    out=f'{type(e).__name__}: {e}'[:90]\n"
    "print(len(png), out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)//1024, 'MB')\n"
)
p = subprocess.run([PY, "-W", "ignore", "-c", code], env=ENV, capture_output=True, text=True)
results["9 136 KB PNG of 12000x12000"] = p.stdout.strip() or p.stderr.strip()[-200:]
# 1. HTTP: upload without a token; idle connections
h = home("http")
d, port = http_daemon(h)
req = urllib.request.Request(f"http://127.0.0.1:{port}/payloads", data=payload(3))
try:
    status = urllib.request.urlopen(req, timeout=10).status
except urllib.error.HTTPError as e:
    status = e.code
idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
time.sleep(1.0)
fds = len(os.listdir(f"/proc/{d.pid}/fd"))
time.sleep(11)
fds_later = len(os.listdir(f"/proc/{d.pid}/fd"))
for s in idle:
    s.close()
d.terminate()
d.wait()
results["1 upload without a token; daemon fds with 150 idle clients (1 s, 12 s)"] = (
    status,
    fds,
    fds_later,
)

# 5. quarantine quota: 60 junk files of 20 KB
h = home("quota")
for i in range(60):
    (h / "inbox" / f"junk-{i}").write_bytes(os.urandom(20000))
extra = ["--quarantine-max-files", "10"] if NEW else []
subprocess.run(
    daemon_args(h, "--exit-when-idle", *extra), env=ENV, capture_output=True, timeout=120
)
q = h / "quarantine"
results["5 60 junk files (quota 10 files after)"] = (
    len(list(q.glob("*.reason.json"))),
    sum(p.stat().st_size for p in q.iterdir()) // 1024,
    "KB",
)
# 6. a damaged queue at start
h = home("damaged")
subprocess.run(daemon_args(h, "--exit-when-idle"), env=ENV, capture_output=True, timeout=120)
data = bytearray((h / "queue.sqlite").read_bytes())
data[4096:8192] = os.urandom(4096)  # a table page, past the schema
(h / "queue.sqlite").write_bytes(bytes(data))
(h / "inbox" / "ok.plada").write_bytes(payload(5))
p = subprocess.run(
    daemon_args(h, "--exit-when-idle"), env=ENV, capture_output=True, text=True, timeout=120
)
results["6 damaged queue page at start"] = (
    p.returncode,
    "Traceback" in p.stderr,
    p.stderr.strip().splitlines()[-1][:110] if p.stderr.strip() else "",
    sorted(x.name for x in (h / "quarantine").glob("*.reason.json")),
)
# 10. sequence 2^63-1, expiry ~292 billion years
trust = WORK / "trust10"
add_key(trust, KEY.public)
judge = judge_for(trust)
out = []
for blob in (payload((1 << 63) - 1), payload(int(time.time() * 1000), expires_in=(1 << 62))):
    try:
        judge(blob)
        out.append("accepted")
    except Exception as exc:
        out.append(type(exc).__name__)
results["10 sequence 2^63-1; expiry 2^62 s ahead"] = out
# 11. an ImageFolder reference with one non-UTF-8 file name
root = WORK / "ref11"
for folder in ("n001", "n002"):
    (root / folder).mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8)).save(root / folder / f"i{i}.JPEG")
with open(os.path.join(os.fsencode(root / "n001"), b"caf\xe9.JPEG"), "wb") as f:
    Image.new("RGB", (8, 8)).save(f, format="JPEG")
try:
    r = ImageFolderReference(root)
    results["11 ImageFolder with a non-UTF-8 name"] = (
        len(r.manifest),
        getattr(r, "problems", None),
    )
except Exception as exc:
    results["11 ImageFolder with a non-UTF-8 name"] = f"{type(exc).__name__}: {exc}"[:100]
# 13. eight concurrent identical uploads
h = home("http13")
d, port = http_daemon(h)
time.sleep(0.5)
token = (h / "http.token").read_text().strip() if (h / "http.token").exists() else ""
blob = os.urandom(200_000)
codes = []
barrier = threading.Barrier(8)


def up():
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/payloads", data=blob, headers={"Authorization": f"Bearer {token}"}
    )
    barrier.wait()
    try:
        codes.append(urllib.request.urlopen(req, timeout=20).status)
    except urllib.error.HTTPError as e:
        codes.append(e.code)


threads = [threading.Thread(target=up) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
d.terminate()
d.wait()
results["13 eight concurrent identical uploads"] = sorted(codes)
# 17. a world-writable trust store
t17 = WORK / "trust17"
add_key(t17, KEY.public)
t17.chmod(0o777)
try:
    results["17 world-writable trust store"] = f"used: {len(load_trust_store(t17))} key(s)"
except Exception as exc:
    results["17 world-writable trust store"] = f"{type(exc).__name__}"
for name, outcome in results.items():
    print(f"{name}: {outcome}")
if ARGS.json:
    Path(ARGS.json).write_text(json.dumps({k: str(v) for k, v in results.items()}, indent=2))

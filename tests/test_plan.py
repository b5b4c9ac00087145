"""plada-send plan and select --plan: the real CLIs on a small world, and the pure parts."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import TaskDataError
from protocol.task_data import LabeledImages
from sender.errors import BudgetError
from sender.selection.plan import candidate_grid, pick_finalists, split_rows, split_task
from sender.selection.plan_file import (
    BEST,
    OVER_BUDGET,
    WITHIN_NOISE,
    Candidate,
    PlanNoise,
    PlanRow,
    choose,
    noise_of,
    rate_front,
    split_noise,
)
from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, cli_env, run

KEEPS = "1%"  # 18 candidates: sizes enough for the front and the budgets


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    env, send = cli_env(), cli("plada-send")
    ref = ["--reference", SMALL_SPEC, "--cache-dir", str(root / "cache")]
    run([*send, "task", "digits", "--out", str(root / "task")], env)
    train = ["--train", str(root / "task" / "train.npz")]
    work = root / "work"
    run(
        [
            *send,
            "score",
            *ref,
            *train,
            "--test",
            str(root / "task" / "test.npz"),
            "--out",
            str(work),
            "--teacher-epochs",
            "3",
            "--quiet",
        ],
        env,
    )
    quick = ["--keeps", KEEPS, "--screen-steps", "4", "--confirm-steps", "8"]
    quick += ["--teacher-epochs", "3", "--quiet"]
    # the task's test images stand for the device's scenery (their labels are not read)
    scenery = ["--deployment", str(root / "task" / "test.npz")]
    out = run([*send, "plan", str(work), *ref, *train, *quick, *scenery], env)
    return {"root": root, "work": work, "ref": ref, "train": train, "quick": quick, "out": out}


def _select(planned, *extra: str, expect: int = 0, name: str = "p.plada"):
    out = planned["root"] / name
    proc = run(
        [
            *cli("plada-send"),
            "select",
            str(planned["work"]),
            "--unsigned",
            "--out",
            str(out),
            "--json",
            str(out.with_suffix(".json")),
            *extra,
        ],
        cli_env(),
        expect=expect,
    )
    return proc, out


def test_plan_writes_table_front_plot_and_json(planned) -> None:
    plan_dir = planned["work"] / "plan"
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert len(plan["candidates"]) == 18
    assert {r["candidate"]["score"] for r in plan["candidates"]} >= {"knn", "cover"}
    strategies = {r["candidate"]["strategy"] for r in plan["candidates"]}
    assert strategies == {"lowest", "inverse", "safety-net", "random", "random-balanced"}
    rows = {r["name"]: r for r in plan["candidates"]}
    chosen = rows[plan["chosen"]]
    assert chosen["stage"] == "final" and plan["chosen"] in planned["out"].stdout
    screened = [
        replace(PlanRow.from_json(r), predicted_accuracy=r["screen_accuracy"])
        for r in rows.values()
    ]
    # the screen's front is confirmed, but for rows whose classes cannot reach the best
    # screen accuracy
    best_screen = max(r["screen_accuracy"] for r in rows.values())
    for name in rate_front(screened):
        row = rows[name]
        assert row["stage"] != "screen" or row["ceiling"] < best_screen
    front = [rows[name] for name in plan["front"]]
    assert [r["payload_bytes"] for r in front] == sorted(r["payload_bytes"] for r in front)
    assert all(r["kept_images"] > 0 and 0 <= r["predicted_accuracy"] <= 1 for r in rows.values())
    assert plan["split"]["validation"] + plan["split"]["teacher_train"] == 898
    # the test images are drawn as the validation images are: alike, equal weights
    scenery = plan["deployment"]
    assert scenery["deployment_images"] == 899 and not scenery["applied"]
    assert scenery["feature"] == "pixels"
    assert scenery["effective_validation_images"] == plan["split"]["validation"]
    assert "keep equal weights" in (plan_dir / "plan.txt").read_text()
    assert "domain_gap" in plan["evidence"]
    # the noise: the best confirmed rows and the choice were run twice; the finalists were
    # judged again under a second split with its own split teacher, their prediction is
    # the mean over both splits, and the choice is the smallest finalist predicted within
    # the band of the best
    noise, finals = plan["noise"], [r for r in rows.values() if r["stage"] == "final"]
    assert noise["rule"] == "within-noise" and noise["repeated"] >= 1
    # with a second split, the choice's further run is its run under that split (it was
    # run twice on the first only if it was among the best confirmed)
    assert len(chosen["split_accuracies"]) == 1
    (second,) = plan["more_splits"]
    assert second["seed"] == plan["split"]["seed"] + 1 and second["teacher_accuracy"] > 0
    assert noise["splits"] == 2 and noise["finalists"] == len(finals) >= 2
    for row in finals:
        first = row["confirm_accuracy"]
        if row["repeat_accuracy"] is not None:
            first = (first + row["repeat_accuracy"]) / 2
        (other,) = row["split_accuracies"]
        assert row["predicted_accuracy"] == pytest.approx((first + other) / 2)
    best = max(r["predicted_accuracy"] for r in finals)
    assert chosen["predicted_accuracy"] >= best - noise["band"] - 1e-9
    near = [r for r in finals if r["predicted_accuracy"] >= best - noise["band"] - 1e-9]
    fewest = min(r["candidate"]["keep"] for r in near)  # the smallest keep, its best row
    same_size = [r for r in near if r["candidate"]["keep"] == fewest]
    assert chosen["candidate"]["keep"] == fewest
    assert chosen["predicted_accuracy"] == max(r["predicted_accuracy"] for r in same_size)
    assert "teacher variance:" in (plan_dir / "plan.txt").read_text()
    assert "noise:" in planned["out"].stdout and "chosen:" in planned["out"].stdout
    assert (plan_dir / "plan.png").stat().st_size > 10_000
    assert (
        "rate-accuracy front" in (plan_dir / "plan.txt").read_text()
        or "front" in (plan_dir / "plan.txt").read_text()
    )


def test_select_plan_sends_the_best_that_fits_the_budget(planned) -> None:
    plan = json.loads((planned["work"] / "plan" / "plan.json").read_text())
    sizes = sorted({r["payload_bytes"] for r in plan["candidates"]})
    budget = sizes[len(sizes) // 2]
    proc, out = _select(
        planned, "--plan", str(planned["work"] / "plan"), "--max-bytes", str(budget)
    )
    summary = json.loads(out.with_suffix(".json").read_text())
    band = plan["noise"]["band"]
    want = choose([PlanRow.from_json(r) for r in plan["candidates"]], budget, band)
    assert summary["plan"]["candidate"] == want.name and summary["payload_bytes"] <= budget
    assert f"planned: {want.name}" in proc.stdout
    # a link budget: 500 bit/s for 20 minutes carries 75,000 bytes, more than any candidate
    _, out = _select(
        planned,
        "--plan",
        str(planned["work"] / "plan"),
        "--link-bps",
        "500",
        "--window",
        "20m",
        name="link.plada",
    )
    assert json.loads(out.with_suffix(".json").read_text())["plan"]["candidate"] == plan["chosen"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-bytes", "10"], "BudgetError: no planned payload fits 10 bytes"),
        (["--link-bps", "8", "--window", "1"], "BudgetError: no planned payload fits 1 bytes"),
        (["--keep", "0.05"], "--plan chooses the selection and its fleet: drop --keep"),
        (["--fleet", "fleet-dir"], "--plan chooses the selection and its fleet: drop --fleet"),
        (["--link-bps", "500"], "--link-bps needs --window"),
        (["--max-bytes", "900", "--link-bps", "500", "--window", "1m"], "not both"),
    ],
)
def test_select_plan_refuses_what_it_cannot_do(planned, extra, message) -> None:
    plan = str(planned["work"] / "plan")
    proc, out = _select(planned, "--plan", plan, *extra, expect=2, name="refused.plada")
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def _refused_select(work: Path, plan: Path, out: Path):
    """``select --plan`` that must end in a typed error (exit 2)."""
    args = [*cli("plada-send"), "select", str(work), "--plan", str(plan), "--unsigned"]
    return run([*args, "--out", str(out)], cli_env(), expect=2)


def test_plan_over_a_damaged_or_mismatched_work_directory_is_a_typed_error(planned) -> None:
    send, env = cli("plada-send"), cli_env()
    damaged = planned["root"] / "damaged"
    shutil.copytree(planned["work"], damaged)
    scores = damaged / "scores.npz"
    scores.write_bytes(scores.read_bytes()[:1000])
    proc = run(
        [*send, "plan", str(damaged), *planned["ref"], *planned["train"], *planned["quick"]],
        env,
        expect=2,
    )
    assert "is damaged" in proc.stderr and "plada-send score" in proc.stderr
    # the plan no longer matches the (changed) scores it was made for
    proc = _refused_select(damaged, damaged / "plan", damaged / "x.plada")
    assert "made for another scoring" in proc.stderr and not (damaged / "x.plada").exists()
    (damaged / "plan" / "plan.json").write_text("{not json")
    proc = _refused_select(planned["work"], damaged / "plan", damaged / "x.plada")
    assert "is unreadable" in proc.stderr
    other = "glyphs:per=4,concepts=digit-0+digit-1"  # another (tiny) reference set
    proc = run(
        [
            *send,
            "plan",
            str(planned["work"]),
            "--reference",
            other,
            "--cache-dir",
            str(planned["root"] / "cache"),
            *planned["train"],
            *planned["quick"],
        ],
        env,
        expect=2,
    )
    assert "ReferenceMismatchError" in proc.stderr and "Traceback" not in proc.stderr
    scenery = planned["root"] / "scenery.npy"
    np.save(scenery, np.zeros((3, 32, 32), np.uint8))
    plan = [*send, "plan", str(planned["work"]), *planned["ref"], *planned["train"]]
    plan += [*planned["quick"], "--deployment", str(scenery), "--out", str(damaged / "p2")]
    proc = run(plan, env, expect=2)
    assert "TaskDataError" in proc.stderr and "not a .npz with an images array" in proc.stderr
    assert not (damaged / "p2").exists()


def test_plan_within_a_byte_budget_sizes_the_larger_candidates_and_never_trains_them(
    planned,
) -> None:
    send, env = cli("plada-send"), cli_env()
    sizes = sorted(r["payload_bytes"] for r in _plan_rows(planned["work"] / "plan"))
    budget = sizes[len(sizes) // 2]
    out = planned["root"] / "budget-plan"
    plan = [*send, "plan", str(planned["work"]), *planned["ref"], *planned["train"]]
    plan += [*planned["quick"], "--teacher-splits", "1", "--max-bytes", str(budget)]
    proc = run([*plan, "--out", str(out)], env)
    rows = _plan_rows(out)
    over = [r for r in rows if r["stage"] == OVER_BUDGET]
    assert over and all(r["payload_bytes"] > budget for r in over)
    assert all(r["screen_accuracy"] == 0 and r["confirm_accuracy"] is None for r in over)
    assert all(r["payload_bytes"] <= budget for r in rows if r["stage"] != OVER_BUDGET)
    chosen = json.loads((out / "plan.json").read_text())["chosen"]
    assert chosen not in {r["name"] for r in over}
    assert f"{len(over)} candidates over the byte budget of {budget} bytes" in proc.stdout
    # select --plan with a larger budget still takes only a row the plan measured
    _, payload = _select(planned, "--plan", str(out), "--max-bytes", str(sizes[-1]))
    sent = json.loads(payload.with_suffix(".json").read_text())["plan"]["candidate"]
    assert sent not in {r["name"] for r in over}
    # a budget nothing fits: a typed error once the sizes are known, nothing written
    tiny = [*plan[: -len(("--max-bytes", str(budget)))], "--max-bytes", "10"]
    proc = run([*tiny, "--out", str(out / "tiny")], env, expect=2)
    assert "BudgetError: no candidate payload fits the plan's byte budget of 10" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "tiny").exists()


def _plan_rows(plan_dir: Path) -> list[dict]:
    return json.loads((plan_dir / "plan.json").read_text())["candidates"]


def test_split_is_stratified_deterministic_and_needs_two_per_class() -> None:
    labels = np.repeat(np.arange(3), [10, 4, 2])
    task = LabeledImages(np.zeros((16, 1, 4, 4), np.uint8), labels, ("a", "b", "c"))
    teacher, validation = split_task(task, 0.25, seed=0)
    again, _ = split_task(task, 0.25, seed=0)
    assert np.bincount(validation.labels).tolist() == [2, 1, 1]
    assert np.array_equal(teacher.labels, again.labels) and len(teacher) + len(validation) == 16
    lonely = LabeledImages(task.images[:11], labels[:11], ("a", "b", "c"))
    with pytest.raises(TaskDataError, match="at least two per class"):
        split_task(lonely, 0.25, seed=0)


def test_folds_of_one_seed_validate_on_disjoint_images_until_they_are_used_up() -> None:
    labels = np.repeat(np.arange(3), [40, 12, 8])
    names = ("a", "b", "c")
    folds = [split_rows(labels, names, 0.25, seed=3, fold=k) for k in range(5)]
    held = [set(v.tolist()) for _, v in folds]
    assert np.array_equal(folds[0][1], split_rows(labels, names, 0.25, seed=3)[1])
    for k in range(4):
        teacher, validation = folds[k]
        assert np.bincount(labels[validation]).tolist() == [10, 3, 2]
        assert not set(teacher.tolist()) & held[k] and teacher.size + validation.size == 60
        assert all(not held[k] & held[j] for j in range(k))  # disjoint
    assert set().union(*held[:4]) == set(range(60))  # four folds: every image validates once
    assert held[4] == held[0]  # then they wrap round
    assert held[0] != set(split_rows(labels, names, 0.25, seed=4)[1].tolist())


def test_front_and_choice() -> None:
    rows = [  # one keep fraction each, a payload's size following its keep
        PlanRow(n, Candidate("lowest", "energy", b / 1e4), b, predicted_accuracy=a, stage=s)
        for n, b, a, s in [
            ("a", 100, 0.5, "confirm"),
            ("b", 200, 0.4, "confirm"),
            ("c", 300, 0.7, "confirm"),
            ("d", 400, 0.9, "screen"),
            ("e", 500, 0.8, "confirm"),
        ]
    ]
    assert rate_front(rows) == ["a", "c", "d"]
    assert choose(rows).name == "e"  # confirmed estimates first
    assert choose(rows, 350).name == "c"
    assert choose(rows[3:4], 450).name == "d"  # only a screened row fits
    with pytest.raises(BudgetError, match="smallest, a, is 100"):
        choose(rows, 99)
    # within a noise band: the smallest confirmed row near the best, under any budget
    assert choose(rows, band=0.1).name == "c"  # 0.7 is within 0.1 of 0.8
    assert choose(rows, band=0.35).name == "a"
    assert choose(rows, 350, band=0.1).name == "c"
    assert choose(rows, 250, band=0.1).name == "a"  # best that fits: 0.5; b is 0.4
    # finalists (judged under every split) first, whatever the others predict
    rows[1].stage = "final"
    assert choose(rows).name == "b" and choose(rows, 150).name == "a"
    # a row over the plan's byte budget has no prediction: never on the front, never chosen
    big = PlanRow("f", Candidate("lowest", "energy", 0.1), 900, stage=OVER_BUDGET)
    big.predicted_accuracy = 1.0  # whatever it holds, it is not a prediction
    assert rate_front([*rows, big]) == rate_front(rows)
    assert choose([*rows, big], band=0.5).name == choose(rows, band=0.5).name
    assert choose([*rows, big], 1000).name == choose(rows, 1000).name


def test_within_noise_a_smaller_payload_of_the_same_keep_never_wins() -> None:
    """Within the band, the smallest keep fraction wins, and of its rows the best
    predicted: a row of the same keep a few bytes smaller is no saving worth points."""

    def row(name: str, keep: float, size: int, accuracy: float) -> PlanRow:
        candidate = Candidate("safety-net", "knn", keep)
        return PlanRow(name, candidate, size, stage="final", predicted_accuracy=accuracy)

    rows = [
        row("two", 0.02, 2700, 0.70),
        row("five-best", 0.05, 5067, 0.748),
        row("five-smaller", 0.05, 5020, 0.739),
        row("ten", 0.10, 8100, 0.745),
    ]
    assert choose(rows, band=0.013).name == "five-best"  # not the 47 bytes fewer
    assert choose(rows, band=0.05).name == "two"  # a smaller keep within the band
    assert choose(rows).name == "five-best"
    tie = [row("a", 0.01, 1800, 0.7), row("b", 0.01, 1700, 0.7)]
    assert choose(tie).name == choose(tie, band=0.1).name == "b"  # ties to fewer bytes


def test_finalists_and_the_noise_between_splits() -> None:
    def row(name: str, accuracy: float, size: int = 100) -> PlanRow:
        candidate = Candidate("lowest", "energy", size / 1e4)  # its size follows its keep
        return PlanRow(name, candidate, size, stage="confirm", predicted_accuracy=accuracy)

    rows = [row("a", 0.80, 900), row("b", 0.79, 300), row("c", 0.70), row("d", 0.78, 200)]
    band = PlanNoise(2, 0.03, 0.02, WITHIN_NOISE)
    # within twice the band of the best, the best first; the choice (d: the smallest
    # within the band) added
    assert [r.name for r in pick_finalists(rows, band, 2)] == ["a", "b", "d"]
    assert [r.name for r in pick_finalists(rows, band, 4)] == ["a", "b", "d"]
    tight = PlanNoise(2, 0.0, 0.001, WITHIN_NOISE)  # at least two finalists
    assert [r.name for r in pick_finalists(rows, tight, 4)] == ["a", "b"]
    # a second split 5 points harder for all: an offset, no noise between the finalists
    a, b, d = rows[0], rows[1], rows[3]
    for finalist in (a, b, d):
        finalist.split_accuracies = [finalist.predicted_accuracy - 0.05]
    assert split_noise([a, b, d], band).split_sd == pytest.approx(0.0, abs=1e-12)
    # never below what the proxy's own noise leaves: the mean of a two-run prediction and
    # one run on the second split, against another such mean
    for finalist in (a, b, d):
        finalist.repeat_accuracy = finalist.predicted_accuracy
    floor = band.band * np.sqrt(3) / 2
    assert split_noise([a, b, d], band).band == pytest.approx(floor)
    # a finalist run once on split 0 is noisier: its mean's variance is (s^2 + s^2) / 4,
    # against (s^2 / 2 + s^2) / 4 for a repeated one
    d.repeat_accuracy = None
    floor = band.band * np.sqrt(2 / 4 + 1.5 / 4)
    assert split_noise([a, b, d], band).band == pytest.approx(floor)
    # a second split that reverses a and d: one split's sd from the residuals
    a.split_accuracies, d.split_accuracies = [0.74], [0.84]
    table = np.array([[0.80, 0.74], [0.79, 0.74], [0.78, 0.84]])
    residual = table - table.mean(1, keepdims=True) - table.mean(0) + table.mean()
    sd = np.sqrt((residual**2).sum() / 2)
    noise = split_noise([a, b, d], band)
    assert noise.splits == 2 and noise.finalists == 3
    assert noise.split_sd == pytest.approx(sd) and noise.band == pytest.approx(sd)
    assert split_noise([a], band) == band  # one finalist: nothing to compare
    # a finalist that keeps another's rows is that finalist again: not a third row
    assert split_noise([a, b, d, replace(d, name="d2", same_as="d")], band) == noise
    # the best distinct rows are the finalists; a copy of one rides along
    copy = replace(rows[1], name="b2", same_as="b", split_accuracies=[])
    picked = [r.name for r in pick_finalists([*rows, copy], band, 2)]
    assert picked == ["a", "b", "d", "b2"]


def test_finalists_span_the_keep_fractions_within_reach() -> None:
    def row(name: str, keep: float, accuracy: float) -> PlanRow:
        candidate = Candidate("lowest", "knn", keep)
        size = int(keep * 1e5)
        return PlanRow(name, candidate, size, stage="confirm", predicted_accuracy=accuracy)

    # the top three are all 1% payloads; a 5% payload is fourth, a 0.5% one fifth
    rows = [
        row("one-a", 0.01, 0.80),
        row("one-b", 0.01, 0.79),
        row("one-c", 0.01, 0.79),
        row("five", 0.05, 0.78),
        row("half", 0.005, 0.75),
        row("far", 0.10, 0.60),  # not within twice the band
    ]
    band = PlanNoise(2, 0.03, 0.03, WITHIN_NOISE)
    picked = [r.name for r in pick_finalists(rows, band, 3)]
    assert picked == ["one-a", "five", "half"]  # the best of each keep within reach
    picked = [r.name for r in pick_finalists(rows, band, 5)]
    assert picked == ["one-a", "five", "half", "one-b", "one-c"]  # then the next best
    assert "far" not in [r.name for r in pick_finalists(rows, band, 6)]


def test_noise_is_measured_from_the_repeated_rows() -> None:
    def row(name: str, confirm: float, repeat: float | None) -> PlanRow:
        return PlanRow(
            name,
            Candidate("lowest", "energy", 0.01),
            100,
            stage="confirm",
            confirm_accuracy=confirm,
            repeat_accuracy=repeat,
        )

    rows = [row("a", 0.80, 0.76), row("b", 0.70, 0.73), row("c", 0.6, None)]
    noise = noise_of(rows, validation_images=1000, rule=WITHIN_NOISE)
    rms = np.sqrt((0.04**2 + 0.03**2) / 2)
    assert noise.repeated == 2 and noise.rms_difference == pytest.approx(rms)
    assert noise.band == pytest.approx(rms / np.sqrt(2)) == noise.choice_band
    assert noise_of(rows, 1000, BEST).choice_band == 0.0
    # never below one validation image, even when the repeats agree exactly
    same = [row("a", 0.8, 0.8)]
    assert noise_of(same, validation_images=50, rule=WITHIN_NOISE).band == pytest.approx(0.02)
    assert noise_of([row("a", 0.8, None)], 50, WITHIN_NOISE).repeated == 0
    # a row that keeps another's rows repeats that row's runs: one pair, not two
    copy = replace(rows[0], name="a2", same_as="a")
    assert noise_of([*rows, copy], 1000, WITHIN_NOISE) == noise
    # ... but a copy whose row is not there stands for it
    assert noise_of([copy, rows[1]], 1000, WITHIN_NOISE) == noise


def test_grid_spans_every_strategy_and_score() -> None:
    grid = candidate_grid((0.01,))
    assert len(grid) == 18 and len({c.name for c in grid}) == 18
    assert Candidate("random", "energy", 0.01).config().strategy == "random"
    assert not any(c.strategy == "inverse" and c.score in ("knn", "cover") for c in grid)
    assert {c.name for c in grid if c.score == "cover"} == {
        "lowest/cover/1%",
        "safety-net/cover/1%/r1/a-0.2",
    }


def test_image_path_domain_gap_is_measured_outside_the_teacher(small_pool) -> None:
    """The teacher's features map anything onto the task's classes; the gap is measured
    in the class-agnostic pixel embedding, where photographs are far from glyphs."""
    from benchmarks.heldout_targets import photo_task
    from protocol.world.digits import load_digits_split
    from sender.scoring.images import (
        TeacherSettings,
        domain_gap,
        reference_images,
        teacher_scores,
    )

    images = reference_images(small_pool, 1)
    digits, _ = load_digits_split()
    digits = LabeledImages(digits.images[:300], digits.labels[:300], digits.class_names)
    photos, _ = photo_task(per_class=60)
    verdicts = {}
    for name, task in (("digits", digits), ("photos", photos)):
        # 15 epochs: enough for the teacher's own features to call the photographs near
        scored = teacher_scores(images, task, None, TeacherSettings(epochs=15), progress=False)
        verdicts[name] = domain_gap(scored.outputs)
    assert verdicts["digits"].strategy == "safety-net"
    assert verdicts["photos"].strategy == "inverse" and verdicts["photos"].outlier_fraction > 0.5


def test_proxy_accuracy_does_not_depend_on_where_it_trains() -> None:
    """Worker processes of one thread give what this process gives with one thread, in
    the order the jobs were given."""
    from sender.selection.deployment import Validation
    from sender.selection.plan import ProxyRun, proxy_accuracy
    from sender.selection.proxy_pool import ProxyPool

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (96, 1, 16, 16), dtype=np.uint8)
    labels = (images.reshape(96, -1).mean(axis=1) > 127).astype(np.int64)
    validation = Validation.equal(LabeledImages(images[:40], labels[:40], ("dark", "light")))
    jobs = [(images, labels, ProxyRun(steps, 16, seed)) for steps, seed in [(3, 0), (6, 1), (9, 2)]]
    with ProxyPool(proxy_accuracy, validation, workers=1) as here:
        alone = list(here.run(jobs))
    with ProxyPool(proxy_accuracy, validation, workers=2, start_after=0.0) as pool:
        spread = list(pool.run(iter(jobs)))  # the first here, the rest on two workers
        assert pool._pool is not None
        again = list(pool.run(jobs[::-1]))
    assert spread == alone == again[::-1] and len(set(alone)) > 1
    # short runs never start the workers
    with ProxyPool(proxy_accuracy, validation, workers=2, start_after=3600.0) as pool:
        assert list(pool.run(jobs)) == alone and pool._pool is None


def _pixel_sum(images: np.ndarray, labels: np.ndarray, validation: object, run: object) -> float:
    return float(images.astype(np.int64).sum())  # a proxy "accuracy" naming its job


def test_candidates_that_keep_the_same_rows_train_once() -> None:
    """A proxy run is deterministic, so candidates whose selections are identical share
    one run, on one process or on workers, and every candidate gets its accuracy in order."""
    from sender.selection.deployment import Validation
    from sender.selection.plan import PlanSettings, Proxy, ProxyRun, SplitScores
    from sender.selection.proxy_pool import ProxyPool

    class CountingPool(ProxyPool):
        jobs = 0

        def run(self, jobs):  # type: ignore[no-untyped-def]
            return super().run(self._counted(jobs))

        def _counted(self, jobs):  # type: ignore[no-untyped-def]
            for job in jobs:
                self.jobs += 1
                yield job

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (400, 1, 8, 8), dtype=np.uint8)
    predicted = np.arange(400) % 4
    validation = Validation.equal(LabeledImages(images[:20], predicted[:20], tuple("abcd")))
    split = SplitScores({"energy": rng.random(400).astype(np.float32)}, predicted)
    lowest, other = Candidate("lowest", "energy", 0.05), Candidate("lowest", "energy", 0.1)
    quota = Candidate("safety-net", "energy", 0.05, 1.0, 0.0)  # equal quotas: 5 per class
    no_reserve = Candidate("safety-net", "energy", 0.05, 0.0, 0.0)  # lowest's rows
    order = [lowest, other, quota, lowest, other, quota, no_reserve]
    for workers, start_after in ((1, 1.0), (2, 0.0)):
        proxy = Proxy(images.__getitem__, split, np.zeros(0, np.int64), validation, PlanSettings())
        proxy.pool = CountingPool(_pixel_sum, validation, workers, start_after)
        with proxy:
            assert not np.array_equal(proxy.kept(lowest), proxy.kept(quota))
            accuracies = list(proxy.accuracies(order, ProxyRun(1, 8, 0)))
            assert proxy.pool.jobs == 3  # the three distinct selections, once each
            assert len(set(accuracies)) == 3 and accuracies[3:] == [*accuracies[:3], accuracies[0]]
            assert proxy.same_as == {no_reserve.name: lowest.name}
            again = list(proxy.accuracies([quota, quota], ProxyRun(1, 8, 0)))
            assert again == [accuracies[2]] * 2 and proxy.pool.jobs == 4


def test_the_most_a_student_of_some_classes_can_score_on_validation() -> None:
    from sender.selection.deployment import Validation

    labels = np.array([0, 0, 1, 1, 2, 3, 3, 3])
    validation = Validation(
        LabeledImages(np.zeros((8, 1, 2, 2), np.uint8), labels, tuple("abcd")), np.ones(8)
    )
    assert validation.accuracy_within(np.array([0, 3])) == pytest.approx(5 / 8)
    assert validation.accuracy_within(np.array([], np.int64)) == 0.0
    weighted = Validation(validation.images, np.array([1, 1, 1, 1, 4, 0, 0, 0.0]))
    assert weighted.accuracy_within(np.array([2])) == pytest.approx(0.5)

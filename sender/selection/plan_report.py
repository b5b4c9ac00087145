"""A plan as people read it: plan.json, the rate-accuracy table (plan.txt) and the plot
(plan.png), each written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from protocol.atomic_files import write_atomic, write_json_atomic, write_text_atomic
from sender.selection.plan_file import (
    BEST,
    OVER_BUDGET,
    PLAN_FILE,
    PLAN_PLOT,
    PLAN_SUMMARY,
    Plan,
    PlanRow,
    choose,
)

STRATEGY_COLOURS = {
    "lowest": "tab:blue",
    "inverse": "tab:purple",
    "safety-net": "tab:green",
    "random": "tab:gray",
    "random-balanced": "tab:brown",
}


def write_plan_outputs(out: Path, plan: Plan) -> None:
    """plan.json, the human summary and the rate-accuracy plot."""
    write_json_atomic(out / PLAN_FILE, plan.as_json())
    write_text_atomic(out / PLAN_SUMMARY, plan_summary(plan))
    write_atomic(out / PLAN_PLOT, lambda handle: plot_plan(plan, handle))


def plan_summary(plan: Plan, limit: int = 20) -> str:
    """The rate-accuracy table (front first, then the best of the rest) as text."""
    front = [plan.row(name) for name in plan.front]
    rest = sorted(
        (r for r in plan.candidates if r.name not in plan.front),
        key=lambda r: -r.predicted_accuracy,
    )
    classes = len(plan.classes)
    lines = [
        f"plan for task {plan.task} ({classes} classes) on {plan.reference['name']}",
        f"split: {plan.split.teacher_train} teacher-train, {plan.split.validation} "
        f"validation images; split teacher's validation accuracy "
        f"{100 * (plan.split_teacher_validation_accuracy or 0):.1f}%",
        f"domain gap (evidence): {plan.evidence.domain_gap.reason}",
        f"proxy: {plan.proxy}",
        *deployment_lines(plan),
        "",
        f"{'candidate':34s} {'bytes':>8s} {'images':>7s} {'classes':>7s} {'predicted':>9s}  stage",
    ]
    for row in front + rest[: max(0, limit - len(front))]:
        mark = "*" if row.name == plan.chosen else ("F" if row.name in plan.front else " ")
        stage = stage_words(row)
        lines.append(
            f"{mark}{row.name:33s} {row.payload_bytes:8d} {row.kept_images:7d} "
            f"{row.classes_covered:4d}/{classes:<2d} "
            f"{100 * row.predicted_accuracy:8.1f}%  {stage}"
        )
    lines += [
        "",
        "F: on the rate-accuracy front; *: chosen; x2: the mean of two runs; "
        "final: judged under every split",
        *choice_lines(plan),
        *budget_lines(plan),
        f"{len(plan.candidates)} candidates in {plan.seconds:.0f}s",
    ]
    return "\n".join(lines) + "\n"


def budget_lines(plan: Plan) -> list[str]:
    """The candidates over the plan's byte budget, if any: sized, not trained on."""
    over = [r for r in plan.candidates if r.stage == OVER_BUDGET]
    if not over:
        return []
    smallest = min(r.payload_bytes for r in over)
    return [
        f"{len(over)} candidates over the byte budget of {plan.settings['max_bytes']} bytes "
        f"(from {smallest} bytes): sized, not trained on; plan --max-bytes N measures them "
        "(receivers take in larger payloads only when their operator raises --max-payload-bytes)"
    ]


def stage_words(row: PlanRow) -> str:
    """How a row's prediction was made, in a few words."""
    if row.stage == OVER_BUDGET:
        return "over the byte budget, not trained on"
    if row.stage == "final":
        words = f"final, {1 + len(row.split_accuracies)} splits"
    elif row.stage == "screen" and row.ceiling is not None:
        words = f"screen (its classes: at most {100 * row.ceiling:.0f}%)"
    else:
        words = "confirm x2" if row.repeat_accuracy is not None else row.stage
    return f"{words}, the rows of {row.same_as}" if row.same_as else words


def split_lines(plan: Plan) -> list[str]:
    """The further splits the finalists were judged under, if any."""
    if not plan.more_splits or plan.noise is None or plan.noise.split_sd is None:
        return []
    accuracies = [s.teacher_accuracy for s in (plan.split, *plan.more_splits)]
    shown = ", ".join("-" if a is None else f"{100 * a:.1f}%" for a in accuracies)
    return [
        f"teacher variance: {plan.noise.finalists} finalists judged under "
        f"{plan.noise.splits} splits (split teachers' validation accuracy {shown}); one "
        f"split's sd {100 * plan.noise.split_sd:.1f} points about a finalist's mean"
    ]


def deployment_lines(plan: Plan) -> list[str]:
    """How --deployment weighted the validation images, if it did."""
    found = plan.deployment
    if found is None:
        return []
    told = (
        f"deployment: {found.deployment_images} images ({found.source}) told apart "
        f"from the validation images with AUC {found.separability_auc:.2f}"
    )
    if not found.applied:
        return [
            f"{told} in their {found.feature}, within chance (<= "
            f"{found.chance_auc_limit:.2f}): alike as far as they tell, so the validation "
            "images keep equal weights"
        ]
    return [
        f"{told} in their {found.feature}: weighted towards them, "
        f"{found.effective_validation_images:.0f} of "
        f"{found.validation_images} effective, largest weight {found.max_weight:.1f}x "
        "the mean"
    ]


def best_row(plan: Plan) -> PlanRow:
    """The highest prediction among the rows the choice is made from."""
    return choose(plan.candidates)


def choice_lines(plan: Plan) -> list[str]:
    """Why the chosen row won: the noise, the band and the best prediction."""
    chosen, best = plan.row(plan.chosen), best_row(plan)
    noise = plan.noise
    if noise is None:
        return [f"chosen: {chosen.name}, the highest prediction"]
    lines = [
        f"noise: {noise.repeated} candidate(s) run twice land {100 * noise.rms_difference:.1f} "
        f"points apart (rms); band {100 * noise.band:.1f} points",
        *split_lines(plan),
    ]
    if noise.rule == BEST or chosen.name == best.name:
        why = "the highest prediction" + (
            f" (rule {BEST})"
            if noise.rule == BEST
            else ", and no smaller keep fraction is within "
            f"the noise band ({100 * noise.band:.1f} points)"
        )
    else:
        ratio = best.payload_bytes / chosen.payload_bytes
        points = 100 * (best.predicted_accuracy - chosen.predicted_accuracy)
        why = (
            f"the best of the smallest keep fraction predicted within the noise band "
            f"({100 * noise.band:.1f} points) of the best, {best.name} "
            f"({best.payload_bytes} bytes, {100 * best.predicted_accuracy:.1f}%): "
            f"{ratio:.1f}x fewer bytes for {points:.1f} points; --choose best takes the best"
        )
    lines.append(f"chosen: {chosen.name}, {why}")
    lines.append("select --plan --max-bytes N applies the same rule to the rows that fit N")
    return lines


def _scatter_strategy(ax, rows: list[PlanRow], strategy: str, colour: str) -> None:
    """One strategy's candidates: hollow when screened only, filled when confirmed, large
    when judged under every split; the strategy named once in the legend."""
    confirmed_any = any(r.stage != "screen" for r in rows)
    named = False
    looks = (("screen", "none", 28), ("confirm", colour, 28), ("final", colour, 70))
    for stage, fill, size in looks:
        picked = [r for r in rows if r.stage == stage]
        if not picked:
            continue
        label = None
        if not named and (stage != "screen" or not confirmed_any):
            label, named = strategy, True
        ax.scatter(
            [r.payload_bytes for r in picked],
            [100 * r.predicted_accuracy for r in picked],
            s=size,
            facecolors=fill,
            edgecolors=colour,
            label=label,
        )


def plot_plan(plan: Plan, handle: BinaryIO) -> None:
    """Predicted accuracy against payload bytes, a colour per strategy, front and choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for strategy, colour in STRATEGY_COLOURS.items():
        rows = [r for r in plan.candidates if r.candidate.strategy == strategy]
        _scatter_strategy(ax, rows, strategy, colour)
    front = [plan.row(name) for name in plan.front]
    ax.step(
        [r.payload_bytes for r in front],
        [100 * r.predicted_accuracy for r in front],
        where="post",
        color="black",
        linewidth=1,
        label="rate-accuracy front",
    )
    over = [r for r in plan.candidates if r.stage == OVER_BUDGET]
    if over:
        ax.axvline(
            int(plan.settings["max_bytes"]),  # type: ignore[call-overload]
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"byte budget ({len(over)} larger candidates not trained on)",
        )
    best = best_row(plan)
    if plan.choice_band > 0:
        low = 100 * (best.predicted_accuracy - plan.choice_band)
        ax.axhspan(
            low,
            100 * best.predicted_accuracy,
            color="tab:orange",
            alpha=0.15,
            label="noise band below the best",
        )
    chosen = plan.row(plan.chosen)
    ax.annotate(
        f"chosen: {chosen.name}\n{chosen.payload_bytes} B, {100 * chosen.predicted_accuracy:.1f}%",
        (chosen.payload_bytes, 100 * chosen.predicted_accuracy),
        xytext=(30 if _in_left_half(chosen, plan.candidates) else -160, -60),
        textcoords="offset points",
        arrowprops={"arrowstyle": "->"},
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes (signed, zstd)")
    ax.set_ylabel("predicted student accuracy on validation (%)")
    ax.set_title(
        f"plan: {plan.task} on {plan.reference['name']} (filled: confirmed; large: finalists)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(handle, format="png")
    plt.close(fig)


def _in_left_half(row: PlanRow, rows: list[PlanRow]) -> bool:
    """Whether ``row`` sits in the left half of the log-bytes axis (its label goes right)."""
    import math

    sizes = [math.log(max(1, r.payload_bytes)) for r in rows]
    return math.log(max(1, row.payload_bytes)) < (min(sizes) + max(sizes)) / 2

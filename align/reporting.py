"""What people see: summary tables in the terminal and PNG plots in the artifact folder."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(escape(key), escape(format_value(value)))
    console.print(table)


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display here or on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(bins: list[tuple[float, float, int]], ece: float, folder: Path) -> list[str]:
    """plots/calibration.png: a reward model's reliability diagram, P(preferred) = sigmoid(score margin) against how
    often the response was preferred, per bin of (predicted, observed, pairs)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    predicted, observed, _ = zip(*bins)
    ax.plot(predicted, observed, marker="o", label=f"reward model (ECE {ece:.3f})")
    for p, o, n in bins:
        ax.annotate(str(n), (p, o), textcoords="offset points", xytext=(4, -10), fontsize=7, color="dimgrey")
    ax.set_xlabel("predicted P(preferred) = sigmoid(score margin)")
    ax.set_ylabel("observed rate preferred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    (folder / "plots").mkdir(exist_ok=True)
    fig.savefig(folder / "plots" / "calibration.png", dpi=110)
    plt.close(fig)
    return ["plots/calibration.png"]


def plot_training_curves(log_history: list[dict], folder: Path) -> list[str]:
    """plots/loss.png (train and eval loss by step) and plots/learning_rate.png; returns relative paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "loss.png": [("train loss", "loss"), ("eval loss", "eval_loss")],
        "learning_rate.png": [("learning rate", "learning_rate")],
    }
    written = []
    (folder / "plots").mkdir(exist_ok=True)
    for filename, curves in series.items():
        fig, ax = plt.subplots(figsize=(6.4, 4))
        drawn = False
        for label, key in curves:
            points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
                drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(curves[0][0].split(" ", 1)[-1] if filename == "loss.png" else "learning rate")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(folder / "plots" / filename, dpi=110)
            written.append(f"plots/{filename}")
        plt.close(fig)
    return written


def plot_metric_grid(history: list[dict], folder: Path, filename: str,
                     panels: list[tuple[str, list[str]]]) -> list[str]:
    """One PNG with a small chart per panel (title, metric keys) against `step`; panels with no data are left out.
    Returns the relative path written (or nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(title, keys) for title, keys in panels if any(k in e for e in history for k in keys)]
    if not drawn:
        return []
    columns = 3 if len(drawn) > 4 else 2
    rows = -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, drawn):
        for key in keys:
            points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    (folder / "plots").mkdir(exist_ok=True)
    fig.savefig(folder / "plots" / filename, dpi=100)
    plt.close(fig)
    return [f"plots/{filename}"]

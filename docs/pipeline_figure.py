"""Draws docs/images/pipeline.png, the README's figure of the InstructGPT chain as align runs it.

    .venv/bin/python docs/pipeline_figure.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, title, detail, color)
    "sft": (0.2, 2.2, "align sft", "SFT on instruction pairs\nLoRA / QLoRA / full", "#e3f2fd"),
    "label": (3.0, 2.2, "align label", "K completions per prompt\nranked by people in Argilla", "#fff3e0"),
    "reward": (5.8, 2.2, "align reward", "reward model from the\nrankings (Bradley-Terry)", "#fce4ec"),
    "ppo": (8.6, 3.2, "align ppo", "PPO vs the reward model,\nKL to SFT, PPO-ptx", "#e8f5e9"),
    "dpo": (8.6, 1.2, "align dpo", "DPO on the same\npreference pairs", "#e8f5e9"),
    "eval": (11.4, 2.2, "align eval", "win rates vs SFT (CIs),\nalignment tax, report", "#ede7f6"),
}
ARROWS = [("sft", "label"), ("label", "reward"), ("reward", "ppo"), ("ppo", "eval"), ("dpo", "eval")]
WIDTH, HEIGHT = 2.3, 1.2


def main() -> None:
    fig, ax = plt.subplots(figsize=(14, 5.2))
    for x, y, title, detail, color in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), WIDTH, HEIGHT, boxstyle="round,pad=0.05", facecolor=color,
                                    edgecolor="#455a64", linewidth=1.2))
        ax.text(x + WIDTH / 2, y + HEIGHT - 0.3, title, ha="center", va="center", fontsize=12, weight="bold",
                family="monospace")
        ax.text(x + WIDTH / 2, y + 0.42, detail, ha="center", va="center", fontsize=9)
    for start, end in ARROWS:
        x0, y0 = BOXES[start][:2]
        x1, y1 = BOXES[end][:2]
        ax.add_patch(FancyArrowPatch((x0 + WIDTH + 0.05, y0 + HEIGHT / 2), (x1 - 0.05, y1 + HEIGHT / 2),
                                     arrowstyle="-|>", mutation_scale=16, color="#455a64", linewidth=1.4))
    # The preference pairs also feed DPO: from under the label box, below the reward model.
    ax.add_patch(FancyArrowPatch((3.0 + WIDTH / 2, 2.2 - 0.05), (8.6 - 0.05, 1.2 + HEIGHT / 2),
                                 connectionstyle="angle,angleA=-90,angleB=180,rad=8", arrowstyle="-|>",
                                 mutation_scale=16, color="#455a64", linewidth=1.4))
    # The SFT model is also PPO's KL reference and the baseline of the evaluation.
    ax.add_patch(FancyArrowPatch((0.2 + WIDTH / 2, 2.2 + HEIGHT + 0.05), (8.6 + WIDTH / 2, 3.2 + HEIGHT + 0.05),
                                 connectionstyle="arc3,rad=-0.12", arrowstyle="-|>", mutation_scale=14,
                                 color="#90a4ae", linestyle="--"))
    ax.text(4.6, 4.75, "SFT model = PPO's KL reference, DPO's reference, the eval baseline", ha="center",
            fontsize=9.5, color="#607d8b")
    ax.add_patch(FancyBboxPatch((0.1, 0.1), 13.7, 0.7, boxstyle="round,pad=0.03", facecolor="#fafafa",
                                edgecolor="#b0bec5"))
    ax.text(6.95, 0.45, "model registry (SQLite): every artifact with its parents, config, data fingerprint and "
                        "metrics  -  `align pipeline` runs the chain, skipping finished steps",
            ha="center", va="center", fontsize=10)
    ax.set_xlim(0, 14)
    ax.set_ylim(0, 5.1)
    ax.axis("off")
    out = Path(__file__).parent / "images" / "pipeline.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()

"""Quality of each compression method on the shapes pair's edge model, against its float32 small UNet.

Every method is the ``hybrid-sd compress`` command a user would run; each bundle is then exported with
``compress export`` on the pair's held-out captions, which measures adherence and Fréchet distance of the
compressed and the uncompressed edge (edge alone, k = 0, and the 40% hybrid, k = 8 of 20) and PSNR/SSIM of
the compressed images against the uncompressed ones. The table collects the export cards.

    .venv/bin/python benchmarks/shapes_compression.py [--heldout 64] [--distill-steps 1500] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hybrid_sd.bundle import read_bundle
from hybrid_sd.cli import main as hybrid_sd

TRAIN_PROMPTS = "shapes-train:256"
CALIBRATION_PROMPTS = "shapes-train:16"


def methods(distill_steps: int) -> dict[str, list[list[str]]]:
    """Each method's compress commands, in order (a later one may start from an earlier one's bundle)."""
    distill = ["--train-steps", str(distill_steps), "--prompts", TRAIN_PROMPTS]
    return {
        "W8A8 int_mm (dynamic, per token)": [["quantize", "--kernel", "int_mm"]],
        "W8A8 oneDNN, static scales, every layer": [
            ["quantize", "--kernel", "onednn", "--prompts", CALIBRATION_PROMPTS, "--min-speedup", "0"]
        ],
        "W8A8 oneDNN, per-layer choice": [["quantize", "--kernel", "onednn", "--prompts", CALIBRATION_PROMPTS]],
        "W4A16 g32": [["quantize", "--weight-bits", "4", "--activation-bits", "16", "--group-size", "32"]],
        "channels/heads pruned to 0.6": [
            ["prune", "--budget", "0.6", "--prompts", CALIBRATION_PROMPTS, "--calibration-rows", "16"]
        ],
        "pruned to 0.6 + distilled": [
            ["prune", "--budget", "0.6", "--prompts", CALIBRATION_PROMPTS, "--calibration-rows", "16"],
            ["distill", "--edge-bundle", "{previous}", "--teacher", "edge", *distill],
        ],
        "large UNet: BK-SDM blocks + channels to 0.5, distilled": [
            [
                "prune",
                "--source",
                "cloud",
                "--layers-per-block",
                "1",
                "--remove-mid-block",
                "--budget",
                "0.5",
                "--prompts",
                CALIBRATION_PROMPTS,
                "--calibration-rows",
                "8",
            ],
            ["distill", "--edge-bundle", "{previous}", "--teacher", "cloud", *distill],
        ],
        "tiny decoder re-distilled (tiny-vae)": [
            ["tiny-vae", "--train-steps", str(distill_steps), "--prompts", TRAIN_PROMPTS]
        ],
    }


def run(out: Path, heldout: int, distill_steps: int) -> dict:
    results = {}
    for index, (name, commands) in enumerate(methods(distill_steps).items()):
        started = time.monotonic()
        previous = None
        for step, command in enumerate(commands):
            bundle = out / f"method{index}-step{step}"
            command = [previous if part == "{previous}" else part for part in command]
            if hybrid_sd(["compress", *command, "--out", str(bundle)]) != 0:
                raise SystemExit(f"{name}: hybrid-sd compress {' '.join(command)} failed")
            previous = str(bundle)
        exported = out / f"method{index}-export"
        export = ["export", "--edge-bundle", previous, "--prompts", f"shapes:{heldout}", "--switch-steps", "0,8"]
        if hybrid_sd(["compress", *export, "--out", str(exported)]) != 0:
            raise SystemExit(f"{name}: export failed")
        results[name] = {"card": read_bundle(exported).card, "seconds": round(time.monotonic() - started, 1)}
        (out / "shapes_compression.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    header = (
        "| method | UNet params | MMACs/step | UNet MB | decoder MB | adherence k0 | FD k0 | adherence k8 | FD k8 |"
    )
    lines = [header + " PSNR k0 / k8 |", "| " + " | ".join(["---"] * 10) + " |"]
    first = next(iter(results.values()))["card"]["quality"]["by_switch_step"]
    reference = [first[k][f"{metric}_reference"] for k in ("0", "8") for metric in ("adherence", "frechet_distance")]
    lines.append("| float32 small UNet (reference) | | | | | {:.3f} | {:.1f} | {:.3f} | {:.1f} | |".format(*reference))
    for name, result in results.items():
        card, quality = result["card"], result["card"]["quality"]["by_switch_step"]
        cells = [
            name,
            f"{card['unet_params'] / 1e6:.2f}M",
            f"{card['macs_per_unet_step'] / 1e6:.0f}",
            f"{card['unet_bytes'] / 1e6:.2f}",
            "pair's" if card["vae_bytes"] is None else f"{card['vae_bytes'] / 1e6:.2f}",
        ]
        for k in ("0", "8"):
            cells += [f"{quality[k]['adherence_compressed']:.3f}", f"{quality[k]['frechet_distance_compressed']:.1f}"]
        cells.append(f"{quality['0']['psnr_vs_uncompressed']:.1f} / {quality['8']['psnr_vs_uncompressed']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout", type=int, default=64, help="held-out captions to measure on")
    parser.add_argument("--distill-steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes-compression"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(table(run(args.out, args.heldout, args.distill_steps)))


if __name__ == "__main__":
    main()

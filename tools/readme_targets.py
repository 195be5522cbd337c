"""The README's target table, generated from targets/profiles/*.toml (tests/targets/test_readme_targets.py
fails when the README's copy differs). Run `python tools/readme_targets.py` and paste its output over the table.
"""

from __future__ import annotations

from pathlib import Path

PROFILES = Path(__file__).resolve().parents[1] / "targets" / "profiles"
ORDER = ("onnx", "onnx-x86-avx2", "onnx-arm64", "onnx-qnn-htp", "tflite", "tflite-xnnpack", "tflite-edgetpu",
         "tflite-gpu", "coreml", "coreml-ane", "coreml-cpu")


def table() -> str:
    from edgeq.targets import load_profile

    ids = [*ORDER, *sorted(p.stem for p in PROFILES.glob("*.toml") if p.stem not in ORDER)]
    rows = ["| target | hardware | schemes (default first) |", "|---|---|---|"]
    for target in ids:
        profile = load_profile(target)
        schemes = [profile.default_precision] + [p for p in profile.precisions if p != profile.default_precision]
        rows.append(f"| `{profile.id}` | {profile.hardware} | {', '.join(str(s) for s in schemes)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

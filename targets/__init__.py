"""Target profiles: what a runtime on a piece of hardware runs well, as data (profiles/*.toml)."""

from edgeq.targets.profile import Precision, Runtime, TargetProfile, list_profiles, load_profile



def expand_targets(targets: list[str]) -> list[str]:
    """`all` means the generic onnx, tflite and coreml profiles; repeats are dropped, order kept."""
    expanded = []
    for target in targets:
        for item in ["onnx", "tflite", "coreml"] if target == "all" else [target]:
            if item not in expanded:
                expanded.append(item)
    return expanded


__all__ = ["Precision", "Runtime", "TargetProfile", "expand_targets", "list_profiles", "load_profile"]

"""Target profiles: what a runtime on a piece of hardware runs well, as data (profiles/*.toml)."""

from edgeq.targets.profile import Precision, Runtime, TargetProfile, list_profiles, load_profile

__all__ = ["Precision", "Runtime", "TargetProfile", "list_profiles", "load_profile"]

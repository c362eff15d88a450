"""What the repository asks for: each model's config and the versions its
version policy selects, with a fingerprint per version so a changed file or
config is noticed. Reading it never raises for one model: a broken model
carries its reason instead."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from sluice import config as cfg
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc
from sluice.repository.policy import select_versions, version_dirs
from sluice.repository.registry.labels import Labels, read_labels

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AspiredModel:
    name: str
    directory: Path
    config: mc.ModelConfig
    versions: dict[int, str]  # version -> fingerprint of (config, model file)
    reason: str = ""  # why no version can be aspired (config error, no folder)
    labels: Labels = dataclasses.field(default_factory=Labels)


def model_names(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_aspired(
    repository: Path, name: str, override: mc.ModelConfig | None = None
) -> AspiredModel:
    directory = repository / name
    config = mc.ModelConfig()
    aspired = AspiredModel(name, directory, config, {})
    try:
        if not directory.is_dir():
            raise ModelLoadError(f"model '{name}' is not in the repository")
        if override is not None:
            config.CopyFrom(override)
        else:
            config.CopyFrom(cfg.read_config_file(directory)[0])
        cfg.validate_static(config, name)
        available = version_dirs(directory)
        aspired.labels = read_labels(directory)
        # Labelled versions (stable, canary, shadow) load whatever the policy says.
        chosen = sorted(
            set(select_versions(available, config.version_policy))
            | (aspired.labels.versions() & set(available))
        )
        policy = config.version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            absent = sorted(set(policy.specific.versions) - set(available))
            if absent:
                log.warning(
                    "model '%s': version policy names version(s) %s, which have no folder",
                    name,
                    absent,
                )
        if not chosen:
            raise ModelLoadError(
                f"model '{name}' has no version folder that its version policy "
                f"selects (found: {available or 'none'})"
            )
        # A config (or a client's override) naming a file outside the model
        # folder makes the model unavailable with the reason; nothing is opened.
        model_files = {v: cfg.model_file(directory, v, config) for v in chosen}
    except (ModelLoadError, ValueError) as exc:  # ValueError: a malformed labels.json
        aspired.reason = exc.message if isinstance(exc, ModelLoadError) else str(exc)
        return aspired
    config_bytes = config.SerializeToString(deterministic=True)
    for v in chosen:
        aspired.versions[v] = _fingerprint(
            config_bytes,
            model_files[v],
            directory / str(v) / DRIFT_MANIFEST,
        )
    return aspired


# Written last by `sluice profile` (sluice.monitoring.drift.MANIFEST_FILENAME): a new
# drift profile reloads the version (poll mode, explicit load) like a new model file.
DRIFT_MANIFEST = "drift_profile.json"


def _fingerprint(config_bytes: bytes, model_path: Path, profile_path: Path) -> str:
    """Config plus the model file's identity (size, mtime), and the drift
    profile's if there is one: cheap enough to poll."""
    h = hashlib.sha256(config_bytes)
    try:
        st = model_path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        h.update(b"missing")
    try:
        st = profile_path.stat()
        h.update(f"profile {st.st_size}:{st.st_mtime_ns}".encode())
    except OSError:
        pass  # no profile: the fingerprint of a plain version stays what it was
    return h.hexdigest()

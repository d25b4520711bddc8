"""The framework registry: a manifest's ``(framework.name, framework.version)`` → container image.

The registry shipped in the package (``frameworks.yaml``) is merged with ``[wmltrain] frameworks_file``
and then ``[wmltrain] frameworks``; later sources replace entries of the same name and version, and a
version mapped to ``null`` is removed.  Framework names are case-insensitive, versions are exact strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from airflow_wmltrain.errors import ConfigurationError, ManifestError
from airflow_wmltrain.settings import SECTION, Settings

FRAMEWORK_FIELD = "model_definition.framework"


@dataclass(frozen=True)
class Framework:
    """One supported framework version and the image that runs it.

    :param name: framework name, lower case (``tensorflow``).
    :param version: version string as the manifest gives it (``1.2-py3``).
    :param image: container image reference.
    :param description: optional text shown in listings.
    """

    name: str
    version: str
    image: str
    description: str = ""


class FrameworkRegistry:
    """The frameworks a deployment supports.

    :param frameworks: name → version → :class:`Framework`.
    """

    def __init__(self, frameworks: Mapping[str, Mapping[str, Framework]]) -> None:
        self._frameworks = {name: dict(versions) for name, versions in frameworks.items() if versions}

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> FrameworkRegistry:
        """The shipped registry, merged with the deployment's ``[wmltrain]`` frameworks settings."""
        settings = settings or Settings()
        merged: dict[str, dict[str, Framework | None]] = {}
        shipped = resources.files("airflow_wmltrain").joinpath("frameworks.yaml").read_text("utf-8")
        _merge(merged, yaml.safe_load(shipped), "the shipped frameworks.yaml")
        if settings.frameworks_file:
            path = Path(settings.frameworks_file)
            where = f"[{SECTION}] frameworks_file {path}"
            try:
                text = path.read_text("utf-8")
            except OSError as err:
                raise ConfigurationError(f"cannot read the file: {err.strerror}", field=where) from None
            _merge(merged, _load_yaml(text, where), where)
        if settings.frameworks:
            where = f"[{SECTION}] frameworks"
            _merge(merged, _load_yaml(settings.frameworks, where), where)
        return cls._of(merged)

    @classmethod
    def from_data(cls, data: Any, where: str) -> FrameworkRegistry:
        """A registry given in the registry file's shape (:meth:`to_data`), e.g. the one a server publishes.

        :raises ConfigurationError: naming ``where`` when the data is not a registry.
        """
        merged: dict[str, dict[str, Framework | None]] = {}
        _merge(merged, data, where)
        return cls._of(merged)

    @classmethod
    def _of(cls, merged: Mapping[str, Mapping[str, Framework | None]]) -> FrameworkRegistry:
        return cls(
            {
                name: {version: fw for version, fw in versions.items() if fw is not None}
                for name, versions in merged.items()
            }
        )

    def to_data(self) -> dict[str, dict[str, dict[str, str]]]:
        """The registry in its file's shape: ``{name: {version: {image, description}}}``."""
        data: dict[str, dict[str, dict[str, str]]] = {}
        for fw in self:
            entry = {"image": fw.image, **({"description": fw.description} if fw.description else {})}
            data.setdefault(fw.name, {})[fw.version] = entry
        return data

    def __iter__(self) -> Iterator[Framework]:
        for name in sorted(self._frameworks):
            for version in sorted(self._frameworks[name]):
                yield self._frameworks[name][version]

    def supported(self) -> str:
        """A one-line listing: ``caffe 1.0-py2; pytorch 1.13, 2.1; ...``."""
        return "; ".join(
            f"{name} {', '.join(sorted(versions))}" for name, versions in sorted(self._frameworks.items())
        )

    def resolve(self, name: str, version: str, *, field: str = FRAMEWORK_FIELD) -> Framework:
        """The framework for a manifest's name and version.

        :raises ManifestError: (C101) naming the field and listing what is supported.
        """
        versions = self._frameworks.get(name.strip().lower())
        if versions is None:
            raise ManifestError(
                f"framework '{name}' is not supported; supported frameworks: {self.supported()}",
                field=f"{field}.name",
            )
        framework = versions.get(version.strip())
        if framework is None:
            raise ManifestError(
                f"{name} version '{version}' is not supported; supported versions of {name}: "
                f"{', '.join(sorted(versions))}",
                field=f"{field}.version",
            )
        return framework


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigurationError(f"not valid YAML{at}", field=where) from None


def _merge(into: dict[str, dict[str, Framework | None]], data: Any, where: str) -> None:
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigurationError("must map framework names to versions", field=where)
    for raw_name, versions in data.items():
        name = str(raw_name).strip().lower()
        if not isinstance(versions, Mapping):
            raise ConfigurationError(f"'{raw_name}' must map versions to {{image: ...}}", field=where)
        target = into.setdefault(name, {})
        for raw_version, entry in versions.items():
            version = str(raw_version).strip()
            if entry is None:
                target[version] = None
                continue
            spec = {"image": entry} if isinstance(entry, str) else entry
            image = spec.get("image") if isinstance(spec, Mapping) else None
            if not isinstance(image, str) or not image.strip():
                raise ConfigurationError(f"{name} {version}: an 'image' is required", field=where)
            unknown = set(spec) - {"image", "description"}
            if unknown:
                raise ConfigurationError(
                    f"{name} {version}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                    "expected image, description",
                    field=where,
                )
            target[version] = Framework(name, version, image.strip(), str(spec.get("description") or ""))

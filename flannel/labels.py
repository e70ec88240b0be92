"""Label schemes: map each source's findings onto the task's classes.

    python -c "from flannel.labels import SCHEMES; print(SCHEMES['3class'].classes)"

Readers describe every image with a canonical *finding* (what the source says), never with a
task class. A scheme then maps findings to classes; findings a scheme does not use (for example
lung opacity in the 3-class task) map to None and are counted as excluded, not silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

# Canonical findings the readers emit.
COVID19 = "covid19"
NORMAL = "normal"
VIRAL_PNEUMONIA = "viral_pneumonia"
BACTERIAL_PNEUMONIA = "bacterial_pneumonia"
PNEUMONIA = "pneumonia"  # pneumonia of unstated cause
LUNG_OPACITY = "lung_opacity"
OTHER = "other"
FINDINGS = (COVID19, NORMAL, VIRAL_PNEUMONIA, BACTERIAL_PNEUMONIA, PNEUMONIA, LUNG_OPACITY, OTHER)


@dataclass(frozen=True)
class LabelScheme:
    """Ordered class names and the finding -> class map."""

    name: str
    classes: tuple[str, ...]
    mapping: dict

    def label_of(self, finding: str) -> str | None:
        """Class for a finding, or None when this scheme does not use it."""
        if finding not in FINDINGS:
            raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS}")
        return self.mapping.get(finding)

    def index_of(self, label: str) -> int:
        return self.classes.index(label)


SCHEMES: dict[str, LabelScheme] = {
    # Seed 000 (FLANNEL reproduction): COVID-19 / Normal / Pneumonia, any cause of pneumonia.
    "3class": LabelScheme("3class", ("COVID-19", "Normal", "Pneumonia"), {
        COVID19: "COVID-19", NORMAL: "Normal", VIRAL_PNEUMONIA: "Pneumonia",
        BACTERIAL_PNEUMONIA: "Pneumonia", PNEUMONIA: "Pneumonia"}),
    # Seed 004: the four folders of the COVID-19 Radiography Database.
    "4class": LabelScheme("4class", ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"), {
        COVID19: "COVID", LUNG_OPACITY: "Lung_Opacity", NORMAL: "Normal",
        VIRAL_PNEUMONIA: "Viral Pneumonia"}),
}
DEFAULT_SCHEME = "3class"
# The class whose false "all clear" matters most in seed 004's table ("sick images called Normal").
NORMAL_CLASS = {"3class": "Normal", "4class": "Normal"}
# The class whose recall the cross-validation and architecture comparison report.
COVID_CLASS = {"3class": "COVID-19", "4class": "COVID"}


def get_scheme(name: str) -> LabelScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise KeyError(f"unknown label scheme {name!r}; known: {sorted(SCHEMES)}") from None

"""The lab table: one line per lab, in the course's order (the order of ``llmcourse --help`` and the tour).

Each entry is a package whose ``__init__`` declares ``LAB = Lab(...)``
(:class:`llmcourse.core.lab.Lab`): its commands, tour section and folder formats. The CLI
(``llmcourse.cli``) and the tour (``llmcourse.tour``) read this table; importing ``llmcourse``
registers the labs' folder formats with core, so ``load_model`` opens every lab's folders.

Adding a lab: create ``src/llmcourse/<lab>/`` with ``__init__.py`` holding ``LAB = Lab(...)``,
a commands module with ``register(sub, groups)``, optionally a tour section, then add its line here.
A listed package that is not installed (a trimmed build) is skipped.
"""

from __future__ import annotations

import importlib
import logging

from llmcourse.core.lab import Lab, register_formats

log = logging.getLogger(__name__)

LAB_PACKAGES: list[str] = [
    "llmcourse.core",
    "llmcourse.decoding",
    "llmcourse.quant.int8",
    "llmcourse.quant.gptq",
    "llmcourse.quant.gguf",
    "llmcourse.landscape",
    "llmcourse.kg",
    "llmcourse.finetune",
    "llmcourse.serve",
    "llmcourse.compress",
    "llmcourse.evaluation",
]

# Command groups: `llmcourse <group> <kind>`; a lab adds kinds to them.
GROUPS: dict[str, str] = {
    "eval": "evaluate a model",
    "convert": "convert a model between formats",
    "quantize": "quantize a model",
}


def labs() -> list[Lab]:
    """Every lab of the table that is present, in order (their packages' ``__init__`` only: cheap)."""
    out = []
    for pkg in LAB_PACKAGES:
        try:
            mod = importlib.import_module(pkg)
        except ModuleNotFoundError as e:
            if e.name and pkg.startswith(e.name):
                continue  # this lab is not in this build
            raise
        lab = getattr(mod, "LAB", None)
        if lab is None:
            log.debug("%s is listed in the lab table but declares no LAB; skipped", pkg)
            continue
        out.append(lab)
    return out


def tour_sections() -> list[tuple[Lab, str]]:
    """(lab, "module:function") of every tour section, in the table's order."""
    return [(lab, lab.tour) for lab in labs() if lab.tour]


for _lab in labs():
    register_formats(_lab)

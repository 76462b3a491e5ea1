"""The schedulers: one file per scheduler, the schedule math they share in ``schedule``.

Every scheduler takes diffusers' constructor keywords (its config) and gives diffusers' numbers;
``fastdiff.DDIMScheduler`` etc. are re-exported from here. ``SCHEDULERS`` maps class names to
classes (what a saved pipeline names), ``SHORT_NAMES`` the command line's names to class names.
"""

from __future__ import annotations

from .. import validation
from .base import SchedulerBase
from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput
from .dpmsolver import DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerOutput
from .euler import EulerDiscreteScheduler, EulerDiscreteSchedulerOutput
from .euler_ancestral import EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerOutput
from .pndm import PNDMScheduler, PNDMSchedulerOutput
from .unipc import UniPCMultistepScheduler, UniPCMultistepSchedulerOutput

SCHEDULERS: dict[str, type[SchedulerBase]] = {cls.__name__: cls for cls in (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    PNDMScheduler, UniPCMultistepScheduler)}
# the command line's names (fastdiff sample --scheduler, fastdiff quality --runs NAME-STEPS)
SHORT_NAMES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++": "DPMSolverMultistepScheduler",
               "unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler",
               "euler-a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler"}
# inference steps when none are asked for (None: every training timestep, DDPM's ancestral sampling)
DEFAULT_STEPS = {"ddim": 50, "ddpm": None, "dpm++": 20, "unipc": 20, "euler": 50, "euler-a": 50, "pndm": 50}


def scheduler_class(name: str, argument: str = "scheduler") -> type[SchedulerBase]:
    """The class of a short name ('ddim', 'dpm++', ...) or a class name ('DDIMScheduler', ...)."""
    validation.one_of(argument, name, (*SHORT_NAMES, *SCHEDULERS))
    return SCHEDULERS[SHORT_NAMES.get(name, name)]


def swapped(scheduler: SchedulerBase, name: str, options: dict | None = None,
            argument: str = "options") -> SchedulerBase:
    """A ``name`` scheduler built from ``scheduler``'s config (keys the other does not take are
    ignored), with ``options`` over it: those were asked for, so one it does not take is an error."""
    cls = scheduler_class(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.init_keys()))
    if unknown:
        raise ValueError(f"{argument}: {cls.__name__} takes no option {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(sorted(cls.init_keys()))}")
    return cls.from_config(scheduler.config, **options)


def add_options_argument(parser) -> None:
    """The command line's ``--scheduler-option KEY=VALUE`` (repeatable); read it with ``parse_options``."""
    parser.add_argument("--scheduler-option", action="append", default=None, metavar="KEY=VALUE",
                        help="a scheduler config value over the model's, e.g. timestep_spacing=trailing or "
                             "use_karras_sigmas=true (repeatable; VALUE is JSON, else a string)")


def parse_options(pairs, argument: str = "--scheduler-option") -> dict:
    """KEY=VALUE strings (the command line's --scheduler-option) → a dict; a VALUE that reads as
    JSON (true, 3, 0.5, null, [1, 2]) is that value, any other VALUE the string itself."""
    import json

    options = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{argument} must look like KEY=VALUE (e.g. timestep_spacing=trailing), got {pair!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[key.strip()] = value
    return options


def default_steps(name: str, scheduler: SchedulerBase) -> int:
    """Inference steps for ``name`` when none are given: DEFAULT_STEPS, or every training timestep."""
    steps = DEFAULT_STEPS.get(name)
    return scheduler.config.num_train_timesteps if steps is None else steps


__all__ = ["DDIMScheduler", "DDIMSchedulerOutput", "DDPMScheduler", "DDPMSchedulerOutput",
           "DPMSolverMultistepScheduler", "DPMSolverMultistepSchedulerOutput",
           "EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteSchedulerOutput", "EulerDiscreteScheduler",
           "EulerDiscreteSchedulerOutput", "PNDMScheduler", "PNDMSchedulerOutput", "SCHEDULERS",
           "SHORT_NAMES", "SchedulerBase", "UniPCMultistepScheduler", "UniPCMultistepSchedulerOutput", "default_steps",
           "add_options_argument", "parse_options", "scheduler_class", "swapped"]

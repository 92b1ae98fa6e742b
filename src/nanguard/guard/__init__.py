"""The framework-neutral half of the guard: observations, the recovery policy, the spike detector,
the incident log and fault-injection specs. Imports neither torch nor mindspore (nor numpy): a backend
turns tensors into `Observation`s and `Decision`s into tensor work."""

from nanguard.guard.config import GuardConfig
from nanguard.guard.faults import (
    FAULT_KINDS,
    FaultKind,
    FaultPlan,
    FaultSpec,
    GatheredInjectionLog,
    InjectionLog,
    NullInjectionLog,
    parse_fault,
    read_injections,
    register_fault_kind,
)
from nanguard.guard.incidents import IncidentLog, NullIncidentLog, incident_record, read_incidents
from nanguard.guard.observation import (
    CORRUPTION_KINDS,
    DATA_KINDS,
    INCIDENT_KINDS,
    LOSS_COMPONENTS,
    NOTE_KINDS,
    STEP_FIELDS,
    Observation,
    is_bad,
    step_vector,
)
from nanguard.guard.policy import (
    ACTIONS,
    OBSERVATION_LAG,
    Decision,
    Outcome,
    PolicyConfig,
    PolicyState,
    decide,
    stop_verdict,
)
from nanguard.guard.spikes import SpikeDetector, lower_median

__all__ = [
    "ACTIONS",
    "CORRUPTION_KINDS",
    "DATA_KINDS",
    "FAULT_KINDS",
    "INCIDENT_KINDS",
    "LOSS_COMPONENTS",
    "NOTE_KINDS",
    "OBSERVATION_LAG",
    "STEP_FIELDS",
    "Decision",
    "FaultKind",
    "FaultPlan",
    "FaultSpec",
    "GatheredInjectionLog",
    "GuardConfig",
    "IncidentLog",
    "InjectionLog",
    "NullIncidentLog",
    "NullInjectionLog",
    "Observation",
    "Outcome",
    "PolicyConfig",
    "PolicyState",
    "SpikeDetector",
    "decide",
    "incident_record",
    "is_bad",
    "lower_median",
    "parse_fault",
    "read_incidents",
    "read_injections",
    "step_vector",
    "stop_verdict",
    "register_fault_kind",
]

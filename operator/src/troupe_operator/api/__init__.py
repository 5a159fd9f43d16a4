"""The troupe.dev/v1alpha1 API: pydantic models that are the single source of truth.

The CRDs (``troupe_operator.gen.crds``) are generated from these models, and the
operator parses every spec it reconciles with them.
"""

from troupe_operator.api.agent import AgentSpec
from troupe_operator.api.budget import BudgetSpec, BudgetStatus
from troupe_operator.api.common import API_VERSION, GROUP, VERSION
from troupe_operator.api.model_provider import ModelProviderSpec, ModelProviderStatus
from troupe_operator.api.status import AgentStatus, Condition, WorkflowStatus
from troupe_operator.api.workflow import WorkflowSpec, WorkflowStep

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AgentSpec",
    "AgentStatus",
    "BudgetSpec",
    "BudgetStatus",
    "Condition",
    "ModelProviderSpec",
    "ModelProviderStatus",
    "WorkflowSpec",
    "WorkflowStatus",
    "WorkflowStep",
]
